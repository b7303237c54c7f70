"""Two ledger instances in one consumer group on the real broker, one customer's charges in every shard, so
on partitions that both instances own (a batch keyed ``shard-<n>`` goes to partition n mod partitions):
every charge is posted exactly once, and the posting rule holds."""

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

from services.ledger.app import create_app
from services.ledger.settings import LedgerSettings
from shared.batches import SHARDS, Charges, shard_of
from shared.contracts import TransactionPosted
from shared.topics import TRANSACTIONS
from tests.conftest import TEST_PARTITIONS
from tests.support.ledger import (  # noqa: F401  (fixture)
    PRICE_A,
    PRICE_B,
    ChargeItem,
    applied_revisions,
    assert_books_hold,
    charges_batches,
    item,
    ledger_topics,
    publish_charges,
)

pytestmark = pytest.mark.integration

NEW_YORK = ZoneInfo("America/New_York")


def stream(
    orgs: list[str], seed: int = 5
) -> tuple[list[Charges], dict[tuple[datetime, str], int], dict[tuple[str, uuid.UUID], Fraction]]:
    """Charge batches over a month boundary in New York, in every shard, with revisions (in later batches)
    and whole batches duplicated; the latest revision per (hour, resource); the exact sum of the latest
    revisions per (month, price)."""
    rng = random.Random(seed)
    hours = [datetime(2026, 3, 31, 22, tzinfo=UTC) + timedelta(hours=h) for h in range(10)]  # Apr 1 starts at 04:00Z
    resources = [f"res-{r}" for r in range(120)]
    assert {shard_of(r) for r in resources} == set(range(SHARDS))
    latest: dict[tuple[datetime, str], tuple[int, str, uuid.UUID, Fraction]] = {}
    out: list[Charges] = []
    for hour in hours:
        first: list[ChargeItem] = []
        revised: list[ChargeItem] = []
        for r, resource in enumerate(resources):
            org = orgs[r % len(orgs)]
            price = PRICE_A if r % 3 else PRICE_B
            amount = Fraction(rng.randint(1, 5_000_000), rng.choice([730, 747_520, 3]))
            first.append(item(org, amount, resource=resource, price_id=price))
            local = hour.astimezone(NEW_YORK)
            latest[(hour, resource)] = (1, f"{local:%Y-%m}", price, amount)
            if rng.random() < 0.1:  # re-priced later
                amount2 = amount * Fraction(9, 10)
                revised.append(item(org, amount2, resource=resource, revision=2, price_id=price))
                latest[(hour, resource)] = (2, f"{local:%Y-%m}", price, amount2)
        batches = charges_batches(first, hour) + charges_batches(revised, hour)
        out += batches + [b for b in batches if rng.random() < 0.05]  # duplicates
    sums: dict[tuple[str, uuid.UUID], Fraction] = defaultdict(Fraction)
    for _, month, price, amount in latest.values():
        sums[(month, price)] += amount
    return out, {k: v[0] for k, v in latest.items()}, sums


async def test_two_instances_post_every_charge_exactly_once(
    database: Any, infra: Any, ledger_topics: str, issuer: Any
) -> None:
    settings = LedgerSettings(
        oidc_issuer=issuer.url,
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
        transport = httpx.ASGITransport(app=first)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger", headers=issuer.bearer()) as client:
            await client.post("/internal/tiers", json={"name": "t", "credits_per_period": 2_000_000_000})
            customer = (await client.post("/internal/customers", json={"name": "One agency", "tier": "t"})).json()["id"]
            await client.post(
                "/internal/agreements",
                json={"customer_id": customer, "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2027-01-01T00:00:00Z"},
            )
            # The customer's charges are in every shard, so on every partition: whichever split the group
            # makes, both instances post for the customer.
            orgs = [f"org-{uuid.uuid4().hex[:8]}" for _ in range(5)]
            for org in orgs:
                await client.post(
                    "/internal/org-assignments",
                    json={"org_id": org, "customer_id": customer, "starts_at": "2026-01-01T00:00:00Z"},
                )

        # Both instances own partitions before anything is produced.
        subscriptions = [r.stream.subscriptions[0] for r in runtimes]

        def owned_by(runtime: Any) -> set[int]:
            consumers = [sub.consumer for sub in runtime.stream.broker.subscribers if sub.consumer is not None]
            return {tp.partition for tp in consumers[0].assignment()} if consumers else set()

        owned: list[set[int]] = []
        for _ in range(300):
            owned = [owned_by(r) for r in runtimes]
            if all(owned) and len(owned[0] | owned[1]) == TEST_PARTITIONS:
                break
            await asyncio.sleep(0.1)
        assert all(owned), f"both instances must own partitions: {owned}"

        charges, latest, sums = stream(orgs)
        await publish_charges(infra.kafka, ledger_topics, charges)

        pool = runtimes[0].pool
        for _ in range(600):
            async with pool.acquire() as conn:
                applied = await conn.fetchval("SELECT coalesce(sum(posted), 0) FROM shard_state")
                pending = await conn.fetchval("SELECT count(*) FROM outbox")
            if applied == len(latest) and pending == 0 and all(s.batches for s in subscriptions):
                break
            await asyncio.sleep(0.1)
        batches = [s.batches for s in subscriptions]
        assert all(batches), f"both instances must have posted batches: {batches}"

        async with pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT to_char(u.month, 'YYYY-MM') AS month, u.price_id, sum(u.microcredits)::bigint AS mc
                     FROM usage_lines u JOIN transactions t ON t.id = u.transaction_id
                    WHERE t.customer_id = $1 GROUP BY 1, 2""",
                uuid.UUID(customer),
            )
            usage_ids = {r["id"] for r in await conn.fetch("SELECT id FROM transactions WHERE type = 'usage'")}
        revisions = await applied_revisions(pool)
        await assert_books_hold(pool)

    expected = {k: v.numerator // v.denominator for k, v in sums.items()}
    assert {(r["month"], r["price_id"]): r["mc"] for r in rows} == expected
    assert set(expected) == {("2026-03", PRICE_A), ("2026-03", PRICE_B), ("2026-04", PRICE_A), ("2026-04", PRICE_B)}
    assert {(h, r): v for (h, _, r), v in revisions.items()} == latest

    # What reached the topic: each usage transaction once (by id), adding up to the same figures.
    consumer = AIOKafkaConsumer(
        ledger_topics + TRANSACTIONS, bootstrap_servers=infra.kafka, auto_offset_reset="earliest", group_id=None
    )
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
