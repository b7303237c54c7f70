"""With the query cache on: a usage answer is reused for its time to live and recomputed after it, a
cached answer is never given to a caller who may not see the customer, and a revoked entitlement stops
working once its cached decision expires."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tests.conftest import Database, Infra
from tests.support.api_factories import batches, charge
from tests.support.api_harness import running_api
from tests.support.api_read_model import H1, OCT, A, B, fill, ts

pytestmark = pytest.mark.integration


async def test_cached_answers_expire_and_never_bypass_the_access_check(
    infra: Infra, database: Database, topic_prefix: str
) -> None:
    async with running_api(infra, database, topic_prefix, query_cache_seconds=30) as h:
        await fill(h)
        api = h.app.state.api
        now = [0.0]
        for cache in (api.usage_cache, api.access_cache):
            cache._clock = lambda: now[0]  # the test moves time, not the wall clock
        q = {"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "month", "group_by": "org"}
        url = f"/v1/customers/{A}/usage"
        first = await h.client.get(url, params=q, headers=h.admin)
        assert first.status_code == 200

        # a caller who may not see A gets the same 404 as ever, cache or not
        stranger = await h.client.get(url, params=q, headers=h.headers(customers=[str(B)]))
        assert stranger.status_code == 404 and "items" not in stranger.text

        # more usage arrives: within the time to live the answer is the cached one, after it the new one
        await h.publish_charges(batches([charge(H1, "app-new", org="org-x", value=1, amount=Fraction(1_000_000))]))
        await h.caught_up()
        assert (await h.client.get(url, params=q, headers=h.admin)).content == first.content
        now[0] += 31
        fresh = (await h.client.get(url, params=q, headers=h.admin)).json()
        before = {it["group"]["org_id"]: it["microcredits"] for it in first.json()["items"]}
        after = {it["group"]["org_id"]: it["microcredits"] for it in fresh["items"]}
        assert after["org-x"] - before["org-x"] in (1_000_000, 1_000_001)  # floors of exact sums

        # an entitlement works at once, and stops working once its cached decision expires
        carol = h.headers(sub="carol")
        await h.client.post("/admin/entitlements", json={"subject": "carol", "customer_id": str(A)}, headers=h.admin)
        assert (await h.client.get(url, params=q, headers=carol)).status_code == 200
        entitlement = {"subject": "carol", "customer_id": str(A)}
        await h.client.delete("/admin/entitlements", params=entitlement, headers=h.admin)
        now[0] += 31
        assert (await h.client.get(url, params=q, headers=carol)).status_code == 404
