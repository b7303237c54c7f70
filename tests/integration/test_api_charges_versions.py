"""The api reads usage.charges.v3 and, until what it retains is drained, usage.charges.v2 (real Kafka and
PostgreSQL): a charge on either topic is answered, and a charge seen on both (the same measurement and
revision: a v2 batch drained after the pricer published it again on v3) counts once, whichever comes first.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest

from shared.batches import Charges, encode_charges, shard_key
from shared.contracts import ChargesComputed, ChargesComputedV2
from shared.kafka import Outgoing, group_lag
from shared.topics import CHARGES, CHARGES_V2, TRANSACTIONS
from tests.integration.test_api_read_model import as_answered, walk
from tests.support.api_factories import batches, charge, txn
from tests.support.api_harness import ApiHarness, harness  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

CUSTOMER = uuid.UUID(int=0xC0FFEE)
H = datetime(2026, 10, 7, 14, tzinfo=UTC)


def v2_bytes(c: Charges) -> bytes:
    """A batch as the pricer wrote it on usage.charges.v2 (flat prices: the same bytes but the version)."""
    raw = encode_charges(c).replace(b'"schema_version":3', b'"schema_version":2')
    ChargesComputedV2.model_validate_json(raw)
    return raw


async def caught_up(h: ApiHarness) -> None:
    topics = [h.settings.topic(t) for t in (CHARGES, CHARGES_V2, TRANSACTIONS)]

    async def check() -> bool:
        servers, group = h.settings.kafka_bootstrap_servers, h.settings.topic("api")
        return sum([await group_lag(servers, group, t) for t in topics]) == 0

    await h.until(check, "the api's consumers to catch up on v3, v2 and the transactions")


async def test_charges_on_v3_and_v2_are_both_read_and_one_seen_on_both_counts_once(harness: ApiHarness) -> None:
    h = harness
    amount = Fraction(1_000_000, 730)
    both_first_v2 = charge(H, "app-both-1", org="org-1", value=100, amount=amount * 100)
    both_first_v3 = charge(H + timedelta(hours=1), "app-both-2", org="org-1", value=200, amount=amount * 200)
    only_v2 = charge(H, "app-v2", org="org-1", value=300, amount=amount * 300)
    only_v3 = charge(H, "app-v3", org="org-1", value=400, amount=amount * 400)
    (b1,) = batches([both_first_v2])
    (b2,) = batches([both_first_v3])
    (b_v2,) = batches([only_v2])
    (b_v3,) = batches([only_v3])
    for c in (b1, b2, b_v3):
        ChargesComputed.model_validate_json(encode_charges(c))
    v2_topic, v3_topic = h.settings.topic(CHARGES_V2), h.settings.topic(CHARGES)

    def on_v2(c: Charges) -> Outgoing:
        return Outgoing(shard_key(c.shard), v2_bytes(c))

    def on_v3(c: Charges) -> Outgoing:
        return Outgoing(shard_key(c.shard), encode_charges(c))

    # The org is the customer's in both hours (the ledger says so in its usage lines).
    await h.publish_ledger([
        txn(CUSTOMER, "usage", 1, occurred_at=hour, reading_hour=hour, orgs=["org-1"])
        for hour in (H, H + timedelta(hours=1))
    ])
    await h.publisher.publish(v2_topic, [on_v2(b1), on_v2(b_v2)])
    await h.publisher.publish(v3_topic, [on_v3(b2), on_v3(b_v3)])
    await caught_up(h)
    # ... and then each on the other topic: v3 after v2 for the first, v2 after v3 for the second.
    await h.publisher.publish(v3_topic, [on_v3(b1)])
    await h.publisher.publish(v2_topic, [on_v2(b2)])
    await caught_up(h)

    q = {"from": "2026-10-07T04:00:00Z", "to": "2026-10-08T04:00:00Z", "granularity": "day", "group_by": "resource"}
    headers = h.headers(customers=[str(CUSTOMER)])
    answered = as_answered(await walk(h, f"/v1/customers/{CUSTOMER}/usage", headers, 100, **q), "resource_id")
    assert answered == {
        ("2026-10-07", c.resource_id): ({"MB": c.value}, c.amount)
        for c in (both_first_v2, both_first_v3, only_v2, only_v3)
    }
    q["group_by"] = "org"
    (org,) = await walk(h, f"/v1/customers/{CUSTOMER}/usage", headers, 100, **q)
    assert org["quantities"] == [{"unit": "MB", "value": 100 + 200 + 300 + 400}]
    assert org["microcredits_exact"] == f"{(amount * 1000).numerator}/{(amount * 1000).denominator}"
    # Nothing was refused: the second copies were redeliveries, not conflicts.
    assert await h.dead_letters(CHARGES, 0, timeout=1) == []
    assert await h.dead_letters(CHARGES_V2, 0, timeout=1) == []
