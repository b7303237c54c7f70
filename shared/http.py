"""HTTP plumbing every service shares: RFC 9457 problem details, a request-body size limit, and the
``/healthz``, ``/readyz`` and ``/metrics`` routes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.health import ReadinessPolicy, ReadyCheck, run_checks

__all__ = [
    "problem",
    "ProblemError",
    "ORJSONResponse",
    "BodySizeLimit",
    "exception_handlers",
    "ops_routes",
    "read_json",
]

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return str(obj)


def problem(status: int, title: str, detail: str = "", **extra: Any) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return Response(orjson.dumps(body, default=_default), status_code=status, media_type=PROBLEM)


class ProblemError(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(self, status: int, title: str, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """The request body validated by ``model``; 415/422 problem on anything else."""
    ctype = request.headers.get("content-type", "")
    if "json" not in ctype:
        raise ProblemError(415, "Unsupported Media Type", "send the body as application/json")
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        from shared.kafka import describe_error

        raise ProblemError(422, "Invalid request body", describe_error(exc)) from None


async def _problem_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem(exc.status, exc.title, exc.detail, **exc.extra)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    titles = {404: "Not Found", 405: "Method Not Allowed", 401: "Unauthorized", 403: "Forbidden"}
    resp = problem(exc.status_code, titles.get(exc.status_code, "HTTP error"), str(exc.detail or ""))
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


async def _unstorable_text(request: Request, exc: Exception) -> Response:
    # PostgreSQL text cannot hold the NUL character (SQLSTATE 22021): the value came from the request.
    return problem(422, "Invalid text", "text values cannot contain the NUL character (\\u0000)")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    return problem(500, "Internal Server Error", "the error was logged")


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
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await problem(413, "Content Too Large", f"request bodies are limited to {self.max_bytes} bytes")(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ProblemError(413, "Content Too Large", f"request bodies are limited to {self.max_bytes} bytes")
            return msg

        await self.app(scope, limited, send)


def ops_routes(
    checks: Callable[[], Mapping[str, ReadyCheck]], policy: Callable[[], ReadinessPolicy] = ReadinessPolicy
) -> list[Route]:
    """``/healthz`` (the process answers), ``/readyz`` (the dependencies the service's readiness policy
    requires answer; the others are reported) and ``/metrics``."""

    async def healthz(request: Request) -> Response:
        return ORJSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ok, body = await run_checks(checks(), policy())
        return ORJSONResponse(body, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
