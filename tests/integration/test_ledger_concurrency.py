"""Two transactions posting the same shard at once (a partition that moved mid-batch: its new owner reads
the records the old one is still posting, possibly cut into other Kafka batches): the second waits for the
first, and then either posts only what the first did not, or fails with a serialization failure that the
consumer retries (the retry then changes nothing). Nothing is ever counted twice, and nothing held is
lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import pytest

from services.ledger.posting import ConcurrentShardUpdateError, Posting, post_batches
from shared.batches import Charges
from shared.kafka import TRANSIENT
from tests.support.ledger import (
    LONG_AGO,
    PRICE_A,
    LedgerDB,
    applied_revisions,
    charges_batch,
    held_revisions,
    item,
    ledger_db,  # noqa: F401  (fixture)
    posted_by_group,
    resources_of_shard,
)

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 9, 9, 9, tzinfo=UTC)


@asynccontextmanager
async def held_open(db: LedgerDB, batches: Sequence[Charges]) -> AsyncIterator[None]:
    """Post ``batches`` in a transaction that stays open inside the block and commits at its end."""
    async with db.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await post_batches(conn, db.service.frames, batches, datetime.now(UTC))
        except BaseException:
            await tx.rollback()
            raise
        yield
        await tx.commit()


async def post_as_the_consumer(db: LedgerDB, batches: Sequence[Charges], attempt: asyncio.Task[Posting]) -> None:
    """Finish a posting as the consumer would: a transient failure (serialization) is retried."""
    try:
        await attempt
    except TRANSIENT:
        await db.service.post_charges(batches)


async def _setup(db: LedgerDB) -> tuple[uuid.UUID, str]:
    customer = await db.customer()
    org = f"org-{uuid.uuid4().hex[:8]}"
    await db.service.assign_org(org, customer, LONG_AGO)
    return customer, org


@pytest.mark.parametrize("refetched", ["as it was", "cut otherwise"])
async def test_a_new_shard_posted_twice_at_once_counts_once(ledger_db: LedgerDB, refetched: str) -> None:
    db = ledger_db
    customer, org = await _setup(db)
    a, b = resources_of_shard(4, 2)
    [c] = resources_of_shard(9, 1)
    shard = charges_batch(HOUR, [item(org, 1234, resource=a), item(org, 1, resource=b)])
    again = [shard] if refetched == "as it was" else [shard, charges_batch(HOUR, [item(org, 10, resource=c)])]
    async with held_open(db, [shard]):
        second = asyncio.create_task(db.service.post_charges(again))
        await asyncio.sleep(0.5)
        assert not second.done()  # waiting for the first transaction
    await post_as_the_consumer(db, again, second)
    retried = await db.service.post_charges(again)
    assert (retried.changed, retried.transactions) == (0, 0)
    expected = 1235 if refetched == "as it was" else 1245
    assert await posted_by_group(db, [customer]) == {(customer, "2026-09", PRICE_A): expected}


@pytest.mark.parametrize(("first", "second", "latest"), [(2, 3, 3), (3, 2, 3)])
async def test_two_revisions_of_one_charge_posted_at_once_end_at_the_latest(
    ledger_db: LedgerDB, first: int, second: int, latest: int
) -> None:
    db = ledger_db
    customer, org = await _setup(db)
    [a] = resources_of_shard(6, 1)
    await db.post(HOUR, item(org, 100, resource=a))
    amount = {2: 200, 3: 300}

    def revision(n: int) -> list[Charges]:
        return [charges_batch(HOUR, [item(org, amount[n], resource=a, revision=n)])]

    async with held_open(db, revision(first)):
        other = asyncio.create_task(db.service.post_charges(revision(second)))
        await asyncio.sleep(0.5)
        assert not other.done()
    await post_as_the_consumer(db, revision(second), other)
    assert await posted_by_group(db, [customer]) == {(customer, "2026-09", PRICE_A): amount[latest]}
    assert await applied_revisions(db) == {(HOUR, "cfapps", a): latest}


async def test_charges_held_at_once_for_one_org_and_shard_are_all_kept(ledger_db: LedgerDB) -> None:
    """Two batches of one shard for an org without a customer, posted at once: both batches' charges stay
    held (neither posting's held row replaces the other's), and all are posted once the org is assigned."""
    db = ledger_db
    customer = await db.customer()
    org = f"org-{uuid.uuid4().hex[:8]}"
    a, b, c = resources_of_shard(8, 3)
    first = [charges_batch(HOUR, [item(org, 5, resource=a), item(org, 6, resource=b)])]
    second = [charges_batch(HOUR, [item(org, 7, resource=c)])]
    async with held_open(db, first):
        other = asyncio.create_task(db.service.post_charges(second))
        await asyncio.sleep(0.5)
        assert not other.done()
    await post_as_the_consumer(db, second, other)
    assert await held_revisions(db) == {(HOUR, "cfapps", org, r): 1 for r in (a, b, c)}
    assigned = await db.service.assign_org(org, customer, LONG_AGO)
    assert assigned.body["held_charges_posted"] == 3
    assert await posted_by_group(db, [customer]) == {(customer, "2026-09", PRICE_A): 18}


def test_the_conflict_is_a_serialization_failure_the_consumer_retries() -> None:
    """A concurrent first write of a shard fails as a serialization failure: the consumer's and the
    service's retries treat it as transient instead of dead-lettering the batch."""
    assert isinstance(ConcurrentShardUpdateError("x"), TRANSIENT)
    assert isinstance(ConcurrentShardUpdateError("x"), asyncpg.SerializationError)
