"""The composition root every service uses: one lifespan that creates the pool (and migrates), the
FastStream broker (publisher and subscribers, ``shared.kafka.Stream``), hands them to the service, and on
SIGTERM finishes the batch in hand, commits, and closes everything in reverse order. Nothing connects
at import time. Each service also serves the AsyncAPI document of its topics at ``/asyncapi.json`` and the
OpenAPI document of its routes at ``/openapi.json``, generated from its route declarations
(``shared.edge``); its token verification (``shared.auth.Authenticator``) is built and closed here too, and
its commands are recorded and made idempotent by ``shared.commands`` (``command_wrapper``)."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from shared.auth import Authenticator
from shared.commands import command
from shared.db import create_pool, migrate, ping
from shared.edge import CommandWrapper, Operation, Wrap, document, starlette_routes
from shared.health import ReadinessPolicy
from shared.http import BodySizeLimit, exception_handlers, ops_operations
from shared.kafka import Decoder, Handler, Stream
from shared.logging import configure_logging
from shared.server import BodyDeadline, server_options
from shared.settings import ServiceSettings

__all__ = ["Runtime", "serve"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a running service holds. ``pool`` and ``publisher`` exist once the lifespan has started."""

    name: str
    settings: ServiceSettings
    migrations: Path | None = None
    description: str = ""
    pool: asyncpg.Pool = field(init=False)
    publisher: Stream = field(init=False)
    state: dict[str, Any] = field(default_factory=dict)
    consumes: bool = False
    # Applied to every operation declared as a command (the state-changing requests), in shared.edge.routes:
    # the audit trail and Idempotency-Key handling of shared.commands, in the service's own schema (its
    # *_commands.sql migration).
    command_wrapper: CommandWrapper | None = command

    def __post_init__(self) -> None:
        s = self.settings
        self.auth = Authenticator(s, realm=f"billing-{self.name}")
        self.operations: list[Operation] = []
        self.api_title, self.api_description = f"billing {self.name}", self.description
        self._openapi: bytes | None = None
        # Built (not connected) here, so that the subscribers and publishers can be declared before the
        # lifespan starts, and the AsyncAPI document generated without a broker.
        self.publisher = Stream(
            s.kafka_bootstrap_servers, client_id=self.name, title=f"billing {self.name}", description=self.description
        )

    @property
    def stream(self) -> Stream:
        return self.publisher
    # Which ready_checks decide /readyz (shared/health.py); set by the service's app.py before app().
    readiness: ReadinessPolicy = field(default_factory=ReadinessPolicy)

    @property
    def schema(self) -> str:
        return self.settings.schema_name or self.name

    def consume(
        self,
        topic: str,
        model: type[BaseModel],
        decode: Decoder,
        handler: Handler,
        *,
        description: str,
        group_id: str | None = None,
        max_records: int | None = None,
    ) -> None:
        """Subscribe to ``topic`` (a name from ``shared.topics``, prefixed here); consumption starts with
        the service. ``model`` documents the payload, ``decode`` reads it, ``handler`` processes batches."""
        self.consumes = True
        self.publisher.subscribe(
            self.settings.topic(topic),
            # The group is prefixed like the topics, so runs on other prefixes never share it.
            group_id=self.settings.topic(group_id or self.name),
            model=model,
            decode=decode,
            handler=handler,
            title=topic,
            description=description,
            max_records=max_records or self.settings.batch_max_records,
            timeout_ms=self.settings.batch_timeout_ms,
        )

    def publishes(self, topic: str, model: type[BaseModel] | None, description: str) -> None:
        """Declare (and document) a topic this service publishes to."""
        self.publisher.publishes(self.settings.topic(topic), model, description)

    def ready_checks(self) -> Mapping[str, Callable[[], Awaitable[None]]]:
        checks: dict[str, Callable[[], Awaitable[None]]] = {}
        if hasattr(self, "pool"):
            checks["database"] = lambda: ping(self.pool)
        if self.publisher.started:
            checks["kafka"] = self.publisher.ping

        async def consumers() -> None:
            if not self.publisher.running:
                raise RuntimeError("a consumer is not running")

        if self.consumes:
            checks["consumers"] = consumers
        if not checks:
            checks["starting"] = _not_ready
        return checks

    def openapi_document(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of this service's operations (``app`` declares them)."""
        return document(self.api_title, self.api_description, self.operations)

    def openapi_bytes(self) -> bytes:
        if self._openapi is None:
            self._openapi = orjson.dumps(self.openapi_document())
        return self._openapi

    def app(
        self,
        operations: Sequence[Operation],
        *,
        routes: Sequence[BaseRoute] = (),
        on_start: Callable[[Runtime], Awaitable[None]] | None = None,
        on_stop: Callable[[Runtime], Awaitable[None]] | None = None,
        wrap: Wrap | None = None,
        title: str = "",
        description: str = "",
        ready_summary: str = "Every dependency the service needs answers (database, Kafka, consumers)",
    ) -> Starlette:
        """The service's Starlette app: its ``operations`` and the ops routes (shared.http) as declared
        routes, then any other ``routes`` (the api's dashboard), with the lifespan above. ``title`` and
        ``description`` head its OpenAPI document."""
        self.api_title = title or f"billing {self.name}"
        self.api_description = description or self.description

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            s = self.settings
            self.pool = await create_pool(s.database_url.get_secret_value(), self.schema, max_size=s.db_pool_size)
            try:
                if self.migrations is not None:
                    async with self.pool.acquire() as conn:
                        await migrate(conn, self.schema, self.migrations)
                # The broker connects its producer and its subscribers at once: the service's start-up
                # (which may publish what its outbox holds) runs first, with the producer alone.
                await self.publisher.connect()
                try:
                    if on_start is not None:
                        await on_start(self)
                    _settle_garbage_collector()
                    await self.publisher.start()
                    log.info("service started", extra={"port": s.port})
                    yield
                finally:
                    await self.publisher.stop_consuming()
                    try:
                        if on_stop is not None:
                            await on_stop(self)
                    finally:
                        await self.publisher.stop()
            finally:
                await self.auth.aclose()
                await self.pool.close()
                log.info("service stopped")

        ops = ops_operations(
            self.ready_checks,
            lambda: self.readiness,
            self.publisher.asyncapi,
            self.openapi_bytes,
            ready_summary=ready_summary,
        )
        self.operations = [*operations, *ops]
        app = Starlette(
            routes=[*starlette_routes(self.operations, command=self.command_wrapper, wrap=wrap), *routes],
            lifespan=lifespan,
            exception_handlers=dict(exception_handlers),
            middleware=[
                Middleware(BodyDeadline, seconds=self.settings.http_body_timeout_seconds),
                Middleware(BodySizeLimit, max_bytes=self.settings.max_body_bytes),
            ],
        )
        # No redirect to the path with(out) a trailing slash: the router's names the request's Host header, and
        # a declared route is matched exactly or not at all (404).
        app.router.redirect_slashes = False
        app.state.runtime = self
        app.state.authenticator = self.auth
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
    """Run ``app`` with uvicorn until SIGTERM or SIGINT, with the request deadlines and the connection cap
    of ``shared.server``; logs as JSON lines."""
    configure_logging(name, settings.log_level)
    uvicorn.run(app, **server_options(settings))
