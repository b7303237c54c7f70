"""The api's integration harness (tests/support/api_harness.py) starts the real app, ready, on its own
database and topics."""

from __future__ import annotations

import pytest

from shared.topics import CHARGES
from tests.support.api_harness import ApiHarness, harness  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


async def test_the_api_starts_ready_with_its_consumers_and_serves_its_openapi(harness: ApiHarness):
    ready = await harness.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "kafka": "ok", "consumers": "ok"}
    doc = (await harness.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/customers/{customer_id}/usage" in doc["paths"]
    tables = await harness.sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'api' AND table_name = ANY($1::text[])",
        ["charge", "usage_day", "usage_month", "ledger_transaction", "statement", "entitlement", "org_customer_hour"],
    )
    assert tables == 7
    # the api really is on this test's own topics
    assert harness.settings.topic(CHARGES).startswith(harness.settings.topic_prefix) and harness.settings.topic_prefix
