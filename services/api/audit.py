"""The audit trail of the commands, as the api shows it: ``GET /admin/audit`` (declared in ``schemas.py``)
and the dashboard's ``/dashboard/admin/audit`` page.

Each service keeps the trail of its own commands (``shared/commands.py``): the collector, the pricer and
the ledger list theirs at ``GET /internal/audit`` (asked with the caller's token), the api reads its own
(entitlements) from its schema with the same function (``shared.audit.read_page``). This merges them into
one list, newest first (by recorded time, then service, then the service's own order), filtered by actor,
kind, time range [from, to) and, if given, ``service`` (then only that one is read). Pages: the cursor
holds which services have more and, for each, its own cursor after the last entry of it shown so far (or
"" for its newest), bound to the query like the api's other cursors; each page reads ``limit + 1``
entries of every service not yet done and shows the newest ``limit`` of them. A service that cannot be
asked makes the whole answer 502/504 (a trail with a hole in it would look complete).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from services.api.forward import UpstreamError
from services.api.schemas import AdminAuditQuery
from shared.audit import SERVICES, AuditEntry, AuditPage, audit_cursor, read_page
from shared.auth import Principal
from shared.edge import (
    BAD_GATEWAY,
    GATEWAY_TIMEOUT,
    INVALID_CURSOR,
    Call,
    Cursor,
    ProblemError,
    answer,
    parse_params,
)

if TYPE_CHECKING:
    from services.api.dashboard import Dashboard
    from services.api.handlers import Api

__all__ = ["SERVICES", "admin_audit", "audit_page", "merge", "read_trail"]

DASHBOARD_PAGE = 50


def _order(entry: AuditEntry) -> tuple[datetime, str, int]:
    return entry.recorded_at, entry.service, entry.id


def merge(
    fetched: Mapping[str, Sequence[AuditEntry]], positions: Mapping[str, str], limit: int, scope: str
) -> tuple[list[AuditEntry], dict[str, str]]:
    """The newest ``limit`` entries of ``fetched`` (per service, up to ``limit + 1`` entries newest first
    after its position in ``positions``), and the positions to read the next page from (services that
    have nothing more left out); ``scope`` is what the services' cursors are bound to."""
    candidates = [entry for service in fetched for entry in fetched[service][:limit]]
    taken = sorted(candidates, key=_order, reverse=True)[:limit]
    after: dict[str, str] = {}
    for service, entries in fetched.items():
        mine = [entry for entry in taken if entry.service == service]
        more = len(entries) > limit
        if mine and (more or len(mine) < len(entries)):
            after[service] = audit_cursor(scope, mine[-1])
        elif not mine and entries:
            after[service] = positions[service]
    return taken, after


def _scope(q: AdminAuditQuery) -> str:
    return Cursor.scope_of("admin-audit", q.actor, q.kind, q.service, q.since, q.until)


def _positions(q: AdminAuditQuery, owners_scope: str) -> dict[str, str]:
    """Per service still to read, its own cursor ("" = from its newest entry): from the query's cursor, or
    every wanted service from the start. Each service's cursor is checked here as that service checks it
    (a cursor that was not made for this query is the caller's mistake, 422, not an owner's refusal)."""
    wanted = (q.service,) if q.service else SERVICES
    pos = Cursor.decode(q.cursor, _scope(q), (int, *(str,) * len(SERVICES)))
    if pos is None:
        return {s: "" for s in wanted}
    mask, texts = pos[0], pos[1:]
    if not 0 <= mask < 2 ** len(SERVICES):
        raise ProblemError(INVALID_CURSOR, "cursor: not a cursor of this query; start again without it",
                           parameter="cursor")
    out: dict[str, str] = {
        s: t for i, (s, t) in enumerate(zip(SERVICES, texts, strict=True)) if mask >> i & 1 and s in wanted
    }
    for text in out.values():
        if text:
            Cursor.decode(text, owners_scope, (datetime, int))
    return out


def _encode(scope: str, after: Mapping[str, str]) -> str | None:
    if not after:
        return None
    mask = sum(1 << i for i, s in enumerate(SERVICES) if s in after)
    return Cursor.encode(scope, [mask, *(after.get(s, "") for s in SERVICES)])


async def read_trail(api: Api, token: str, q: AdminAuditQuery) -> AuditPage:
    """A page of the merged trail for a caller with ``token`` (an admin's: the owners verify it again)."""
    q.check()
    scope = q.scope()  # the services' cursors: bound to the filters they are asked with
    positions = _positions(q, scope)
    forwarder = api.forwarder
    assert forwarder is not None, "the api has not started"
    filters = q.model_dump(mode="json", by_alias=True, exclude_none=True, include={"actor", "kind", "since", "until"})
    params = {k: str(v) for k, v in filters.items()} | {"limit": str(q.limit + 1)}

    async def one(service: str) -> list[AuditEntry]:
        position = positions[service]
        if service == "api":
            async with api.runtime.pool.acquire() as conn:
                return (await read_page(conn, "api", q, position or None, q.limit + 1)).items
        body = await forwarder.get_json(
            service, "/internal/audit", params | ({"cursor": position} if position else {}), token=token
        )
        try:
            page = AuditPage.model_validate(body)
        except ValueError:
            detail = f"the {service} answered its audit trail in an unknown shape"
            raise UpstreamError(502, "Bad Gateway", detail) from None
        return [entry.model_copy(update={"service": service}) for entry in page.items]

    services = sorted(positions)
    try:
        pages = await asyncio.gather(*(one(s) for s in services))
    except UpstreamError as exc:
        raise ProblemError(GATEWAY_TIMEOUT if exc.status == 504 else BAD_GATEWAY, exc.detail) from None
    items, after = merge(dict(zip(services, pages, strict=True)), positions, q.limit, scope)
    return AuditPage(items=items, next_cursor=_encode(_scope(q), after))


async def admin_audit(api: Api, call: Call) -> Response:
    """``GET /admin/audit``."""
    return answer(await read_trail(api, call.caller.token, call.query_as(AdminAuditQuery)))


async def audit_page(dashboard: Dashboard, request: Request, principal: Principal) -> Response:
    """``/dashboard/admin/audit``: the same list as a table, with its filters as a form."""
    shown = {k: v for k, v in request.query_params.items() if v != ""}  # an empty form field is no filter
    q = parse_params(AdminAuditQuery, (shown | {"limit": str(DASHBOARD_PAGE)}).items())
    page = await read_trail(dashboard.api, principal.token, q)
    filters = {k: shown.get(k, "") for k in ("actor", "kind", "service", "from", "to")}
    rows = [
        {
            "recorded_at": e.recorded_at.isoformat().replace("+00:00", "Z"),
            "actor": e.actor,
            "service": e.service,
            "kind": e.kind,
            "request": f"{e.method} {e.path}",
            "status": e.status,
            "problem": e.problem_title or "",
            "key": e.idempotency_key or "",
            "replay": e.replay,
            "digest": (e.body_digest or "")[:12],
        }
        for e in page.items
    ]
    next_query = {k: v for k, v in filters.items() if v} | ({"cursor": page.next_cursor} if page.next_cursor else {})
    return dashboard._render(
        request, "audit.html", principal=principal, items=rows, filters=filters, services=SERVICES,
        next_query=next_query if page.next_cursor else None, first_page="cursor" not in shown,
    )
