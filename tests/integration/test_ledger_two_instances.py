"""Two ledger instances in one consumer group on the real broker, one customer's orgs spread over
partitions that both instances own: every charge is posted exactly once, and the posting rule holds."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2

from services.ledger.app import create_app
from services.ledger.settings import LedgerSettings
from shared.contracts import ChargeComputed, TransactionPosted
from shared.kafka import Outgoing, Publisher, encode
from shared.topics import CHARGES, TRANSACTIONS
from tests.conftest import TEST_PARTITIONS
from tests.support.ledger import (  # noqa: F401  (fixture)
    PRICE_A,
    PRICE_B,
    assert_books_hold,
    charge,
    ledger_topics,
)

pytestmark = pytest.mark.integration

NEW_YORK = ZoneInfo("America/New_York")


def partition_of(key: str) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % TEST_PARTITIONS


def stream(orgs: list[str], seed: int = 5) -> tuple[list[ChargeComputed], dict[tuple[str, uuid.UUID], Fraction]]:
    """Charges over a month boundary in New York, with revisions and duplicates; and the exact sum of the
    latest revisions per (month, price)."""
    rng = random.Random(seed)
    hours = [datetime(2026, 3, 31, 22, tzinfo=UTC) + timedelta(hours=h) for h in range(10)]  # Apr 1 starts at 04:00Z
    latest: dict[uuid.UUID, tuple[int, str, uuid.UUID, Fraction]] = {}
    out: list[ChargeComputed] = []
    for hour in hours:
        for r in range(60):
            org = orgs[r % len(orgs)]
            price = PRICE_A if r % 3 else PRICE_B
            amount = Fraction(rng.randint(1, 5_000_000), rng.choice([730, 747_520, 3]))
            c = charge(org, hour, amount, resource=f"res-{r}", price_id=price)
            out.append(c)
            local = hour.astimezone(NEW_YORK)
            latest[c.measurement_id] = (1, f"{local:%Y-%m}", price, amount)
            if rng.random() < 0.1:  # re-priced later
                amount2 = amount * Fraction(9, 10)
                out.append(charge(org, hour, amount2, resource=f"res-{r}", revision=2, price_id=price))
                latest[c.measurement_id] = (2, f"{local:%Y-%m}", price, amount2)
            if rng.random() < 0.05:
                out.append(c)  # duplicate
    sums: dict[tuple[str, uuid.UUID], Fraction] = defaultdict(Fraction)
    for _, month, price, amount in latest.values():
        sums[(month, price)] += amount
    return out, sums


async def test_two_instances_post_every_charge_exactly_once(database: Any, infra: Any, ledger_topics: str) -> None:
    settings = LedgerSettings(
        database_url=database.dsn("ledger"),
        kafka_bootstrap_servers=infra.kafka,
        topic_prefix=ledger_topics,
        port=8083,
        periodic_interval_seconds=0,
        batch_timeout_ms=50,
        batch_max_records=150,  # many small batches, so both instances post for the customer concurrently
    )
    first, second = create_app(settings), create_app(settings)
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        runtimes = [first.state.runtime, second.state.runtime]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://ledger") as client:
            await client.post("/internal/tiers", json={"name": "t", "credits_per_period": 2_000_000_000})
            customer = (await client.post("/internal/customers", json={"name": "One agency", "tier": "t"})).json()["id"]
            await client.post(
                "/internal/agreements",
                json={"customer_id": customer, "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2027-01-01T00:00:00Z"},
            )
            # Four orgs on every partition of the test topic, so whichever split the group makes, the
            # customer's orgs span both instances.
            orgs, per_partition = [], defaultdict(int)
            while len(orgs) < 4 * TEST_PARTITIONS:
                org = f"org-{uuid.uuid4().hex[:8]}"
                if per_partition[partition_of(org)] < 4:
                    per_partition[partition_of(org)] += 1
                    orgs.append(org)
            for org in orgs:
                await client.post("/internal/org-assignments", json={"org_id": org, "customer_id": customer, "starts_at": "2026-01-01T00:00:00Z"})

        # Both instances own partitions before anything is produced.
        for _ in range(300):
            owned = [{tp.partition for tp in r.consumers[0].assignment()} for r in runtimes]
            if all(owned) and len(owned[0] | owned[1]) == TEST_PARTITIONS:
                break
            await asyncio.sleep(0.1)
        assert all(owned), "both instances must own partitions"
        org_partitions = {partition_of(o) for o in orgs}
        assert org_partitions & owned[0] and org_partitions & owned[1], "the customer's orgs must span both instances"

        charges, sums = stream(orgs)
        publisher = Publisher(infra.kafka, client_id="test")
        await publisher.start()
        try:
            await publisher.publish(ledger_topics + CHARGES, [Outgoing(c.org_id.encode(), encode(c)) for c in charges])
        finally:
            await publisher.stop()

        measurements = {c.measurement_id for c in charges}
        pool = runtimes[0].pool
        for _ in range(600):
            async with pool.acquire() as conn:
                applied = await conn.fetchval("SELECT count(*) FROM charge_state")
                pending = await conn.fetchval("SELECT count(*) FROM outbox")
            if applied == len(measurements) and pending == 0 and all(r.consumers[0].batches for r in runtimes):
                break
            await asyncio.sleep(0.1)
        batches = [r.consumers[0].batches for r in runtimes]
        assert all(batches), f"both instances must have posted batches: {batches}"

        async with pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT to_char(u.month, 'YYYY-MM') AS month, u.price_id, sum(u.microcredits)::bigint AS mc
                     FROM usage_lines u JOIN transactions t ON t.id = u.transaction_id
                    WHERE t.customer_id = $1 GROUP BY 1, 2""",
                uuid.UUID(customer),
            )
            revisions = dict(await conn.fetch("SELECT measurement_id, revision FROM charge_state"))
            usage_ids = {r["id"] for r in await conn.fetch("SELECT id FROM transactions WHERE type = 'usage'")}
        await assert_books_hold(pool)

    expected = {k: v.numerator // v.denominator for k, v in sums.items()}
    assert {(r["month"], r["price_id"]): r["mc"] for r in rows} == expected
    assert set(expected) == {("2026-03", PRICE_A), ("2026-03", PRICE_B), ("2026-04", PRICE_A), ("2026-04", PRICE_B)}
    latest = {}
    for c in charges:
        latest[c.measurement_id] = max(latest.get(c.measurement_id, 0), c.revision)
    assert revisions == latest

    # What reached the topic: each usage transaction once (by id), adding up to the same figures.
    consumer = AIOKafkaConsumer(ledger_topics + TRANSACTIONS, bootstrap_servers=infra.kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    seen: dict[uuid.UUID, TransactionPosted] = {}
    try:
        for _ in range(100):
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                for record in batch:
                    msg = TransactionPosted.model_validate_json(record.value)
                    if msg.type == "usage":
                        seen[msg.id] = msg
            if set(seen) >= usage_ids:
                break
    finally:
        await consumer.stop()
    assert set(seen) == usage_ids
    published: dict[tuple[str, uuid.UUID | None], int] = defaultdict(int)
    for msg in seen.values():
        assert msg.reading_hour is not None
        month = f"{msg.reading_hour.astimezone(NEW_YORK):%Y-%m}"
        for line in msg.usage:
            published[(month, line.price_id)] += line.microcredits
    assert {k: v for k, v in published.items() if v} == expected
