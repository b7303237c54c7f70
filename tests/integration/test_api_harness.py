"""The api's integration harness (tests/support/api_harness.py) starts the real app, ready, on its own
database and topics."""

from __future__ import annotations

import pytest

from shared.topics import CHARGES
from tests.support.api_harness import ApiHarness, harness  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


async def test_the_api_starts_ready_with_its_consumers_and_serves_its_openapi(harness: ApiHarness) -> None:
    ready = await harness.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "kafka": "ok", "consumers": "ok"}
    doc = (await harness.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/customers/{customer_id}/usage" in doc["paths"]
    # the read model of the batched topics, migrated on start: charges per shard, per-resource day
    # documents, group rollups; the per-measurement tables of v1 only renamed
    v2 = [
        "charge_shard", "usage_resource_day", "usage_hour_group",
        "usage_day_group", "usage_month", "org_customer_hour", "ledger_transaction", "statement", "entitlement",
    ]
    listed = await harness.sql(
        "SELECT array_agg(table_name::text ORDER BY table_name) FROM information_schema.tables"
        " WHERE table_schema = 'api' AND table_name = ANY($1::text[])",
        [*v2, "charge", "usage_day", "charge_v1", "usage_day_v1"],
    )
    assert listed == sorted([*v2, "charge_v1", "usage_day_v1"])
    # the api really is on this test's own topics
    assert harness.settings.topic(CHARGES).startswith(harness.settings.topic_prefix) and harness.settings.topic_prefix
