"""Graduated and volume prices in the ledger (docs/price-models.md, section 4), by hand, on the real
database and, for the consumer's part, the real broker.

The expected figures come from the independent ``reference_f`` (tests/support/price_models.py), never from
the code under test: a volume price whose crossing posts a negative line and gives the credits back to the
pool, a late charge of a closed month posting the difference of f as late usage, a batch naming a known
price with another model refused as a conflict, a group past 2**62 refused with nothing posted, and the
consumer reading usage.charges.v3 and v2 (a charge on both counts once; refusals to the topic's DLQ).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime
from fractions import Fraction
from typing import Any

import pytest

from services.ledger.posting import GroupOutOfRangeError
from shared.contracts import TransactionPosted
from shared.kafka import group_lag
from shared.topics import CHARGES, CHARGES_V2, TRANSACTIONS, dlq
from tests.integration.test_ledger_http import make_customer, posted, read_topic, running, settings_for
from tests.support.ledger import (  # noqa: F401  (fixtures)
    LONG_AGO,
    PRICE_A,
    LedgerDB,
    banded_price,
    charges_batch,
    charges_batches,
    delivered,
    item,
    ledger_db,
    ledger_topics,
    publish_charges,
    remaining,
    usage,
)
from tests.support.price_models import RawBand, floor_of, reference_f
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

MARCH_1 = datetime(2026, 3, 10, 14, tzinfo=UTC)
MARCH_2 = datetime(2026, 3, 10, 15, tzinfo=UTC)
FEBRUARY = datetime(2026, 2, 10, 14, tzinfo=UTC)
END = datetime(2027, 1, 1, tzinfo=UTC)

# Volume: up to and including 100 units at 10 plus a fee of 7; above, every unit at 5 plus a fee of 3.
VOLUME: list[RawBand] = [(Fraction(100), 10, 7), (None, 5, 3)]
# Graduated: the first 1,000 units free, then 1,370 per unit with a fee of 250 once reached, 1,000 above 4001/2.
GRADUATED: list[RawBand] = [(Fraction(1000), 0, 0), (Fraction(4001, 2), 1370, 250), (None, 1000, 0)]


def f(bands: list[RawBand], model: str, units: Fraction | int) -> int:
    return floor_of(reference_f(model, bands, Fraction(units)))


async def funded_customer(db: LedgerDB, org: str, credits: int) -> uuid.UUID:
    customer = await db.customer()
    await db.service.assign_org(org, customer, LONG_AGO)
    await db.service.create_agreement(customer, LONG_AGO, END, credits)
    return customer


async def usage_lines(db: LedgerDB, customer: uuid.UUID) -> list[tuple[str, datetime | None, uuid.UUID, int]]:
    rows = await db.fetch(
        """SELECT t.type, t.reading_hour, u.price_id, u.microcredits
             FROM usage_lines u JOIN transactions t ON t.id = u.transaction_id
            WHERE t.customer_id = $1 ORDER BY t.reading_hour, t.id""",
        customer,
    )
    return [(r["type"], r["reading_hour"], r["price_id"], r["microcredits"]) for r in rows]


async def test_a_volume_crossing_posts_a_negative_line_that_gives_credits_back_to_the_pool(ledger_db: LedgerDB) -> None:
    db = ledger_db
    org = f"org-{uuid.uuid4().hex[:6]}"
    customer = await funded_customer(db, org, 10_000)
    price = banded_price(uuid.uuid4(), "volume", VOLUME, unit=730)  # units: value / 730
    await db.post(MARCH_1, usage(org, 100 * 730, price, resource="app-1"))  # exactly on the edge: lower band
    first = f(VOLUME, "volume", 100)
    assert first == 1_007
    assert await remaining(db, customer) == 10_000 - first
    await db.post(MARCH_2, usage(org, 730, price, resource="app-2"))  # 101 units: all of them at 5
    second = f(VOLUME, "volume", 101) - first
    assert second == -499
    assert await remaining(db, customer) == 10_000 - first - second  # 499 back to the pool, exactly
    assert await usage_lines(db, customer) == [
        ("usage", MARCH_1, price.id, first),
        ("usage", MARCH_2, price.id, second),
    ]
    group = await db.fetch("SELECT posted, units_num, units_den FROM month_usage WHERE customer_id = $1", customer)
    assert [(g["posted"], Fraction(int(g["units_num"]), int(g["units_den"]))) for g in group] == [
        (f(VOLUME, "volume", 101), Fraction(101))
    ]


async def test_a_revision_lowering_units_and_a_charge_seen_twice(ledger_db: LedgerDB) -> None:
    """A revision takes its old units back from the group (posting the fall of f); a redelivery changes nothing."""
    db = ledger_db
    org = f"org-{uuid.uuid4().hex[:6]}"
    customer = await funded_customer(db, org, 10**9)
    price = banded_price(uuid.uuid4(), "graduated", GRADUATED, unit=4)
    await db.post(MARCH_1, usage(org, 4 * 1500, price, resource="app-1"), usage(org, 4 * 700, price, resource="app-2"))
    await db.post(MARCH_1, usage(org, 4 * 1500, price, resource="app-1"))  # again: nothing
    await db.post(MARCH_1, usage(org, 4 * 900 + 3, price, resource="app-1", revision=2))
    total = Fraction(4 * 900 + 3, 4) + 700
    lines = await usage_lines(db, customer)
    assert [m for *_, m in lines] == [f(GRADUATED, "graduated", 2200), f(GRADUATED, "graduated", total) - f(
        GRADUATED, "graduated", 2200
    )]
    assert sum(m for *_, m in lines) == f(GRADUATED, "graduated", total)


async def test_a_late_charge_of_a_closed_month_posts_the_difference_of_f_as_late_usage(ledger_db: LedgerDB) -> None:
    db = ledger_db
    org = f"org-{uuid.uuid4().hex[:6]}"
    customer = await funded_customer(db, org, 10**9)
    price = banded_price(uuid.uuid4(), "graduated", GRADUATED)
    await db.post(FEBRUARY, usage(org, 1200, price, resource="app-1"))
    await db.service.close_month(date(2026, 2, 1))
    await db.post(FEBRUARY, usage(org, 900, price, resource="app-2"))
    before, after = f(GRADUATED, "graduated", 1200), f(GRADUATED, "graduated", 2100)
    assert await usage_lines(db, customer) == [
        ("usage", FEBRUARY, price.id, before),
        ("late_usage", FEBRUARY, price.id, after - before),
    ]
    late = await db.fetchval("SELECT occurred_at FROM transactions WHERE customer_id = $1 AND type = 'late_usage'",
                             customer)
    assert late >= datetime(2026, 3, 1, 5, tzinfo=UTC)  # dated in the first open month


async def test_a_batch_naming_a_known_price_with_another_model_is_refused_as_a_conflict(ledger_db: LedgerDB) -> None:
    db = ledger_db
    org = f"org-{uuid.uuid4().hex[:6]}"
    customer = await funded_customer(db, org, 10**9)
    price_id = uuid.uuid4()
    graduated = banded_price(price_id, "graduated", GRADUATED)
    await db.post(MARCH_1, usage(org, 1500, graduated, resource="app-1"))
    kept = f(GRADUATED, "graduated", 1500)
    for other in (
        banded_price(price_id, "volume", GRADUATED),  # another model
        banded_price(price_id, "graduated", [(Fraction(1000), 1, 0), *GRADUATED[1:]]),  # other bands
    ):
        batches = delivered(charges_batches([usage(org, 10, other, resource="app-9")], MARCH_2))
        result = await db.service.post_charges(batches)
        assert result.changed == 0 and result.transactions == 0
        [(position, reason)] = result.refused
        assert position == 0
        assert reason.startswith(f"conflict: price {price_id} is known as ") and '"graduated"' in reason
    # A flat price named with the id of a known graduated one too.
    flat = charges_batch(MARCH_2, [item(org, 5, price_id=price_id, resource="app-9")])
    result = await db.service.post_charges(delivered([flat]))
    [(position, reason)] = result.refused
    assert position == 0
    assert reason.startswith(f"conflict: price {price_id} is known as ") and "as flat" in reason
    assert [m for *_, m in await usage_lines(db, customer)] == [kept]
    assert await db.fetchval("SELECT count(*) FROM price_models WHERE price_id = $1", price_id) == 1


async def test_a_group_past_2_62_is_refused_with_its_reason_and_nothing_is_posted(ledger_db: LedgerDB) -> None:
    db = ledger_db
    org = f"org-{uuid.uuid4().hex[:6]}"
    customer = await funded_customer(db, org, 10**9)
    price = banded_price(uuid.uuid4(), "volume", [(Fraction(10), 0, 0), (None, 2**62, 0)])
    await db.post(MARCH_1, usage(org, 10, price, resource="app-1"))  # 10 units in the free band: 0
    assert f([(Fraction(10), 0, 0), (None, 2**62, 0)], "volume", 11) > 2**62
    before = await db.fetch("SELECT id, sum_num, posted, units_num FROM month_usage ORDER BY id")
    with pytest.raises(GroupOutOfRangeError) as refused:
        await db.post(MARCH_2, usage(org, 1, price, resource="app-2"))
    assert f"the volume price {price.id} of customer {customer} in 2026-03" in str(refused.value)
    assert "above 2**62" in str(refused.value)
    assert await db.fetch("SELECT id, sum_num, posted, units_num FROM month_usage ORDER BY id") == before
    assert await usage_lines(db, customer) == []
    assert await db.fetchval("SELECT count(*) FROM shard_state WHERE reading_hour = $1", MARCH_2) == 0


async def test_the_consumer_reads_v3_and_v2_and_dead_letters_what_it_refuses(
    database: Any, infra: Any, ledger_topics: str, issuer: LocalIssuer
) -> None:
    """A charge published to both topics counts once; a conflicting model and a group past 2**62 go to the
    DLQ of the topic they came from, with their reason, and post nothing."""
    prefix = ledger_topics
    async with running(settings_for(database, infra, prefix, issuer), issuer) as client:
        customer = await make_customer(client, credits=10**9)
        org = f"org-{uuid.uuid4().hex[:6]}"
        assignment = {"org_id": org, "customer_id": customer, "starts_at": "2026-01-01T00:00:00Z"}
        assert (await client.post("/internal/org-assignments", json=assignment)).status_code == 201
        price = banded_price(uuid.uuid4(), "graduated", GRADUATED)
        charge = delivered(charges_batches([usage(org, 1500, price, resource="app-1")], MARCH_1))
        flat = delivered(charges_batches([item(org, Fraction(7, 2), resource="app-2")], MARCH_1))
        await publish_charges(infra.kafka, prefix, charge + flat)
        await publish_charges(infra.kafka, prefix, charge + flat, topic=CHARGES_V2)
        conflicting = delivered(
            charges_batches([usage(org, 1, banded_price(price.id, "volume", GRADUATED), resource="app-3")], MARCH_2)
        )
        huge = banded_price(uuid.uuid4(), "volume", [(Fraction(1), 0, 0), (None, 2**62, 0)])
        too_much = delivered(charges_batches([usage(org, 2, huge, resource="app-4")], MARCH_2))
        await publish_charges(infra.kafka, prefix, conflicting, topic=CHARGES_V2)
        await publish_charges(infra.kafka, prefix, too_much)
        dead_v2 = await read_topic(infra.kafka, dlq(prefix + CHARGES_V2), lambda r: len(r) >= 1)
        dead_v3 = await read_topic(infra.kafka, dlq(prefix + CHARGES), lambda r: len(r) >= 1)
        [reason_v2] = [dict(r.headers)["dlq.reason"].decode() for r in dead_v2]
        assert reason_v2.startswith(f"conflict: price {price.id} is known as ")
        [reason_v3] = [dict(r.headers)["dlq.reason"].decode() for r in dead_v3]
        assert reason_v3.startswith("amounts out of range") and f"the volume price {huge.id}" in reason_v3
        expected = sorted([(price.id, f(GRADUATED, "graduated", 1500)), (PRICE_A, 3)], key=str)

        def lines_of(records: list[Any]) -> list[tuple[uuid.UUID | None, int]]:
            return sorted(
                (
                    (u.price_id, u.microcredits)
                    for m in posted(records)
                    if isinstance(m, TransactionPosted) and m.type == "usage"
                    for u in m.usage
                ),
                key=str,
            )

        seen = await read_topic(infra.kafka, prefix + TRANSACTIONS, lambda r: len(lines_of(r)) >= 2)
        assert lines_of(seen) == expected
        # Both topics read to their end (their consumer groups have no lag), still once each: f(1500) and
        # floor(7/2 at 1 per unit).
        for topic in (CHARGES, CHARGES_V2):
            for _ in range(100):
                if await group_lag(infra.kafka, prefix + "ledger", prefix + topic) == 0:
                    break
                await asyncio.sleep(0.1)
            assert await group_lag(infra.kafka, prefix + "ledger", prefix + topic) == 0
        assert lines_of(await read_topic(infra.kafka, prefix + TRANSACTIONS, lambda r: False, timeout=2)) == expected
