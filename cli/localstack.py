"""The local stack seen from tools that need a world of their own on it (the chaos run, the benchmarks):
a fresh database with the services' roles and schemas, a fresh topic set, free ports, and the scripts
that stop and start PostgreSQL and Kafka."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import asyncpg

from shared.topics import ensure_topics

__all__ = ["ADMIN_DSN", "KAFKA", "ROOT", "drop_database", "dsn", "free_port", "fresh_database", "fresh_topics", "infra"]

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_SQL = ROOT / "deploy" / "local" / "schemas.sql"
ADMIN_DSN = os.environ.get("BILLING_PG_ADMIN_DSN", "postgresql://billing_admin:billing_admin@127.0.0.1:5433/billing")
KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def dsn(database: str, role: str) -> str:
    """The DSN of a service's login role (deploy/local/schemas.sql) on ``database``."""
    return f"postgresql://{role}:{role}@127.0.0.1:5433/{database}"


def admin_dsn(database: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + f"/{database}"


async def fresh_database(prefix: str) -> str:
    """A new database named ``<prefix>_<random>`` with one schema per service, owned by its role."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(admin_dsn(name))
    try:
        await conn.execute(SCHEMAS_SQL.read_text())
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def fresh_topics(prefix: str = "bench") -> str:
    """Every topic of the design (and its DLQ) under a new prefix ``<prefix><random>.``; returns the prefix."""
    full = f"{prefix}{uuid.uuid4().hex[:8]}."
    await ensure_topics(KAFKA, prefix=full)
    return full


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def infra(script: str, action: str) -> None:
    """Run ``deploy/local/<script>.sh <action>`` (pg or kafka: stop, start, ...); raises on failure."""
    result = subprocess.run([str(ROOT / "deploy" / "local" / f"{script}.sh"), action], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{script}.sh {action} failed: {result.stderr.strip()[-2000:]}")
