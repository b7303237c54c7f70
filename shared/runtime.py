"""The composition root every service uses: one lifespan that creates the pool (and migrates), the
producer and the consumers, hands them to the service, and on SIGTERM finishes the batch in hand,
commits, and closes everything in reverse order. Nothing connects at import time."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from shared.db import create_pool, migrate, ping
from shared.health import ReadinessPolicy
from shared.http import BodySizeLimit, exception_handlers, ops_routes
from shared.kafka import BatchConsumer, Handler, Publisher
from shared.logging import configure_logging
from shared.settings import ServiceSettings

__all__ = ["Runtime", "serve"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a running service holds. ``pool`` and ``publisher`` exist once the lifespan has started."""

    name: str
    settings: ServiceSettings
    migrations: Path | None = None
    pool: asyncpg.Pool = field(init=False)
    publisher: Publisher = field(init=False)
    consumers: list[BatchConsumer[Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    # Which ready_checks decide /readyz (shared/health.py); set by the service's app.py before app().
    readiness: ReadinessPolicy = field(default_factory=ReadinessPolicy)

    @property
    def schema(self) -> str:
        return self.settings.schema_name or self.name

    def consume(self, topic: str, model: type[BaseModel], handler: Handler[Any], group_id: str | None = None) -> None:
        """Register a batch consumer of ``topic`` (a name from ``shared.topics``, prefixed here); it
        starts with the service. Call it from ``on_start``, once the publisher exists."""
        self.consumers.append(
            BatchConsumer(
                topic=self.settings.topic(topic),
                # The group is prefixed like the topics, so runs on other prefixes never share it.
                group_id=self.settings.topic(group_id or self.name),
                bootstrap_servers=self.settings.kafka_bootstrap_servers,
                model=model,
                handler=handler,
                publisher=self.publisher,
                max_records=self.settings.batch_max_records,
                timeout_ms=self.settings.batch_timeout_ms,
            )
        )

    def ready_checks(self) -> Mapping[str, Callable[[], Awaitable[None]]]:
        checks: dict[str, Callable[[], Awaitable[None]]] = {}
        if hasattr(self, "pool"):
            checks["database"] = lambda: ping(self.pool)
        if hasattr(self, "publisher"):
            checks["kafka"] = self.publisher.ping

        async def consumers() -> None:
            if not all(c.running for c in self.consumers):
                raise RuntimeError("a consumer is not running")

        if self.consumers:
            checks["consumers"] = consumers
        if not checks:
            checks["starting"] = _not_ready
        return checks

    def app(
        self,
        routes: Sequence[BaseRoute],
        on_start: Callable[[Runtime], Awaitable[None]] | None = None,
        on_stop: Callable[[Runtime], Awaitable[None]] | None = None,
    ) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            s = self.settings
            self.pool = await create_pool(s.database_url.get_secret_value(), self.schema, max_size=s.db_pool_size)
            try:
                if self.migrations is not None:
                    async with self.pool.acquire() as conn:
                        await migrate(conn, self.schema, self.migrations)
                self.publisher = Publisher(s.kafka_bootstrap_servers, client_id=self.name)
                await self.publisher.start()
                try:
                    if on_start is not None:
                        await on_start(self)
                    _settle_garbage_collector()
                    for c in self.consumers:
                        await c.start()
                    log.info("service started", extra={"port": s.port})
                    yield
                finally:
                    for c in self.consumers:
                        await c.stop()
                    if on_stop is not None:
                        await on_stop(self)
                    await self.publisher.stop()
            finally:
                await self.pool.close()
                log.info("service stopped")

        app = Starlette(
            routes=[*ops_routes(self.ready_checks, lambda: self.readiness), *routes],
            lifespan=lifespan,
            exception_handlers=dict(exception_handlers),
            middleware=[Middleware(BodySizeLimit, max_bytes=self.settings.max_body_bytes)],
        )
        app.state.runtime = self
        return app


def _settle_garbage_collector() -> None:
    """Move what start-up allocated (modules, models, the catalog) out of the collector's sight and make
    young-generation collections rarer: a consumer allocates tens of thousands of short-lived objects per
    batch, and at the default threshold (700) the collector ran every few messages over a heap that only
    grows with the batch. Reference counting frees those objects anyway; cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _not_ready() -> None:
    raise RuntimeError("starting")


def serve(name: str, app: Starlette, settings: ServiceSettings) -> None:
    """Run ``app`` with uvicorn until SIGTERM or SIGINT; logs as JSON lines."""
    configure_logging(name, settings.log_level)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
