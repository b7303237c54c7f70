"""The accounting checks every ledger test ends with (``assert_books_hold``, run by the ``ledger_db``
fixture's teardown, both in tests/support/ledger.py) are not vacuous."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.support.ledger import LONG_AGO, LedgerDB, assert_books_hold, item, ledger_db  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 6, 1, 12, tzinfo=UTC)


async def test_books_check_catches_a_broken_equation(ledger_db: LedgerDB) -> None:
    """The teardown check is not vacuous: a balance tampered with behind the ledger's back is caught."""
    customer = await ledger_db.customer()
    async with ledger_db.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance = 5 WHERE customer_id = $1 AND name = 'usage'", customer)
    with pytest.raises(AssertionError, match="accounting equation"):
        await assert_books_hold(ledger_db.pool)
    async with ledger_db.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance = 0 WHERE customer_id = $1 AND name = 'usage'", customer)


@pytest.mark.parametrize(
    ("tamper", "undo", "message"),
    [
        (
            "UPDATE month_usage SET sum_num = sum_num + sum_den, posted = posted + 1",
            "UPDATE month_usage SET sum_num = sum_num - sum_den, posted = posted - 1",
            "exact sums differ from the charges applied",
        ),
        (
            "UPDATE shard_state SET revisions = revisions + 1",
            "UPDATE shard_state SET revisions = revisions - 1",
            "counts",
        ),
        ("UPDATE held_shards SET held = held + 1", "UPDATE held_shards SET held = held - 1", "held counts"),
    ],
)
async def test_books_check_catches_state_that_disagrees_with_the_charges(
    ledger_db: LedgerDB, tamper: str, undo: str, message: str
) -> None:
    """An exact sum that is not the sum of the charges applied to it (even with its floor kept right), or
    counts of a shard's state or held charges that differ from its document, are caught."""
    db = ledger_db
    customer = await db.customer()
    await db.service.assign_org("org-a", customer, LONG_AGO)
    await db.post(HOUR, item("org-a", 5, resource="app-1"), item("org-b", 3, resource="app-2"))
    await assert_books_hold(db.pool)
    async with db.pool.acquire() as conn:
        await conn.execute(tamper)
    with pytest.raises(AssertionError, match=message):
        await assert_books_hold(db.pool)
    async with db.pool.acquire() as conn:
        await conn.execute(undo)
