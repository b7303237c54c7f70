"""HTTP plumbing every service shares: the exception handlers that answer every refusal as problem+json
(``shared.edge.problems``), a request-body size limit, and the operations every service serves besides its
own: ``/healthz``, ``/readyz``, ``/metrics``, ``/asyncapi.json`` and ``/openapi.json``, declared like the
others (``shared.edge``) so that they are in the generated document too."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.db import OUT_OF_RANGE_TEXT, out_of_range
from shared.edge import (
    CONFLICT,
    CONTENT_TOO_LARGE,
    INTERNAL,
    INVALID_BODY,
    JSON,
    UNAVAILABLE,
    Answer,
    Call,
    Operation,
    ProblemError,
    by_status,
    problem,
)
from shared.health import ReadinessPolicy, ReadyCheck, run_checks

__all__ = [
    "BodySizeLimit",
    "ORJSONResponse",
    "exception_handlers",
    "ops_operations",
]

log = logging.getLogger(__name__)

# Why the ops routes need no token: probes and scrapers call them without one, and none of them changes
# anything or tells anything about customers.
OPS_OPEN = "probes and Prometheus call it without credentials; it changes nothing and holds no customer data."
DOCS_OPEN = "the description of the service's interface, the same for every caller; it holds no data."


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return str(obj)


async def _problem_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    resp = problem(by_status(exc.status_code), str(exc.detail or ""))
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


async def _unstorable_text(request: Request, exc: Exception) -> Response:
    # PostgreSQL text cannot hold the NUL character (SQLSTATE 22021): the value came from the request.
    return problem(INVALID_BODY, "text values cannot contain the NUL character (\\u0000)")


# The database away (restarting, refusing connections, out of them): the request may be sent again.
_DATABASE_AWAY = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
)


async def _unexpected(request: Request, exc: Exception) -> Response:
    if out_of_range(exc):  # a valid request whose amounts, summed with what is stored, would not fit
        return problem(CONFLICT, OUT_OF_RANGE_TEXT)
    if isinstance(exc, _DATABASE_AWAY):
        log.warning("database unavailable", extra={"path": request.url.path, "error": repr(exc)})
        detail = (
            "the database cannot be reached just now: send the request again (a command with the same "
            "Idempotency-Key is not applied twice)"
        )
        resp = problem(UNAVAILABLE, detail)
        resp.headers["retry-after"] = "2"
        return resp
    log.exception("unhandled error", extra={"path": request.url.path})
    return problem(INTERNAL, "the error was logged")


exception_handlers: Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    ProblemError: _problem_error,
    HTTPException: _http_error,
    asyncpg.CharacterNotInRepertoireError: _unstorable_text,
    Exception: _unexpected,
}


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request bodies are limited to {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await problem(CONTENT_TOO_LARGE, detail)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ProblemError(CONTENT_TOO_LARGE, detail)
            return msg

        await self.app(scope, limited, send)


# ------------------------------------------------------------------------------------- ops operations


class Health(BaseModel):
    status: str = Field(description="`ok`: the process answers.")


class Readiness(BaseModel):
    """What ``/readyz`` says: every check's result; the service's readiness policy decides which count."""

    model_config = ConfigDict(extra="allow")

    status: str = Field(description="`ready` or `not ready`.")
    checks: dict[str, str] = Field(description="Each dependency: `ok` or `failed: <error type>`.")
    not_required: list[str] = Field(default_factory=list, description="Checks reported, not required.")


OBJECT = {"type": "object"}


def ops_operations(
    checks: Callable[[], Mapping[str, ReadyCheck]],
    policy: Callable[[], ReadinessPolicy],
    asyncapi: Callable[[], Any],
    openapi: Callable[[], bytes],
    *,
    ready_summary: str = "Every dependency the service needs answers (database, Kafka, consumers)",
) -> list[Operation]:
    """``/healthz`` (the process answers), ``/readyz`` (the dependencies the service's readiness policy
    requires answer; the others are reported), ``/metrics``, ``/asyncapi.json`` and ``/openapi.json``."""

    async def healthz(call: Call) -> Response:
        return ORJSONResponse({"status": "ok"})

    async def readyz(call: Call) -> Response:
        ok, body = await run_checks(checks(), policy())
        return ORJSONResponse(body, status_code=200 if ok else 503)

    async def metrics(call: Call) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def asyncapi_doc(call: Call) -> Response:
        return ORJSONResponse(asyncapi())

    async def openapi_doc(call: Call) -> Response:
        return Response(openapi(), media_type=JSON)

    return [
        Operation("GET", "/healthz", "The process answers", {200: Answer(Health)}, None, OPS_OPEN).bind(healthz),
        Operation(
            "GET", "/readyz", ready_summary,
            {200: Answer(Readiness, "Ready"), 503: Answer(Readiness, "Not ready")}, None, OPS_OPEN,
        ).bind(readyz),
        Operation(
            "GET", "/metrics", "Prometheus metrics",
            {200: Answer(None, "Prometheus text format", "text/plain", {"type": "string"})}, None, OPS_OPEN,
        ).bind(metrics),
        Operation(
            "GET", "/asyncapi.json", "The AsyncAPI 3.0 document of this service's topics (generated by FastStream)",
            {200: Answer(None, "AsyncAPI 3.0", JSON, OBJECT)}, None, DOCS_OPEN,
        ).bind(asyncapi_doc),
        Operation(
            "GET", "/openapi.json", "This document", {200: Answer(None, "OpenAPI 3.1", JSON, OBJECT)}, None, DOCS_OPEN
        ).bind(openapi_doc),
    ]
