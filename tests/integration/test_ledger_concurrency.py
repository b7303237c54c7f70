"""Two transactions applying the same charge at once (a partition that moved mid-batch): the second one
fails as a serialization failure, which the consumer retries, and the retry changes nothing. Nothing is
ever counted twice."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from services.ledger import repository as repo
from services.ledger.posting import ConcurrentChargeUpdateError, batch_digest, batch_months, charge_row, post_incoming
from shared.contracts import ChargeComputed
from tests.support.ledger import (  # noqa: F401  (fixture)
    LONG_AGO,
    PRICE_A,
    LedgerDB,
    charge,
    ledger_db,
    posted_by_group,
)

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 9, 9, 9, tzinfo=UTC)


async def _hold_open(db: LedgerDB, charges: list[ChargeComputed]) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """Post ``charges`` in a transaction left open (the caller commits)."""
    conn = await db.pool.acquire()
    tx = conn.transaction()
    await tx.start()
    await repo.prepare_work_tables(conn)
    await repo.copy_incoming(conn, [charge_row(c) for c in charges])
    await post_incoming(conn, datetime.now(UTC), batch_months(charges), batch_digest(charges))
    return conn, tx


async def _setup(db: LedgerDB) -> tuple[uuid.UUID, str]:
    customer = await db.customer()
    org = f"org-{uuid.uuid4().hex[:8]}"
    await db.service.assign_org(org, customer, LONG_AGO)
    return customer, org


async def test_the_same_new_charge_applied_twice_at_once_counts_once(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await _setup(db)
    batch = [charge(org, HOUR, 1234, resource="a"), charge(org, HOUR, 1, resource="b")]
    conn, tx = await _hold_open(db, batch)
    try:
        second = asyncio.create_task(db.service.post_charges(batch))
        await asyncio.sleep(0.5)
        assert not second.done()  # waiting for the first transaction
        await tx.commit()
    finally:
        await db.pool.release(conn)
    with pytest.raises(ConcurrentChargeUpdateError):
        await second
    retried = await db.service.post_charges(batch)
    assert retried.changed == 0 and retried.transactions == 0
    assert await posted_by_group(db, [customer]) == {(customer, "2026-09", PRICE_A): 1235}


async def test_two_revisions_of_one_charge_applied_at_once_end_at_the_latest(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await _setup(db)
    await db.service.post_charges([charge(org, HOUR, 100, resource="a")])
    conn, tx = await _hold_open(db, [charge(org, HOUR, 200, resource="a", revision=2)])
    try:
        third = asyncio.create_task(db.service.post_charges([charge(org, HOUR, 300, resource="a", revision=3)]))
        await asyncio.sleep(0.5)
        assert not third.done()
        await tx.commit()
    finally:
        await db.pool.release(conn)
    with pytest.raises(ConcurrentChargeUpdateError):
        await third
    assert await posted_by_group(db, [customer]) == {(customer, "2026-09", PRICE_A): 200}
    retried = await db.service.post_charges([charge(org, HOUR, 300, resource="a", revision=3)])
    assert retried.changed == 1
    assert await posted_by_group(db, [customer]) == {(customer, "2026-09", PRICE_A): 300}


def test_the_conflict_is_a_serialization_failure_the_consumer_retries() -> None:
    from shared.kafka import TRANSIENT

    assert isinstance(ConcurrentChargeUpdateError("x"), TRANSIENT)
