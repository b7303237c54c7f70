"""Fixtures and helpers the ledger's integration tests share (imported by the test_ledger_* modules), and
the accounting checks every ledger test ends with.

``ledger_db``: the ledger's schema migrated in a fresh database, a pool on it, and a ``LedgerService`` whose
clock the test can move. At teardown it asserts the invariants of the whole book: the sum of every
account's signed balance is zero (the accounting equation), each account's balance equals the sum of its
entries, every transaction is balanced with two or more entries, and each (customer, month, price) posted
figure is floor(its exact sum).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import asyncpg
import pytest

from services.ledger.app import MIGRATIONS
from services.ledger.service import LedgerService
from services.ledger.settings import LedgerSettings
from shared import ids
from shared.contracts import ChargeComputed
from shared.db import create_pool, migrate

PRICE_A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
PRICE_B = uuid.UUID("00000000-0000-4000-8000-00000000000b")
LONG_AGO = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class Clock:
    """A settable clock for the service (real time unless a test sets ``now``)."""

    now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now or datetime.now(UTC)


@dataclass
class LedgerDB:
    pool: asyncpg.Pool
    service: LedgerService
    clock: Clock
    settings: LedgerSettings
    dsn: str
    made: dict[str, Any] = field(default_factory=dict)

    async def tier(self, credits: int = 1_000_000) -> str:
        name = f"tier-{uuid.uuid4().hex[:8]}"
        await self.service.create_tier(name, credits)
        return name

    async def customer(self, name: str = "Agency", tier: str | None = None) -> uuid.UUID:
        tier = tier or await self.tier()
        return (await self.service.create_customer(name, tier)).body["id"]  # type: ignore[no-any-return]

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(sql, *args)


def charge(
    org_id: str,
    hour: datetime,
    amount: Fraction | int,
    *,
    resource: str = "app-1",
    revision: int = 1,
    price_id: uuid.UUID | None = PRICE_A,
    meter: str = "cfapps",
    kind: str = "",
) -> ChargeComputed:
    amount = Fraction(amount)
    mid = ids.measurement_id(hour, meter, resource)
    return ChargeComputed(
        id=ids.charge_id(mid, revision),
        measurement_id=mid,
        revision=revision,
        reading_hour=hour,
        meter=meter,
        resource_id=resource,
        resource_kind=kind,
        org_id=org_id,
        value=1,
        unit="MB",
        status="priced" if price_id is not None else "unpriced",
        price_id=price_id,
        amount_numerator=amount.numerator,
        amount_denominator=amount.denominator,
        display_amount="0",
        priced_at=hour,
    )


async def posted_by_group(db: LedgerDB, customers: list[uuid.UUID]) -> dict[tuple[uuid.UUID, str, uuid.UUID | None], int]:
    """Microcredits posted per (customer, billing month YYYY-MM, price), from the transactions' usage lines."""
    rows = await db.fetch(
        """SELECT t.customer_id, to_char(u.month, 'YYYY-MM') AS month, u.price_id, sum(u.microcredits)::bigint AS mc
             FROM usage_lines u JOIN transactions t ON t.id = u.transaction_id
            WHERE t.customer_id = ANY($1::uuid[])
            GROUP BY 1, 2, 3""",
        customers,
    )
    return {(r["customer_id"], r["month"], r["price_id"]): r["mc"] for r in rows if r["mc"] != 0}


async def remaining(db: LedgerDB, customer_id: uuid.UUID) -> int:
    """Remaining credits from the accounts: pools minus overage (normal sides)."""
    return int(
        await db.fetchval(
            """SELECT coalesce(sum(CASE WHEN type = 'credit_pool' THEN -balance
                                        WHEN type = 'overage' THEN -balance ELSE 0 END), 0)
                 FROM accounts WHERE customer_id = $1""",
            customer_id,
        )
    )


async def assert_books_hold(pool: asyncpg.Pool) -> None:
    """The invariants of the whole ledger, computed from the raw rows."""
    async with pool.acquire() as conn:
        total = await conn.fetchval("SELECT coalesce(sum(balance), 0) FROM accounts")
        assert total == 0, f"accounting equation broken: sum of signed balances is {total}"
        drift = await conn.fetch(
            """SELECT a.id, a.balance, coalesce(sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END), 0) AS s
                 FROM accounts a LEFT JOIN entries e ON e.account_id = a.id
                GROUP BY a.id HAVING a.balance <> coalesce(sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END), 0)"""
        )
        assert drift == [], f"account balances differ from their entries: {drift}"
        unbalanced = await conn.fetch(
            """SELECT t.id, count(e.*) AS n, coalesce(sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END), 0) AS s
                 FROM transactions t LEFT JOIN entries e ON e.transaction_id = t.id
                GROUP BY t.id HAVING count(e.*) < 2 OR coalesce(sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END), 0) <> 0"""
        )
        assert unbalanced == [], f"unbalanced transactions: {unbalanced}"
        # Usage lines of a transaction add up to its usage-account movement (credits minus debits).
        mismatched = await conn.fetch(
            """WITH lines AS (SELECT transaction_id, sum(microcredits) AS s FROM usage_lines GROUP BY 1),
                    moves AS (SELECT e.transaction_id, sum(CASE WHEN e.side = 'credit' THEN e.amount ELSE -e.amount END) AS s
                                FROM entries e JOIN accounts a ON a.id = e.account_id AND a.type = 'usage' GROUP BY 1)
               SELECT coalesce(l.transaction_id, m.transaction_id) AS id, l.s AS lines, m.s AS moves
                 FROM lines l FULL JOIN moves m ON m.transaction_id = l.transaction_id
                WHERE coalesce(l.s, 0) <> coalesce(m.s, 0)"""
        )
        assert mismatched == [], f"usage lines differ from usage movements: {mismatched}"
        groups = await conn.fetch("SELECT sum_num, sum_den, posted FROM month_usage")
        for g in groups:
            exact = Fraction(int(g["sum_num"]), int(g["sum_den"]))
            assert g["posted"] == exact.numerator // exact.denominator


@pytest.fixture
async def ledger_db(database: Any) -> AsyncIterator[LedgerDB]:
    dsn = database.dsn("ledger")
    pool = await create_pool(dsn, "ledger", max_size=6)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "ledger", MIGRATIONS)
        clock = Clock()
        settings = LedgerSettings(database_url=dsn, port=8083, settlement_delay_hours=48, month_close_delay_hours=96)
        yield LedgerDB(pool, LedgerService(pool, settings, clock), clock, settings, dsn)
        await assert_books_hold(pool)
    finally:
        await pool.close()


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete a test's prefixed topic set (each holds 12 partitions: a shared broker runs out of file
    handles when every test leaves its topics behind)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from shared.topics import ALL_TOPICS

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([prefix + t for t in ALL_TOPICS])
    except Exception:  # best effort: a topic already gone is fine
        pass
    finally:
        await admin.close()


@pytest.fixture
async def ledger_topics(infra: Any, topic_prefix: str) -> AsyncIterator[str]:
    """``topic_prefix``, deleted after the test."""
    try:
        yield topic_prefix
    finally:
        await delete_topics(infra.kafka, topic_prefix)
