"""Each service's schema, migrations and role on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from shared.db import MigrationError, migrate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("collector", "pricer", "ledger", "api")


@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_create_the_schema_and_are_a_noop_the_second_time(database, service):
    directory = ROOT / "services" / service / "migrations"
    files = sorted(p.stem for p in directory.glob("*.sql"))
    conn = await asyncpg.connect(database.dsn(service))
    try:
        first = await migrate(conn, service, directory)
        assert first == files
        tables_after_first = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", service
        )
        second = await migrate(conn, service, directory)
        assert second == []
        tables_after_second = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", service
        )
        assert tables_after_first == tables_after_second
        assert "schema_migrations" in [r["table_name"] for r in tables_after_first]
        # every schema has the command tables, written once in shared/sql/commands.sql and included
        assert {"audit_log", "idempotency_keys"} <= {r["table_name"] for r in tables_after_first}
        recorded = await conn.fetch(f"SELECT version FROM {service}.schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == files
    finally:
        await conn.close()


async def test_concurrent_migrators_apply_each_migration_once(database, tmp_path):
    (tmp_path / "001_counter.sql").write_text("CREATE TABLE counter (n int); INSERT INTO counter VALUES (1);")
    conns = [await asyncpg.connect(database.dsn("pricer")) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, "pricer", tmp_path) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 0, 1]
        assert await conns[0].fetchval("SELECT count(*) FROM pricer.counter") == 1
    finally:
        for c in conns:
            await c.close()


async def test_a_changed_applied_migration_is_refused(database, tmp_path):
    path = tmp_path / "001_t.sql"
    path.write_text("CREATE TABLE t (n int);")
    conn = await asyncpg.connect(database.dsn("ledger"))
    try:
        await migrate(conn, "ledger", tmp_path)
        path.write_text("CREATE TABLE t (n bigint);")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, "ledger", tmp_path)
    finally:
        await conn.close()


async def test_an_applied_migration_that_moves_its_ddl_into_an_include_is_unchanged(database, tmp_path, monkeypatch):
    ddl = "CREATE TABLE shared_t (n int);\n"
    (tmp_path / "001_t.sql").write_text("-- the service's own words\n" + ddl)
    conn = await asyncpg.connect(database.dsn("ledger"))
    try:
        assert await migrate(conn, "ledger", tmp_path) == ["001_t"]
        included = tmp_path / "sql"
        included.mkdir()
        (included / "t.sql").write_text(ddl)
        monkeypatch.setattr("shared.db.SHARED_SQL", included)
        (tmp_path / "001_t.sql").write_text("-- the service's own words\n-- include: t.sql\n")
        assert await migrate(conn, "ledger", tmp_path) == []  # the same text once included: not a change
        (included / "t.sql").write_text("CREATE TABLE shared_t (n bigint);\n")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, "ledger", tmp_path)
    finally:
        await conn.close()


@pytest.mark.parametrize("role", SERVICES)
async def test_each_role_is_denied_every_other_schema(database, role):
    owner = await asyncpg.connect(database.dsn("ledger"))
    try:
        await owner.execute("CREATE TABLE IF NOT EXISTS ledger.secret (n int)")
    finally:
        await owner.close()
    # Every schema gets one table its owner made, to try to read and write.
    for other in SERVICES:
        c = await asyncpg.connect(database.dsn(other))
        try:
            await c.execute(f"CREATE TABLE IF NOT EXISTS {other}.probe (n int)")
        finally:
            await c.close()
    conn = await asyncpg.connect(database.dsn(role))
    try:
        for other in SERVICES:
            if other == role:
                await conn.execute(f"INSERT INTO {other}.probe VALUES (1)")
                continue
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for schema"):
                await conn.fetch(f"SELECT * FROM {other}.probe")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for schema"):
                await conn.execute(f"INSERT INTO {other}.probe VALUES (1)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f"CREATE TABLE {other}.intruder (n int)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.intruder (n int)")
    finally:
        await conn.close()


async def test_collector_role_gets_permission_denied_on_the_ledger_schema(database):
    conn = await asyncpg.connect(database.dsn("collector"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for schema ledger"):
            await conn.fetch("SELECT * FROM ledger.schema_migrations")
    finally:
        await conn.close()
