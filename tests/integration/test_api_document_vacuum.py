"""The api's per-resource day documents are rewritten whole each time an hour of the day is attributed. A
burst of hours (a backfill, a re-rating) must not leave their dead copies in the table's file for good: the
projector vacuums the table after a few megabytes of rewrites, so the next rewrites reuse the space, and the
table stays within a few times the size of what it holds. The usage it answers is unchanged by that."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any

import asyncpg
import pytest

from services.api import repository as repo
from services.api.projector import Projector
from tests.support.api_db import api_pool
from tests.support.api_factories import batches, charge, txn

pytestmark = pytest.mark.integration

CUSTOMER = uuid.UUID(int=0xC1)
DAY_START = datetime(2026, 11, 2, 5, tzinfo=UTC)  # Nov 2, 00:00 EST
RESOURCES = [str(uuid.UUID(int=(i + 1) * 0x9E3779B97F4A7C15 % (1 << 128))) for i in range(400)]


@pytest.fixture
async def pool(database: Any) -> AsyncIterator[asyncpg.Pool]:
    async with api_pool(database, max_size=2) as p:
        yield p


async def _sizes(pool: asyncpg.Pool) -> tuple[int, int]:
    """(bytes of the table's TOAST, where its documents are stored; bytes of the documents it holds)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT pg_relation_size((SELECT reltoastrelid FROM pg_class WHERE oid = 'usage_resource_day'::regclass))
                      AS file,
                      (SELECT sum(pg_column_size(items)) FROM usage_resource_day) AS live"""
        )
    return int(row["file"]), int(row["live"])


async def test_a_day_attributed_hour_by_hour_keeps_its_documents_table_small(pool: asyncpg.Pool) -> None:
    projector = Projector(pool, vacuum_after_bytes=64 << 10)  # about every second rewrite of the document
    hours = [DAY_START + timedelta(hours=i) for i in range(24)]
    await projector.apply_ledger(
        [txn(CUSTOMER, "usage", 1, occurred_at=h, reading_hour=h, orgs=["org-a"]) for h in hours]
    )
    for h in hours:  # each hour rewrites the day's document (400 resources: several TOAST chunks)
        items = [charge(h, rid, org="org-a", value=i + 1, amount=Fraction(i + 1, 3)) for i, rid in enumerate(RESOURCES)]
        await projector.apply_charges(batches(items))
        await projector.vacuumed()  # in the background: let it finish before the next hour, as a steady load does
    file, live = await _sizes(pool)
    assert live > 8 << 10, "the document should be big enough to be stored out of line"
    # 24 rewrites kept as dead copies would be 24 times the document; vacuumed, a few times it.
    assert file <= 6 * live, (file, live)

    async with pool.acquire() as conn:
        (row,) = [
            r for r in await repo.usage_page(
                conn, CUSTOMER, granularity="day", dim="meter", first=date(2026, 11, 2), stop=date(2026, 11, 3),
                after=None, limit=10,
            )
        ]
    assert row.values == {"MB": 24 * sum(range(1, 401))}
    assert row.amount == Fraction(24 * sum(range(1, 401)), 3)
