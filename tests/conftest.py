"""Fixtures for the real infrastructure.

Integration and end-to-end tests use the Kafka and PostgreSQL named by the environment:
``KAFKA_BOOTSTRAP_SERVERS`` and ``BILLING_PG_ADMIN_DSN`` (a superuser DSN; ``make test`` sets both for the
local stack). When neither is named and a Docker engine answers, they are started with testcontainers.
Otherwise the run fails with a message saying how to start them: never a silent skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shared.topics import delete_topics, ensure_topics

# The shared fixtures and helpers in tests/support assert like the test modules do (their failures show the
# values compared): registered before any test module imports them.
pytest.register_assert_rewrite("tests.support")

from tests.support.tokens import LocalIssuer, serve_issuer  # noqa: E402  (after register_assert_rewrite)

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_SQL = ROOT / "deploy" / "local" / "schemas.sql"
SERVICES = ("collector", "pricer", "ledger", "api")

HOW_TO_START = (
    "Integration tests need a real Kafka and PostgreSQL. Start the local ones with `make infra-up` "
    "(or run `make test`, which does), or set KAFKA_BOOTSTRAP_SERVERS and BILLING_PG_ADMIN_DSN, "
    "or make a Docker engine reachable for testcontainers."
)


@dataclass(frozen=True)
class Infra:
    kafka: str
    pg_admin_dsn: str


def _docker_reachable() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env()
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means no engine to use
        return False


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    pg = os.environ.get("BILLING_PG_ADMIN_DSN")
    if kafka and pg:
        yield Infra(kafka, pg)
        return
    if not _docker_reachable():
        pytest.fail(HOW_TO_START, pytrace=False)
    from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]
    from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

    with (
        PostgresContainer("postgres:15", username="billing_admin", password="billing_admin", dbname="billing") as pgc,
        KafkaContainer("apache/kafka:4.1.1").with_kraft() as kc,
    ):
        yield Infra(kc.get_bootstrap_server(), pgc.get_connection_url(driver=None))


def dsn_with(dsn: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    u = user or parts.username or ""
    p = password if password is not None else (parts.password or "")
    netloc = f"{u}:{p}@{host}{port}" if p else f"{u}@{host}{port}"
    path = f"/{database}" if database else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


@dataclass(frozen=True)
class Database:
    """A fresh database on the test cluster with the four service roles and schemas."""

    name: str
    admin_dsn: str

    def dsn(self, role: str) -> str:
        """DSN of service role ``role`` (local password = role name) in this database."""
        return dsn_with(self.admin_dsn, user=role, password=role)


async def _create_database(admin_dsn: str) -> Database:
    name = f"billing_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    db_admin = dsn_with(admin_dsn, database=name)
    conn = await asyncpg.connect(db_admin)
    try:
        await conn.execute(SCHEMAS_SQL.read_text())
    finally:
        await conn.close()
    return Database(name, db_admin)


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[Database]:
    """A fresh database for one test, dropped afterwards."""
    db = await _create_database(infra.pg_admin_dsn)
    try:
        yield db
    finally:
        await _drop_database(infra.pg_admin_dsn, db.name)


@pytest.fixture(scope="session")
async def issuer() -> AsyncIterator[LocalIssuer]:
    """An OIDC issuer on a random local port for the whole run: the services under test verify the tokens
    of their internal routes against it (``<svc>_oidc_issuer=issuer.url``); ``issuer.bearer()`` is an
    admin's Authorization header."""
    async with serve_issuer(LocalIssuer()) as served:
        yield served


# Test topics have fewer partitions than the production ones (12) and are deleted after each test: a
# broker keeps files open per partition, and a test run creates hundreds of topics.
TEST_PARTITIONS = 4


@pytest.fixture
async def topic_prefix(infra: Infra) -> AsyncIterator[str]:
    """A fresh set of the design's topics for one test: ``KAFKA_TOPIC_PREFIX`` for its services."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    await ensure_topics(infra.kafka, prefix=prefix, partitions=TEST_PARTITIONS)
    yield prefix
    await delete_topics(infra.kafka, prefix=prefix)


@pytest.fixture
async def make_topic(infra: Infra) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Create a uniquely named topic (and its .dlq) for one test."""
    made: list[str] = []

    async def make(partitions: int = 3) -> str:
        name = f"test.{uuid.uuid4().hex[:12]}"
        await ensure_topics(infra.kafka, topics=(name, name + ".dlq"), partitions=partitions)
        made.extend((name, name + ".dlq"))
        return name

    yield make
    if made:
        await delete_topics(infra.kafka, names=tuple(made))
