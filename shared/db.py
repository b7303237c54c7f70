"""PostgreSQL: one asyncpg pool per service, and the versioned SQL migrations it applies at start.

Migrations are plain ``NNN_name.sql`` files in ``services/<name>/migrations/``, applied in order, each
recorded with its checksum in ``<schema>.schema_migrations``, all under a transaction-scoped advisory lock
so that several instances starting at once apply them once. A small runner rather than yoyo or alembic:
those drive psycopg or SQLAlchemy, and the services speak only asyncpg; this needs no second driver.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "OUT_OF_RANGE_TEXT",
    "SHARED_SQL",
    "Conn",
    "MigrationError",
    "create_pool",
    "migrate",
    "out_of_range",
    "ping",
    "read_migration",
]

#: What the repositories work on: a connection taken from a pool (``pool.acquire()`` hands out a proxy, not an
#: ``asyncpg.Connection``) or a plain one (``asyncpg.connect``).
Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy

log = logging.getLogger(__name__)

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


#: What an amount out of range is told as, at the HTTP edge and in a DLQ reason.
OUT_OF_RANGE_TEXT = (
    "amounts out of range: this would take a number past the largest the database holds (a bigint, "
    "2**63 - 1; a balance, a month's total for a price or a usage line); nothing of it was stored"
)


def out_of_range(exc: BaseException) -> bool:
    """Whether ``exc`` is an integer too large for where it is stored: PostgreSQL's own (a sum past a bigint,
    SQLSTATE 22003), asyncpg's, refusing a Python int that does not fit int64 before it is sent, or orjson's,
    refusing one past 64 bits in a stored JSON document (the api's exact sums)."""
    if isinstance(exc, asyncpg.NumericValueOutOfRangeError):
        return True
    if isinstance(exc, TypeError):
        return "Integer exceeds 64-bit range" in str(exc)
    refused = (asyncpg.DataError, asyncpg.exceptions._base.DataError)
    return isinstance(exc, refused) and "out of int64 range" in str(exc)


class MigrationError(RuntimeError):
    """A migration could not be applied, or an applied one was changed afterwards."""


async def create_pool(dsn: str, schema: str, min_size: int = 1, max_size: int = 8) -> asyncpg.Pool:
    """A pool whose connections work in ``schema`` and in UTC."""
    if not _IDENT.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": schema, "timezone": "UTC", "application_name": f"billing-{schema}"},
        command_timeout=60,
    )


async def ping(pool: asyncpg.Pool) -> None:
    async with pool.acquire(timeout=2) as conn:
        await conn.fetchval("SELECT 1", timeout=2)


SHARED_SQL = Path(__file__).parent / "sql"
_INCLUDE = re.compile(r"^-- include: ([a-z0-9_]+\.sql)\n", re.MULTILINE)


def read_migration(path: Path) -> str:
    """A migration's SQL, with each line ``-- include: <name>.sql`` replaced by the text of ``shared/sql/<name>.sql``
    (DDL every service's schema has, written once). The checksum is of this text, so a migration that moves
    its DDL into an include, unchanged, is not a changed migration."""
    return _INCLUDE.sub(lambda m: (SHARED_SQL / m.group(1)).read_text(), path.read_text())


async def migrate(conn: Conn, schema: str, directory: Path) -> list[str]:
    """Apply the migrations in ``directory`` not yet applied to ``schema``; returns their versions."""
    if not _IDENT.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    files = sorted(directory.glob("*.sql"))
    applied_now: list[str] = []
    async with conn.transaction():
        # One migrator per schema at a time, held until this transaction ends.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"billing-migrate:{schema}")
        await conn.execute(f"SET LOCAL search_path = {schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                   version text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch(f"SELECT version, checksum FROM {schema}.schema_migrations")
        }
        for path in files:
            version = path.stem
            sql = read_migration(path)
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if version in done:
                if done[version] != checksum:
                    raise MigrationError(f"migration {schema}/{version} changed after it was applied")
                continue
            try:
                await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {schema}/{version} failed: {exc}") from exc
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, checksum) VALUES ($1, $2)", version, checksum
            )
            applied_now.append(version)
    if applied_now:
        log.info("migrations applied", extra={"schema": schema, "versions": applied_now})
    return applied_now
