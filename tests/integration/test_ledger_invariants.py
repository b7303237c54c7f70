"""PostgreSQL itself enforces the ledger's invariants: raw SQL that breaks them is refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from services.ledger.repository import USAGE_LINE_COLUMNS
from tests.support.ledger import LedgerDB, item, ledger_db, resources_of_shard  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

AT = datetime(2026, 5, 1, tzinfo=UTC)


async def _accounts(db: LedgerDB, customer: uuid.UUID) -> dict[str, int]:
    return {
        r["name"]: r["id"] for r in await db.fetch("SELECT id, name FROM accounts WHERE customer_id = $1", customer)
    }


async def _insert_transaction(
    conn: asyncpg.Connection, customer: uuid.UUID, key: str, entries: list[tuple[int, str, int]]
) -> uuid.UUID:
    tid = uuid.uuid4()
    await conn.execute(
        """INSERT INTO transactions (id, customer_id, type, occurred_at, idempotency_key)
           VALUES ($1, $2, 'funding', $3, $4)""",
        tid,
        customer,
        AT,
        key,
    )
    for account, side, amount in entries:
        await conn.execute(
            "INSERT INTO entries (transaction_id, account_id, side, amount) VALUES ($1, $2, $3, $4)",
            tid,
            account,
            side,
            amount,
        )
    return tid


async def test_an_unbalanced_transaction_is_refused_at_commit(ledger_db: LedgerDB) -> None:
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    async with ledger_db.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        # Accepted statement by statement: the check is deferred to the commit.
        await _insert_transaction(
            conn, customer, "unbalanced", [(acc["funding"], "debit", 100), (acc["expired"], "credit", 99)]
        )
        with pytest.raises(asyncpg.CheckViolationError, match="unbalanced"):
            await tx.commit()
        # A failed commit has rolled back; asyncpg's transaction object needs no rollback now.
    assert await ledger_db.fetchval("SELECT count(*) FROM transactions WHERE idempotency_key = 'unbalanced'") == 0


async def test_a_transaction_with_fewer_than_two_entries_is_refused(ledger_db: LedgerDB) -> None:
    customer = await ledger_db.customer()
    async with ledger_db.pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="at least two"):
            async with conn.transaction():
                await _insert_transaction(conn, customer, "no-entries", [])
        with pytest.raises(asyncpg.CheckViolationError, match="at least two"):
            async with conn.transaction():
                acc = await _accounts(ledger_db, customer)
                # One entry of zero would be balanced; zero is refused by the amount check first, so one
                # positive entry stands for "a single entry".
                await _insert_transaction(conn, customer, "one-entry", [(acc["funding"], "debit", 1)])


async def test_an_entry_added_later_to_a_committed_transaction_must_keep_it_balanced(ledger_db: LedgerDB) -> None:
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    async with ledger_db.pool.acquire() as conn:
        async with conn.transaction():
            tid = await _insert_transaction(
                conn, customer, "ok", [(acc["funding"], "debit", 5), (acc["expired"], "credit", 5)]
            )
        with pytest.raises(asyncpg.CheckViolationError, match="unbalanced"):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO entries (transaction_id, account_id, side, amount) VALUES ($1, $2, 'debit', 7)",
                    tid,
                    acc["overage"],
                )


async def test_a_balanced_transaction_commits_and_moves_the_balances(ledger_db: LedgerDB) -> None:
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    async with ledger_db.pool.acquire() as conn, conn.transaction():
        await _insert_transaction(
            conn, customer, "fine", [(acc["funding"], "debit", 40), (acc["expired"], "credit", 40)]
        )
    balances = {
        r["name"]: r["balance"]
        for r in await ledger_db.fetch("SELECT name, balance FROM accounts WHERE customer_id = $1", customer)
    }
    assert balances["funding"] == 40 and balances["expired"] == -40


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE entries SET amount = amount + 1",
        "UPDATE entries SET side = 'credit' WHERE side = 'debit'",
        "DELETE FROM entries",
        "TRUNCATE entries CASCADE",
        "UPDATE transactions SET description = 'changed'",
        "DELETE FROM transactions",
        "TRUNCATE transactions CASCADE",
        "UPDATE usage_lines SET microcredits = 1",
        "DELETE FROM usage_lines",
    ],
)
async def test_entries_transactions_and_usage_lines_cannot_be_changed(ledger_db: LedgerDB, statement: str) -> None:
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    async with ledger_db.pool.acquire() as conn:
        async with conn.transaction():
            tid = await _insert_transaction(
                conn, customer, "kept", [(acc["funding"], "debit", 5), (acc["usage"], "credit", 5)]
            )
            await conn.execute(
                """INSERT INTO usage_lines (transaction_id, org_id, meter, resource_kind, month, microcredits)
                   VALUES ($1, 'o', 'cfapps', '', '2026-05-01', 5)""",
                tid,
            )
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
            await conn.execute(statement)
    assert await ledger_db.fetchval("SELECT count(*) FROM entries WHERE transaction_id = $1", tid) == 2
    assert await ledger_db.fetchval("SELECT sum(amount) FROM entries WHERE transaction_id = $1", tid) == 10


async def test_a_usage_line_needs_its_transaction(ledger_db: LedgerDB) -> None:
    """The reference of usage lines to their transaction, checked once per statement (migration 005): a
    statement with one line of an unknown transaction is refused whole, and lines of a known one go in."""
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    insert = """INSERT INTO usage_lines (transaction_id, org_id, meter, resource_kind, month, microcredits)
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::date[], $6::bigint[])"""
    month = datetime(2026, 5, 1, tzinfo=UTC).date()
    async with ledger_db.pool.acquire() as conn:
        async with conn.transaction():
            tid = await _insert_transaction(
                conn, customer, "lines", [(acc["funding"], "debit", 5), (acc["usage"], "credit", 5)]
            )
        unknown = uuid.uuid4()
        with pytest.raises(asyncpg.ForeignKeyViolationError, match=str(unknown)):
            await conn.execute(insert, [tid, unknown], ["o", "o"], ["cfapps"] * 2, ["", ""], [month] * 2, [2, 3])
        with pytest.raises(asyncpg.ForeignKeyViolationError, match=str(unknown)):  # COPY, as the ledger writes
            await conn.copy_records_to_table(
                "usage_lines", records=[(unknown, "o", "cfapps", "", None, month, 2)], columns=USAGE_LINE_COLUMNS
            )
        await conn.execute(insert, [tid, tid], ["o", "p"], ["cfapps"] * 2, ["", ""], [month] * 2, [2, 1])
        await conn.copy_records_to_table(  # the lines sum to the transaction's usage movement, 5
            "usage_lines", records=[(tid, "q", "cfapps", "", None, month, 2)], columns=USAGE_LINE_COLUMNS
        )
    assert await ledger_db.fetchval("SELECT count(*) FROM usage_lines WHERE transaction_id = $1", tid) == 3


async def test_a_duplicate_idempotency_key_is_refused(ledger_db: LedgerDB) -> None:
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    async with ledger_db.pool.acquire() as conn:
        async with conn.transaction():
            await _insert_transaction(
                conn, customer, "same-key", [(acc["funding"], "debit", 5), (acc["expired"], "credit", 5)]
            )
        with pytest.raises(asyncpg.UniqueViolationError, match="idempotency_key"):
            async with conn.transaction():
                await _insert_transaction(
                    conn, customer, "same-key", [(acc["funding"], "debit", 5), (acc["expired"], "credit", 5)]
                )


@pytest.mark.parametrize("amount", [0, -5])
async def test_entry_amounts_must_be_positive(ledger_db: LedgerDB, amount: int) -> None:
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    async with ledger_db.pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="amount"):
            async with conn.transaction():
                await _insert_transaction(
                    conn,
                    customer,
                    f"amount{amount}",
                    [(acc["funding"], "debit", amount), (acc["expired"], "credit", amount)],
                )


async def test_a_transaction_is_reversed_at_most_once(ledger_db: LedgerDB) -> None:
    customer = await ledger_db.customer()
    acc = await _accounts(ledger_db, customer)
    async with ledger_db.pool.acquire() as conn:
        async with conn.transaction():
            tid = await _insert_transaction(
                conn, customer, "orig", [(acc["funding"], "debit", 5), (acc["expired"], "credit", 5)]
            )

        async def reversal(key: str) -> None:
            rid = uuid.uuid4()
            await conn.execute(
                """INSERT INTO transactions (id, customer_id, type, occurred_at, idempotency_key, reverses)
                   VALUES ($1, $2, 'reversal', $3, $4, $5)""",
                rid,
                customer,
                AT,
                key,
                tid,
            )
            await conn.execute(
                """INSERT INTO entries (transaction_id, account_id, side, amount)
                   VALUES ($1, $2, 'credit', 5), ($1, $3, 'debit', 5)""",
                rid,
                acc["funding"],
                acc["expired"],
            )

        async with conn.transaction():
            await reversal("rev-1")
        with pytest.raises(asyncpg.UniqueViolationError, match="reverses"):
            async with conn.transaction():
                await reversal("rev-2")


async def test_the_posted_figure_must_be_the_floor_of_the_exact_sum(ledger_db: LedgerDB) -> None:
    customer = await ledger_db.customer()
    async with ledger_db.pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="month_usage"):
            await conn.execute(
                """INSERT INTO month_usage (customer_id, month, price_id, sum_num, sum_den, posted)
                   VALUES ($1, '2026-05-01', $2, 7, 2, 4)""",
                customer,
                uuid.uuid4(),
            )
        # The floor is accepted (rolled back: no charge is applied to this made-up sum, which the books
        # check at teardown would report).
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            """INSERT INTO month_usage (customer_id, month, price_id, sum_num, sum_den, posted)
               VALUES ($1, '2026-05-01', $2, 7, 2, 3)""",
            customer,
            uuid.uuid4(),
        )
        assert await conn.fetchval("SELECT posted FROM month_usage WHERE customer_id = $1", customer) == 3
        await tx.rollback()


async def test_held_charges_are_paged_in_code_point_order_whatever_the_collation(ledger_db: LedgerDB) -> None:
    """The held list compares its cursor in Python: the database must order the same way even where its
    collation does not (en-US puts "org-a" before "org-B"; code points the other way round)."""
    async with ledger_db.pool.acquire() as conn:
        await conn.execute('ALTER TABLE held_shards ALTER COLUMN org_id TYPE text COLLATE "en-US-x-icu"')
        await conn.execute('ALTER TABLE held_shards ALTER COLUMN meter TYPE text COLLATE "en-US-x-icu"')
    hour = datetime(2026, 6, 1, 12, tzinfo=UTC)
    found = resources_of_shard(3, 6)
    resources = {"org-a": found[:3], "org-B": found[3:]}
    await ledger_db.post(hour, *(item(org, 5, resource=r) for org, rs in resources.items() for r in rs))
    listed: list[tuple[str, str]] = []
    after = None
    while True:
        page = await ledger_db.service.list_held(after, 3)
        listed += [(h["org_id"], h["resource_id"]) for h in page.items]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert listed == sorted((org, r) for org, rs in resources.items() for r in rs)
    assert listed[0][0] == "org-B"
