"""The harness the api's integration tests share: the real api app (its lifespan: pool, migrations,
producer, consumers) on a fresh database and fresh topics, a local OIDC issuer on a random port, and a
publisher for feeding the topics. (The factories of contract messages are in tests/support/api_factories.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from services.api.app import create_app
from services.api.settings import ApiSettings
from shared.contracts import ChargeComputed, StatementIssued, TransactionPosted
from shared.kafka import Outgoing, Publisher, encode, group_lag
from shared.topics import CHARGES, TRANSACTIONS
from tests.support.tokens import LocalIssuer, serve_issuer


@dataclass
class ApiHarness:
    client: httpx.AsyncClient
    issuer: LocalIssuer
    settings: ApiSettings
    publisher: Publisher
    admin_dsn: str
    app: Any = None

    def headers(self, scopes: Sequence[str] = ("usage.read",), customers: Sequence[str] = (), **kw: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(scopes=scopes, customers=customers, **kw)}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.headers(scopes=["usage.admin"], sub="admin-1")

    async def publish_charges(self, charges: Sequence[ChargeComputed]) -> None:
        await self.publisher.publish(
            self.settings.topic(CHARGES), [Outgoing(c.org_id.encode(), encode(c)) for c in charges]
        )

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
            lags = [await group_lag(self.settings.kafka_bootstrap_servers, self.settings.topic("api"), t) for t in topics]
            return sum(lags) == 0

        await self.until(check, "the api's consumers to catch up")

    async def until_count(self, table: str, n: int) -> None:
        async def check() -> bool:
            return int(await self.sql(f"SELECT count(*) FROM api.{table}")) >= n

        await self.until(check, f"{n} rows in api.{table}")


@contextlib.asynccontextmanager
async def running_api(infra: Any, database: Any, topic_prefix: str, **overrides: Any) -> AsyncIterator[ApiHarness]:
    """The api app, lifespan started, with a local issuer; ``overrides`` go to its settings."""
    async with serve_issuer(LocalIssuer()) as issuer:
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
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
                    yield ApiHarness(client, issuer, settings, publisher, database.admin_dsn, app)
        finally:
            await publisher.stop()


@pytest.fixture
async def harness(infra, database, topic_prefix) -> AsyncIterator[ApiHarness]:
    async with running_api(infra, database, topic_prefix) as h:
        yield h
