"""The harness the api's integration tests share: the real api app (its lifespan: pool, migrations,
producer, consumers) on a fresh database and fresh topics, a local OIDC issuer on a random port, and a
publisher for feeding the topics as the pricer and the ledger do (charges batches keyed by their shard).
(The factories of contract messages are in tests/support/api_factories.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from services.api.app import create_app
from services.api.projector import Projector
from services.api.settings import ApiSettings
from shared.batches import Charges
from shared.contracts import StatementIssued, TransactionPosted
from shared.kafka import Outgoing, Publisher, encode, group_lag
from shared.topics import CHARGES, TRANSACTIONS, dlq
from tests.conftest import Database, Infra
from tests.support.api_factories import outgoing
from tests.support.tokens import LocalIssuer, serve_issuer


@dataclass
class ApiHarness:
    client: httpx.AsyncClient
    issuer: LocalIssuer
    settings: ApiSettings
    publisher: Publisher
    admin_dsn: str
    app: Any = None

    def headers(
        self, scopes: Sequence[str] = ("usage.read",), customers: Sequence[str] = (), **kw: Any
    ) -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(scopes=scopes, customers=customers, **kw)}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.headers(scopes=["usage.admin"], sub="admin-1")

    async def publish_charges(self, charges: Sequence[Charges]) -> None:
        """Publish charges batches (``api_factories.batches``) to the charges topic, keyed by shard."""
        await self.publisher.publish(self.settings.topic(CHARGES), [outgoing(c) for c in charges])

    async def project(
        self, charges: Sequence[Charges] = (), ledger: Sequence[TransactionPosted | StatementIssued] = ()
    ) -> None:
        """Apply charges batches, then ledger messages, to the read model through a Projector of its own on
        the app's pool: what the api's consumers do with them, without the round trip through Kafka."""
        p = Projector(self.app.state.api.runtime.pool)
        await p.apply_charges(list(charges))
        await p.apply_ledger(list(ledger))

    async def publish_ledger(self, messages: Sequence[TransactionPosted | StatementIssued]) -> None:
        await self.publisher.publish(
            self.settings.topic(TRANSACTIONS), [Outgoing(str(m.customer_id).encode(), encode(m)) for m in messages]
        )

    async def sql(self, query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.admin_dsn, server_settings={"search_path": "api"})
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    async def until(self, check: Callable[[], Awaitable[bool]], what: str, timeout: float = 45) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await check():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    async def caught_up(self) -> None:
        """Wait until the api's consumer group has committed everything on both topics."""
        topics = [self.settings.topic(CHARGES), self.settings.topic(TRANSACTIONS)]

        async def check() -> bool:
            servers, group = self.settings.kafka_bootstrap_servers, self.settings.topic("api")
            lags = [await group_lag(servers, group, t) for t in topics]
            return sum(lags) == 0

        await self.until(check, "the api's consumers to catch up")

    async def until_count(self, table: str, n: int) -> None:
        async def check() -> bool:
            return int(await self.sql(f"SELECT count(*) FROM api.{table}")) >= n

        await self.until(check, f"{n} rows in api.{table}")

    async def dead_letters(self, topic: str, expected: int, timeout: float = 10) -> list[ConsumerRecord[bytes, bytes]]:
        """The records of ``topic``'s DLQ (``topic`` unprefixed), read from its beginning: at least
        ``expected`` of them, then whatever else comes within a second."""
        consumer = AIOKafkaConsumer(
            dlq(self.settings.topic(topic)), bootstrap_servers=self.settings.kafka_bootstrap_servers,
            auto_offset_reset="earliest", group_id=None, enable_auto_commit=False,
        )
        await consumer.start()
        records: list[ConsumerRecord[bytes, bytes]] = []
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while len(records) < expected and asyncio.get_running_loop().time() < deadline:
                got = await consumer.getmany(timeout_ms=500)
                records.extend(r for rs in got.values() for r in rs)
            got = await consumer.getmany(timeout_ms=1000)
            records.extend(r for rs in got.values() for r in rs)
        finally:
            await consumer.stop()
        return records


@contextlib.asynccontextmanager
async def running_api(
    infra: Infra, database: Database, topic_prefix: str, issuer: LocalIssuer | None = None, **overrides: Any
) -> AsyncIterator[ApiHarness]:
    """The api app, lifespan started, with a local issuer of its own (or ``issuer``, already served, when the
    owners it forwards to verify tokens of the same issuer); ``overrides`` go to its settings."""
    async with contextlib.AsyncExitStack() as stack:
        if issuer is None:
            issuer = await stack.enter_async_context(serve_issuer(LocalIssuer()))
        options: dict[str, Any] = {
            "database_url": database.dsn("api"),
            "kafka_bootstrap_servers": infra.kafka,
            "topic_prefix": topic_prefix,
            "port": 0,
            "oidc_issuer": issuer.url,
            "batch_timeout_ms": 50,
            "jwks_refetch_min_interval_seconds": 0.5,
            "query_cache_seconds": 0,  # tests see every change at once; test_api_cache turns it on
            # nothing listens on port 9: admin forwarding answers 502 unless a test points these elsewhere
            "ledger_url": "http://127.0.0.1:9",
            "pricer_url": "http://127.0.0.1:9",
            "collector_url": "http://127.0.0.1:9",
        }
        settings = ApiSettings(**(options | overrides))
        app = create_app(settings)
        publisher = Publisher(infra.kafka, client_id="api-test")
        await publisher.start()
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
                    yield ApiHarness(client, issuer, settings, publisher, database.admin_dsn, app)
        finally:
            await publisher.stop()


@pytest.fixture
async def harness(infra: Infra, database: Database, topic_prefix: str) -> AsyncIterator[ApiHarness]:
    async with running_api(infra, database, topic_prefix) as h:
        yield h
