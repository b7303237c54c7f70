"""The accounting checks every ledger test ends with (``assert_books_hold``, run by the ``ledger_db``
fixture's teardown, both in tests/support/ledger.py) are not vacuous."""

from __future__ import annotations

import pytest

from tests.support.ledger import LedgerDB, assert_books_hold, ledger_db  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


async def test_books_check_catches_a_broken_equation(ledger_db: LedgerDB) -> None:
    """The teardown check is not vacuous: a balance tampered with behind the ledger's back is caught."""
    customer = await ledger_db.customer()
    async with ledger_db.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance = 5 WHERE customer_id = $1 AND name = 'usage'", customer)
    with pytest.raises(AssertionError, match="accounting equation"):
        await assert_books_hold(ledger_db.pool)
    async with ledger_db.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance = 0 WHERE customer_id = $1 AND name = 'usage'", customer)
