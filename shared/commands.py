"""Commands: the state-changing requests of the services, each audited, each idempotent under an
``Idempotency-Key``. ``command(kind)`` wraps a Starlette endpoint; ``shared.runtime.Runtime`` applies it,
through the edge (``shared.edge.routes``), to every route declared as a command, and to nothing else. The
trail is listed by ``shared.audit``. The SQL is in ``shared/commands_repo.py``; the tables (``audit_log``,
``idempotency_keys``) are in the owning service's schema (its ``*_commands.sql`` migration).

Design: reserve the key, run the command, then store its answer and its audit entry. A use case of these
services owns its transaction (in the pricer a price spans several, and the collector calls the Cloud
Foundry API between its own), so the wrapper cannot put its rows in the command's transaction without
reaching into every use case. Instead:

1. Keyed request: in one short transaction, insert ``(actor, key)`` as *running* (commit). A concurrent
   request with the same key waits on that insert, then finds the row: it answers **409** (in progress)
   and does nothing. A key whose first request crashed midway stays *running*, so a retry answers 409
   too, never runs the command twice; it is forgotten with the other keys after the retention.
2. The endpoint runs as it would without the wrapper (parsing, its own transactions, its publishing).
3. In one transaction: the key gets the answer (status, body, content type, Location), and the audit entry
   is appended. A retry with the same key and the same request (method, path with its query, and canonical
   JSON body: the SHA-256 of them) gets that answer again, marked ``Idempotent-Replayed: true``, including
   a 4xx or a 500 (the 500's effect may have been committed before the error, e.g. a publish after the
   commit, so running it again could do it twice: send a new key after checking what happened). The same
   key with another request answers **422**.

What this gives up against one transaction for the effect and its rows: a crash between the command's
commit and step 3 leaves the effect without its audit entry (the key row, still *running*, says who sent
what and when). Requests without a key are audited in step 3 alike (no reservation).

Every request that reaches a wrapped endpoint — after authentication, before parsing — is audited, refusals
too (400 bad key, 409 in progress, 422 mismatch or invalid input, the command's own 4xx and 5xx), with the
actor, kind, method, path (with its query), body digest and body (JSON; null when it is not JSON), the time
it arrived (UTC), status, problem type and title, key and whether it was a replay. ``audit_log`` is
append-only: the service's role may not UPDATE, DELETE or TRUNCATE it, and a trigger refuses those to
anyone.

Keys: ``shared.edge.idempotency`` (1 to 255 printable ASCII characters, no space first or last, else 400;
one header). Per actor: two actors' equal keys are two keys. Retention: a key is kept 24 hours
(``RETENTION``) after its first request; every command deletes the keys older than that (one indexed
DELETE, so no periodic task is needed), and an older key is treated as new. The audit trail itself is
kept (append-only; no retention).

The actor is the verified token's subject (``request.state.principal.subject``), and only that: a command
route always declares a scope (``shared.edge.Operation`` refuses one without), so the edge has
authenticated the caller before this runs; no header names an actor.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared import commands_repo as repo
from shared.auth import MAX_SUBJECT
from shared.clock import as_utc, utcnow
from shared.edge import (
    IDEMPOTENCY_KEY_REUSED,
    PROBLEM,
    REPLAYED_HEADER,
    REQUEST_IN_PROGRESS,
    Endpoint,
    ProblemError,
    idempotency_key,
    problem,
)

__all__ = [
    "RETENTION",
    "CommandJournal",
    "actor_of",
    "command",
    "journal_of",
    "request_digest",
]

log = logging.getLogger(__name__)

RETENTION = timedelta(hours=24)


# ---------------------------------------------------------------- request facts


def actor_of(request: Request) -> str:
    """Who sends the command: the subject of the token the edge verified."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        raise RuntimeError(f"{request.method} {request.url.path}: a command ran without an authenticated caller")
    return str(principal.subject)[:MAX_SUBJECT]


# Top-level body fields never stored in the audit trail (the value is replaced by "***"): a webhook's secret.
REDACTED = frozenset({"secret"})


def request_digest(method: str, path: str, body: bytes) -> tuple[str, str | None]:
    """The SHA-256 (hex) of the method, path and body, and the body as JSON text to store (None when it
    is empty, not JSON, or holds a NUL PostgreSQL's jsonb cannot; ``REDACTED`` fields masked). A JSON body
    is digested in canonical form (keys sorted, no spaces), so the same object sent with another layout is
    the same request."""
    stored: str | None = None
    canonical = body
    if body:
        try:
            parsed = orjson.loads(body)
            canonical = orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONDecodeError:
            canonical = body
        else:
            shown = canonical
            if isinstance(parsed, dict) and REDACTED.intersection(parsed):  # digested as sent, stored without it
                shown = orjson.dumps({k: "***" if k in REDACTED else v for k, v in parsed.items()},
                                     option=orjson.OPT_SORT_KEYS)
            text = shown.decode()
            stored = None if "\\u0000" in text else text
    digest = hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + canonical).hexdigest()
    return digest, stored


# ---------------------------------------------------------------- the journal


@dataclass
class CommandJournal:
    """Runs commands with their key and audit rows. One per running service, in
    ``runtime.state["commands"]`` (made on first use); tests put one with their own clock there."""

    clock: Callable[[], datetime] = utcnow
    retention: timedelta = RETENTION

    async def run(self, request: Request, kind: str, endpoint: Endpoint) -> Response:
        pool: asyncpg.Pool = request.app.state.runtime.pool
        now = as_utc(self.clock())
        actor = actor_of(request)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        entry = _Entry(now, actor, kind, request.method, target)
        try:
            raw = await request.body()
            key = idempotency_key(request.headers)
        except ProblemError as exc:  # a malformed key, or a streamed body over the limit
            resp = exc.response()
            await self._audit(pool, entry, resp)
            return resp
        entry.digest, entry.body = request_digest(request.method, target, raw)
        entry.key = key
        cutoff = now - self.retention
        found: repo.KeyRow | None = None
        async with pool.acquire() as conn:
            await repo.delete_expired_keys(conn, cutoff)
            if key is not None:
                async with conn.transaction():
                    found = await repo.reserve_key(conn, actor, key, entry.digest, kind, now, cutoff)
        if key is None or found is None:
            resp = await _answer(request, endpoint)
            await self._audit(pool, entry, resp, complete=key is not None)
            return resp
        if found.request_digest != entry.digest:
            resp = problem(
                IDEMPOTENCY_KEY_REUSED,
                f"this Idempotency-Key was first sent with another request ({found.kind}); use a new key",
            )
        elif found.status is None:
            resp = problem(
                REQUEST_IN_PROGRESS,
                "a request with this Idempotency-Key has not answered yet (it is running, or stopped before it "
                "answered); retry later, or check what happened and send a new key",
            )
            resp.headers["retry-after"] = "1"
        else:
            resp = Response(found.body or b"", status_code=found.status, media_type=found.content_type)
            resp.headers[REPLAYED_HEADER] = "true"
            if found.location:
                resp.headers["location"] = found.location
            entry.replay = True
        await self._audit(pool, entry, resp)
        return resp

    async def _audit(self, pool: asyncpg.Pool, entry: _Entry, resp: Response, complete: bool = False) -> None:
        """Append the entry (and, with ``complete``, store the answer under the key) in one transaction. A
        failure here is logged, not answered: the command's answer is the caller's either way."""
        body = bytes(getattr(resp, "body", b""))  # commands answer whole bodies, never streams
        ptype = ptitle = None
        if resp.status_code >= 400 and (resp.headers.get("content-type") or "").startswith(PROBLEM):
            try:
                doc = orjson.loads(body)
                ptype, ptitle = str(doc.get("type", "about:blank")), str(doc.get("title", ""))
            except (orjson.JSONDecodeError, AttributeError):
                ptype = "about:blank"
        row = repo.AuditRow(
            entry.at, entry.actor, entry.kind, entry.method, entry.path, entry.digest, entry.body,
            resp.status_code, ptype, ptitle, entry.key, entry.replay,
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                if complete:
                    assert entry.key is not None
                    await repo.complete_key(
                        conn, entry.actor, entry.key, as_utc(self.clock()), resp.status_code,
                        resp.headers.get("content-type"), resp.headers.get("location"), body,
                    )
                await repo.insert_audit(conn, row)
        except Exception:
            log.exception(
                "a command's audit entry could not be written", extra={"kind": entry.kind, "path": entry.path}
            )


@dataclass
class _Entry:
    at: datetime
    actor: str
    kind: str
    method: str
    path: str
    digest: str | None = None
    body: str | None = None
    key: str | None = None
    replay: bool = False


async def _answer(request: Request, endpoint: Endpoint) -> Response:
    """The endpoint's response; an exception becomes the response the app's handler gives for it."""
    try:
        return await endpoint(request)
    except Exception as exc:
        handlers = getattr(request.app, "exception_handlers", {})
        for cls in type(exc).__mro__:
            handler = handlers.get(cls)
            if handler is not None:
                resp: Response = await handler(request, exc)
                return resp
        raise


def journal_of(request: Request) -> CommandJournal:
    state: dict[str, Any] = request.app.state.runtime.state
    journal = state.get("commands")
    if not isinstance(journal, CommandJournal):
        journal = state["commands"] = CommandJournal()
    return journal


def command(kind: str) -> Callable[[Endpoint], Endpoint]:
    """Make ``endpoint`` a command of ``kind`` (e.g. ``ledger.agreement.create``): audited, idempotent
    under an Idempotency-Key. The edge applies it (``Runtime.command_wrapper``) to every route declared
    with ``command=``, inside authentication (``request.state.principal`` is set when this runs; a request
    refused for its token is not a command) and outside parsing and the handler, whose problems are
    answers. Other exceptions that reach it are answered by the app's exception handlers
    (``shared.http``: anything unexpected is 500), so a domain error nobody mapped would be stored and
    replayed as a 500."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        async def wrapped(request: Request) -> Response:
            return await journal_of(request).run(request, kind, endpoint)

        wrapped.__name__ = getattr(endpoint, "__name__", kind)
        wrapped.__doc__ = endpoint.__doc__
        return wrapped

    return wrap
