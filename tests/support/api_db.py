"""The api's schema migrated in a test's fresh database, and a pool on it as the api's role."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from shared.db import create_pool, migrate

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "api" / "migrations"


@contextlib.asynccontextmanager
async def api_pool(database: Any, max_size: int = 4) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database.dsn("api"), "api", max_size=max_size)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "api", MIGRATIONS)
        yield pool
    finally:
        await pool.close()
