"""The audit trail of the admin commands, as the api shows it: ``GET /admin/audit`` (JSON) and the
dashboard's ``/dashboard/admin/audit`` page.

Each owning service keeps the trail of its own commands (``shared/commands.py``: collector, pricer,
ledger, each ``GET /internal/audit``). This merges the three into one list, newest first (by recorded
time, then service, then the service's own order), filtered by actor, kind, time range [from, to) and, if
given, ``service`` (then only that one is asked). Pages: the cursor holds, per service, the position of
the last entry of that service shown so far (or that it is done), bound to the query like the api's other
cursors; each page asks every service not yet done for ``limit + 1`` entries after its position and shows
the newest ``limit`` of them. A service that cannot be asked makes the whole answer 502/504 (a trail
with a hole in it would look complete).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.forward import Forwarder, UpstreamError
from services.api.params import Cursor, invalid, only_known, parse_enum, parse_limit, parse_time
from shared.audit import AUDIT_ENTRY_SCHEMA, MAX_ACTOR, audit_cursor
from shared.http import ORJSONResponse, ProblemError
from shared.openapi import TIME_SCHEMA, param

if TYPE_CHECKING:
    from services.api.dashboard import Dashboard
    from services.api.handlers import Api

__all__ = ["SERVICES", "AuditPage", "AuditQuery", "admin_audit", "audit_page", "merge", "openapi_paths", "read_trail"]

SERVICES = ("collector", "ledger", "pricer")  # the owners of commands; the cursor's positions in this order
QUERY = ("actor", "kind", "service", "from", "to", "limit", "cursor")
_KIND = re.compile(r"^[a-z0-9_.]{1,64}$")
_POSITION = re.compile(r"^[A-Za-z0-9_-]{0,512}$")  # a service's own cursor; "" = from its newest entry


@dataclass(frozen=True)
class AuditQuery:
    actor: str | None
    kind: str | None
    since: datetime | None
    until: datetime | None
    limit: int
    positions: dict[str, str]  # per service still to read: its cursor ("" = from the start)
    scope: str


@dataclass(frozen=True)
class AuditPage:
    items: list[dict[str, Any]]
    next_cursor: str | None


def parse_query(query: Mapping[str, str]) -> AuditQuery:
    q = only_known(query, QUERY)
    actor = q.get("actor")
    if actor is not None and not (1 <= len(actor) <= MAX_ACTOR and "\x00" not in actor):
        raise invalid("actor", f"a token subject, 1 to {MAX_ACTOR} characters")
    kind = q.get("kind")
    if kind is not None and not _KIND.match(kind):
        raise invalid("kind", "a command kind such as ledger.agreement.create")
    service = parse_enum("service", q["service"], SERVICES) if "service" in q else None
    since = parse_time("from", q["from"]) if "from" in q else None
    until = parse_time("to", q["to"]) if "to" in q else None
    limit = parse_limit(q.get("limit"))
    scope = Cursor.scope_of("audit", actor, kind, service, since, until)
    wanted = (service,) if service else SERVICES
    positions = {s: "" for s in wanted}
    if "cursor" in q:
        pos = Cursor.decode(q["cursor"], scope, (object,) * len(SERVICES))
        assert pos is not None
        if not all(p is None or (isinstance(p, str) and _POSITION.match(p)) for p in pos):
            raise ProblemError(400, "Invalid cursor", "cursor: not a cursor of this query; start again without it",
                               parameter="cursor")
        positions = {s: p for s, p in zip(SERVICES, pos, strict=True) if p is not None and s in wanted}
    return AuditQuery(actor, kind, since, until, limit, positions, scope)


def _order(item: dict[str, Any]) -> tuple[datetime, str, int]:
    return datetime.fromisoformat(item["recorded_at"]), item["service"], item["id"]


def merge(
    fetched: Mapping[str, Sequence[dict[str, Any]]], positions: Mapping[str, str], limit: int
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The newest ``limit`` entries of ``fetched`` (per service, up to ``limit + 1`` entries newest first
    after its position in ``positions``), and the positions to read the next page from (services that
    have nothing more left out)."""
    candidates = [item for service in fetched for item in fetched[service][:limit]]
    taken = sorted(candidates, key=_order, reverse=True)[:limit]
    after: dict[str, str] = {}
    for service, items in fetched.items():
        mine = [item for item in taken if item["service"] == service]
        more = len(items) > limit
        if mine and (more or len(mine) < len(items)):
            after[service] = audit_cursor(datetime.fromisoformat(mine[-1]["recorded_at"]), mine[-1]["id"])
        elif not mine and items:
            after[service] = positions[service]
    return taken, after


async def read_trail(forwarder: Forwarder, query: AuditQuery) -> AuditPage:
    params: dict[str, str] = {"limit": str(query.limit + 1)}
    for name, value in (("actor", query.actor), ("kind", query.kind)):
        if value is not None:
            params[name] = value
    for name, moment in (("from", query.since), ("to", query.until)):
        if moment is not None:
            params[name] = moment.isoformat().replace("+00:00", "Z")

    async def one(service: str) -> list[dict[str, Any]]:
        position = query.positions[service]
        body = await forwarder.get_json(service, "/internal/audit", params | ({"cursor": position} if position else {}))
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise UpstreamError(502, "Bad Gateway", f"the {service} answered its audit trail in an unknown shape")
        return [item | {"service": service} for item in items]

    services = sorted(query.positions)
    try:
        pages = await asyncio.gather(*(one(s) for s in services))
    except UpstreamError as exc:
        raise ProblemError(exc.status, exc.title, exc.detail) from None
    items, after = merge(dict(zip(services, pages, strict=True)), query.positions, query.limit)
    cursor = Cursor.encode(query.scope, [after.get(s) for s in SERVICES]) if after else None
    return AuditPage(items, cursor)


async def admin_audit(api: Api, request: Request, principal: Principal) -> Response:
    """``GET /admin/audit``."""
    assert api.forwarder is not None, "the api has not started"
    page = await read_trail(api.forwarder, parse_query(request.query_params))
    return ORJSONResponse({"items": page.items, "next_cursor": page.next_cursor})


async def audit_page(dashboard: Dashboard, request: Request, principal: Principal) -> Response:
    """``/dashboard/admin/audit``: the same list as a table, with its filters as a form."""
    assert dashboard.api.forwarder is not None, "the api has not started"
    shown = {k: v for k, v in request.query_params.items() if v != ""}  # an empty form field is no filter
    page = await read_trail(dashboard.api.forwarder, parse_query(shown | {"limit": "50"}))
    filters = {k: shown.get(k, "") for k in ("actor", "kind", "service", "from", "to")}
    rows = [
        {
            "recorded_at": e["recorded_at"],
            "actor": e["actor"],
            "service": e["service"],
            "kind": e["kind"],
            "request": f"{e['method']} {e['path']}",
            "status": e["status"],
            "problem": e.get("problem_title") or "",
            "key": e.get("idempotency_key") or "",
            "replay": bool(e.get("replay")),
            "digest": (e.get("body_digest") or "")[:12],
        }
        for e in page.items
    ]
    next_query = {k: v for k, v in filters.items() if v} | ({"cursor": page.next_cursor} if page.next_cursor else {})
    return dashboard._render(
        request, "audit.html", principal=principal, items=rows, filters=filters, services=SERVICES,
        next_query=next_query if page.next_cursor else None, first_page="cursor" not in shown,
    )


def openapi_paths(problem: Any, auth_errors: Mapping[str, Any]) -> dict[str, Any]:
    """``/admin/audit`` for the api's document (``problem`` and ``auth_errors`` are the document's own)."""
    page = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
            "next_cursor": {"type": ["string", "null"]},
        },
        "required": ["items", "next_cursor"],
        "additionalProperties": False,
    }
    return {
        "/admin/audit": {
            "get": {
                "summary": "The audit trail of the admin commands (collector, pricer, ledger), newest first",
                "security": [{"bearer": ["usage.admin"]}],
                "parameters": [
                    param("actor", "query", {"type": "string", "minLength": 1, "maxLength": MAX_ACTOR},
                          "Only commands of this token subject."),
                    param("kind", "query", {"type": "string", "pattern": _KIND.pattern},
                          "Only commands of this kind, e.g. ledger.agreement.create."),
                    param("service", "query", {"enum": list(SERVICES)}, "Only this service's commands."),
                    param("from", "query", TIME_SCHEMA, "Recorded at or after this time."),
                    param("to", "query", TIME_SCHEMA, "Recorded before this time."),
                    param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                          "Page size."),
                    param("cursor", "query", {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "maxLength": 2048},
                          "Opaque cursor from `next_cursor` of the previous page of the same query."),
                ],
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": page}}},
                    "400": problem("A cursor that does not belong to this query."),
                    "422": problem("A parameter is unknown or invalid."),
                    "502": problem("An owning service cannot be reached."),
                    "504": problem("An owning service did not answer in time."),
                    **auth_errors,
                },
            }
        }
    }


OPENAPI_SCHEMAS = {"AuditEntry": AUDIT_ENTRY_SCHEMA}
