"""The audit trail of a service's commands (``shared/commands.py`` records it): ``GET /internal/audit`` on
the collector, the pricer and the ledger lists it, newest first, filtered by actor, kind and time
[from, to), a page at a time. Declared like every other route (``shared.edge``): the filters are a
parameter model with the edge's bounded time, count and cursor types, the answer a page of ``AuditEntry``;
the api's merged ``GET /admin/audit`` (``services/api/audit.py``) answers the same entries, and reads its
own trail with ``read_page`` too."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field
from starlette.responses import Response

from shared import commands_repo as repo
from shared.auth import MAX_SUBJECT, SCOPE_ADMIN
from shared.db import Conn
from shared.edge import (
    INVALID_PARAMETER,
    Answer,
    Call,
    Count,
    Cursor,
    CursorText,
    Operation,
    Page,
    Params,
    ProblemError,
    Reply,
    Time,
    answer,
    count,
)

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "SERVICES",
    "AuditEntry",
    "AuditFilters",
    "AuditPage",
    "AuditQuery",
    "Service",
    "audit_cursor",
    "list_audit",
    "operation",
    "read_page",
]

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
Service = Literal["api", "collector", "ledger", "pricer"]
SERVICES: tuple[Service, ...] = ("api", "collector", "ledger", "pricer")  # those that record commands

Actor = Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")]
Kind = Annotated[str, Field(pattern=r"^[a-z0-9_.]{1,64}$")]


class AuditFilters(Params):
    """Which entries: the same filters on every service and on the api's merged list."""

    actor: Actor | None = Field(default=None, description="Only the commands of this token subject.")
    kind: Kind | None = Field(default=None, description="Only commands of this kind, e.g. ledger.agreement.create.")
    since: Time | None = Field(default=None, alias="from", description="Recorded at or after this time.")
    until: Time | None = Field(default=None, alias="to", description="Recorded before this time.")

    def scope(self) -> str:
        """What a service's cursor is bound to: these filters (not the page size)."""
        return Cursor.scope_of("audit", self.actor, self.kind, self.since, self.until)

    def check(self) -> None:
        """``to`` after ``from`` when both are given; 422 ``invalid-parameter`` otherwise."""
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ProblemError(INVALID_PARAMETER, "to: must be after from", parameter="to")


class AuditQuery(AuditFilters):
    limit: Count = count(DEFAULT_LIMIT, MAX_LIMIT)
    cursor: CursorText | None = Field(default=None, description="`next_cursor` of the previous page of this query.")


class AuditEntry(Reply):
    """One command request and how it was answered."""

    id: int = Field(description="Order of recording within its service.")
    service: Service = Field(description="The service that received and recorded the command.")
    recorded_at: datetime = Field(description="When the request arrived (UTC).")
    actor: str = Field(description="The subject of the token that sent the command.")
    kind: str = Field(description="What the command is, e.g. ledger.agreement.create.")
    method: str
    path: str = Field(description="The path the service received, with its query if any.")
    body_digest: str | None = Field(description="SHA-256 of method, path and canonical JSON body.")
    body: Any = Field(description="The body as JSON (null: none, not JSON, or not read).")
    status: int = Field(description="The HTTP status answered.")
    problem_type: str | None = Field(description="The problem's type when the command was refused or failed.")
    problem_title: str | None
    idempotency_key: str | None
    replay: bool = Field(description="The answer was the stored one of the key's first request.")


class AuditPage(Page[AuditEntry]):
    pass


def audit_cursor(scope: str, entry: AuditEntry) -> str:
    """The cursor of the page after ``entry`` in a listing of the filters of ``scope``."""
    return Cursor.encode(scope, [entry.recorded_at, entry.id])


async def read_page(
    conn: Conn, service: str, filters: AuditFilters, cursor: str | None, limit: int
) -> AuditPage:
    """Up to ``limit`` entries of this schema's trail after ``cursor`` (a ``next_cursor`` of the same
    filters), newest first; 422 problem on filters or a cursor that do not hold."""
    filters.check()
    scope = filters.scope()
    pos = Cursor.decode(cursor, scope, (datetime, int))
    rows = await repo.list_audit(
        conn, actor=filters.actor, kind=filters.kind, since=filters.since, until=filters.until,
        before=(pos[0], pos[1]) if pos else None, limit=limit,
    )
    items = [AuditEntry.model_validate(row | {"service": service}) for row in rows]
    nxt = audit_cursor(scope, items[-1]) if items and len(items) == limit else None
    return AuditPage(items=items, next_cursor=nxt)


async def list_audit(call: Call) -> Response:
    """``GET /internal/audit``: this service's trail."""
    q = call.query_as(AuditQuery)
    runtime = call.request.app.state.runtime
    async with runtime.pool.acquire() as conn:
        return answer(await read_page(conn, runtime.name, q, q.cursor, q.limit))


def operation(owner: str) -> Operation:
    """The contract of an owner's ``GET /internal/audit`` (bind ``list_audit``)."""
    return Operation(
        "GET",
        "/internal/audit",
        f"The audit trail of the {owner}'s commands, newest first",
        {200: Answer(AuditPage)},
        SCOPE_ADMIN,
        query=AuditQuery,
        refusals={422: "to is not after from."},
        tags=("audit",),
    )
