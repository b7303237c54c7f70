"""Problem details (RFC 9457): every refusal of every service is ``application/problem+json`` with a
``type`` that names the mistake, the same for the same mistake in every service (README, "HTTP errors").

A ``ProblemType`` is a URI, a status and a default title; ``ProblemError`` is raised by parsing and by
handlers and answered by the edge. The types are absolute URIs under ``TYPE_BASE`` (they name the kind of
mistake; nothing is served there). Starlette's own refusals (no such route, no such method) are answered
with ``not-found`` and ``method-not-allowed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

__all__ = [
    "BAD_GATEWAY",
    "CONFLICT",
    "CONTENT_TOO_LARGE",
    "FORBIDDEN",
    "GATEWAY_TIMEOUT",
    "IDEMPOTENCY_KEY_REUSED",
    "INTERNAL",
    "INVALID_BODY",
    "INVALID_CURSOR",
    "INVALID_IDEMPOTENCY_KEY",
    "INVALID_PARAMETER",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "PROBLEM",
    "REQUEST_IN_PROGRESS",
    "TYPE_BASE",
    "UNAUTHORIZED",
    "UNAVAILABLE",
    "UNSUPPORTED_MEDIA_TYPE",
    "Problem",
    "ProblemError",
    "ProblemType",
    "by_status",
    "problem",
]

PROBLEM = "application/problem+json"
TYPE_BASE = "https://billing.example/problems/"


@dataclass(frozen=True, slots=True)
class ProblemType:
    """A kind of mistake: its ``type`` URI, HTTP status and default title."""

    slug: str
    status: int
    title: str

    @property
    def uri(self) -> str:
        return TYPE_BASE + self.slug


INVALID_PARAMETER = ProblemType("invalid-parameter", 422, "Invalid parameter")
INVALID_CURSOR = ProblemType("invalid-cursor", 422, "Invalid cursor")
INVALID_BODY = ProblemType("invalid-body", 422, "Invalid request body")
UNSUPPORTED_MEDIA_TYPE = ProblemType("unsupported-media-type", 415, "Unsupported Media Type")
CONTENT_TOO_LARGE = ProblemType("content-too-large", 413, "Content Too Large")
UNAUTHORIZED = ProblemType("unauthorized", 401, "Unauthorized")
FORBIDDEN = ProblemType("forbidden", 403, "Forbidden")
NOT_FOUND = ProblemType("not-found", 404, "Not Found")
METHOD_NOT_ALLOWED = ProblemType("method-not-allowed", 405, "Method Not Allowed")
CONFLICT = ProblemType("conflict", 409, "Conflict")
UNAVAILABLE = ProblemType("unavailable", 503, "Service Unavailable")
BAD_GATEWAY = ProblemType("bad-gateway", 502, "Bad Gateway")
GATEWAY_TIMEOUT = ProblemType("gateway-timeout", 504, "Gateway Timeout")
INTERNAL = ProblemType("internal", 500, "Internal Server Error")
# A command's Idempotency-Key (shared.edge.idempotency, shared.commands): malformed or sent twice; its first
# request has not answered yet; sent before with another request.
INVALID_IDEMPOTENCY_KEY = ProblemType("invalid-idempotency-key", 400, "Invalid Idempotency-Key")
REQUEST_IN_PROGRESS = ProblemType("request-in-progress", 409, "Request in progress")
IDEMPOTENCY_KEY_REUSED = ProblemType("idempotency-key-reused", 422, "Idempotency-Key reused")

_BY_STATUS = {
    t.status: t
    for t in (
        UNAUTHORIZED, FORBIDDEN, NOT_FOUND, METHOD_NOT_ALLOWED, CONFLICT, CONTENT_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE,
        INVALID_BODY, INTERNAL, BAD_GATEWAY, UNAVAILABLE, GATEWAY_TIMEOUT,
    )
}


def by_status(status: int) -> ProblemType:
    """The type of a refusal known only by its status (Starlette's, or an owner's error class)."""
    return _BY_STATUS.get(status, ProblemType("http-error", status, "HTTP error"))


class Problem(BaseModel):
    """RFC 9457 problem details (other members may follow, e.g. ``parameter``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description=f"What kind of mistake: a URI under {TYPE_BASE}.")
    title: str
    status: int
    detail: str = ""
    parameter: str | None = Field(default=None, description="The parameter at fault, when there is one.")


def problem(kind: ProblemType, detail: str = "", *, title: str | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"type": kind.uri, "title": title or kind.title, "status": kind.status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return Response(orjson.dumps(body, default=str), status_code=kind.status, media_type=PROBLEM)


class ProblemError(Exception):
    """Raise from parsing or a handler to answer with a problem document of ``kind``."""

    def __init__(self, kind: ProblemType, detail: str = "", *, title: str | None = None, **extra: Any) -> None:
        super().__init__(detail or title or kind.title)
        self.kind, self.detail, self.extra = kind, detail, extra
        self.title = title or kind.title

    @property
    def status(self) -> int:
        return self.kind.status

    def response(self) -> Response:
        return problem(self.kind, self.detail, title=self.title, **self.extra)
