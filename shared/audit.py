"""The audit trail of a service's commands (``shared/commands.py`` records it): ``GET /internal/audit``
lists it, newest first, filtered by actor, kind and time [from, to), a page at a time; the OpenAPI pieces
that document it. The api merges the three services' trails (``services/api/audit.py``)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared import commands_repo as repo
from shared.clock import as_utc
from shared.commands import MAX_ACTOR
from shared.http import ORJSONResponse, ProblemError
from shared.openapi import problem as problem_doc

__all__ = ["AUDIT_ENTRY_SCHEMA", "MAX_ACTOR", "audit_cursor", "audit_openapi", "audit_route", "list_audit"]

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
AUDIT_QUERY = ("actor", "kind", "from", "to", "limit", "cursor")


def audit_cursor(recorded_at: datetime, entry_id: int) -> str:
    """The cursor of the page after the entry at (``recorded_at``, ``entry_id``)."""
    raw = orjson.dumps([as_utc(recorded_at).isoformat(), entry_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _invalid(name: str, why: str) -> ProblemError:
    return ProblemError(422, "Invalid query parameter", f"{name}: {why}", parameter=name)


def _decode_cursor(text: str) -> tuple[datetime, int]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        moment, entry_id = value
        if not isinstance(moment, str) or type(entry_id) is not int:
            raise ValueError("not a cursor")
        return as_utc(datetime.fromisoformat(moment)), entry_id
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise _invalid("cursor", "pass back the next_cursor of a previous page") from None


def _time(name: str, text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace(" ", "+"))
        if moment.tzinfo is None:
            raise _invalid(name, "give a time zone (e.g. Z)")
        return as_utc(moment)
    except ValueError:
        raise _invalid(name, "not an ISO-8601 time") from None


async def list_audit(request: Request) -> Response:
    """``GET /internal/audit``: this service's audit entries, newest first, filtered by actor, kind and
    time [from, to), a page at a time."""
    q = request.query_params
    limit_text = q.get("limit", str(DEFAULT_LIMIT))
    if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 5) or not (
        1 <= int(limit_text) <= MAX_LIMIT
    ):
        raise _invalid("limit", f"an integer from 1 to {MAX_LIMIT}")
    limit = int(limit_text)
    text: dict[str, str | None] = {}
    for name in ("actor", "kind"):
        value = q.get(name)
        if value is not None and (len(value) > MAX_ACTOR or "\x00" in value):
            raise _invalid(name, f"at most {MAX_ACTOR} characters, no NUL")
        text[name] = value or None
    since = _time("from", q["from"]) if q.get("from") else None
    until = _time("to", q["to"]) if q.get("to") else None
    before = _decode_cursor(q["cursor"]) if q.get("cursor") else None
    runtime = request.app.state.runtime
    async with runtime.pool.acquire() as conn:
        items = await repo.list_audit(
            conn, actor=text["actor"], kind=text["kind"], since=since, until=until, before=before, limit=limit
        )
    for item in items:
        item["service"] = runtime.name
    nxt = audit_cursor(items[-1]["recorded_at"], items[-1]["id"]) if len(items) == limit else None
    return ORJSONResponse({"items": items, "next_cursor": nxt})


def audit_route() -> Route:
    return Route("/internal/audit", list_audit, methods=["GET"])




AUDIT_ENTRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "description": "Order of recording within its service."},
        "service": {"enum": ["collector", "pricer", "ledger"]},
        "recorded_at": {"type": "string", "format": "date-time"},
        "actor": {"type": "string", "description": "The token subject that sent the command."},
        "kind": {"type": "string", "description": "What the command is, e.g. ledger.agreement.create."},
        "method": {"type": "string"},
        "path": {"type": "string"},
        "body_digest": {"type": ["string", "null"], "description": "SHA-256 of method, path and canonical body."},
        "body": {"description": "The body as JSON (null: none, not JSON, or not read)."},
        "status": {"type": "integer", "description": "The HTTP status answered."},
        "problem_type": {"type": ["string", "null"]},
        "problem_title": {"type": ["string", "null"]},
        "idempotency_key": {"type": ["string", "null"]},
        "replay": {"type": "boolean", "description": "The answer was the stored one of the key's first request."},
    },
    "required": [
        "id", "service", "recorded_at", "actor", "kind", "method", "path", "body_digest", "body", "status",
        "problem_type", "problem_title", "idempotency_key", "replay",
    ],
    "additionalProperties": False,
}


def audit_openapi() -> tuple[dict[str, Any], dict[str, Any]]:
    """The paths and schemas of ``GET /internal/audit`` for a service's OpenAPI document."""
    time = {"type": "string", "format": "date-time"}
    params = [
        {"name": "actor", "in": "query", "required": False, "schema": {"type": "string", "maxLength": MAX_ACTOR},
         "description": "Only this actor's commands."},
        {"name": "kind", "in": "query", "required": False, "schema": {"type": "string", "maxLength": MAX_ACTOR},
         "description": "Only commands of this kind."},
        {"name": "from", "in": "query", "required": False, "schema": time, "description": "Recorded at or after."},
        {"name": "to", "in": "query", "required": False, "schema": time, "description": "Recorded before."},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
         "description": "Page size."},
        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "`next_cursor` of the previous page."},
    ]
    page = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
            "next_cursor": {"type": ["string", "null"]},
        },
        "required": ["items", "next_cursor"],
        "additionalProperties": False,
    }
    paths = {
        "/internal/audit": {
            "get": {
                "summary": "The audit trail of this service's commands, newest first",
                "parameters": params,
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": page}}},
                    "422": problem_doc("A parameter is invalid (limit, cursor, a time, actor or kind)."),
                },
            }
        }
    }
    return paths, {"AuditEntry": AUDIT_ENTRY_SCHEMA}
