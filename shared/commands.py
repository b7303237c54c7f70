"""Commands: the state-changing POSTs of the collector, pricer and ledger, each audited, each idempotent
under an ``Idempotency-Key``. Wrap a Starlette endpoint with ``command(kind)``; the trail is served by
``shared.audit.audit_route()``. The SQL is in ``shared/commands_repo.py``; the tables (``audit_log``,
``idempotency_keys``) are in the owning service's schema (its ``*_commands.sql`` migration).

Design: reserve the key, run the command, then store its answer and its audit entry. A use case of these
services owns its transaction (in the pricer a price spans several, and the collector calls the Cloud
Foundry API between its own), so the wrapper cannot put its rows in the command's transaction without
reaching into every use case. Instead:

1. Keyed request: in one short transaction, insert ``(actor, key)`` as *running* (commit). A concurrent
   request with the same key waits on that insert, then finds the row: it answers **409** (in progress)
   and does nothing. A key whose first request crashed midway stays *running*, so a retry answers 409
   too, never runs the command twice; it is forgotten with the other keys after the retention.
2. The endpoint runs as it would without the wrapper (its own transactions, its publishing).
3. In one transaction: the key gets the answer (status, body, content type, Location), and the audit entry
   is appended. A retry with the same key and the same request (method, path and canonical JSON body:
   the SHA-256 of them) gets that answer again, marked ``Idempotent-Replayed: true``, including a 4xx or a
   500 (the 500's effect may have been committed before the error, e.g. a publish after the commit, so
   running it again could do it twice: send a new key after checking what happened). The same key with
   another request answers **422**.

What this gives up against one transaction for the effect and its rows: a crash between the command's
commit and step 3 leaves the effect without its audit entry (the key row, still *running*, says who sent
what and when). Requests without a key are audited in step 3 alike (no reservation).

Every request that reaches a wrapped endpoint is audited, refusals too (400 bad key, 409 in progress,
422 mismatch, the command's own 4xx and 5xx), with the actor, kind, method, path, body digest and body
(JSON; null when it is not JSON), the time it arrived (UTC), status, problem type and title, key and whether it was a
replay. ``audit_log`` is append-only: the service's role may not UPDATE, DELETE or TRUNCATE it, and a
trigger refuses those to anyone.

Keys: 1 to 255 printable ASCII characters (else 400); one header. Per actor: two actors' equal keys are
two keys. Retention: a key is kept 24 hours (``RETENTION``) after its first request; every command deletes
the keys older than that (one indexed DELETE, so no periodic task is needed), and an older key is
treated as new. The audit trail itself is kept (append-only; no retention).

The actor is the verified token's subject (``request.state.principal.subject``) when a principal is
there; until every internal route verifies a token, the subject the api forwards in ``x-billing-actor``
(see ``actor_of``: dropping that fallback is a one-line change), else ``anonymous``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from shared import commands_repo as repo
from shared.clock import as_utc, utcnow
from shared.http import ProblemError, problem
from shared.openapi import problem as problem_doc

__all__ = [
    "ACTOR_HEADER",
    "ANONYMOUS",
    "IDEMPOTENCY_KEY_PARAMETER",
    "KEY_HEADER",
    "MAX_ACTOR",
    "REPLAYED_HEADER",
    "RETENTION",
    "CommandJournal",
    "actor_of",
    "command",
    "command_kind",
    "idempotency_key",
    "journal_of",
    "request_digest",
    "with_command",
    "with_commands",
]

log = logging.getLogger(__name__)

KEY_HEADER = "idempotency-key"
ACTOR_HEADER = "x-billing-actor"
REPLAYED_HEADER = "idempotent-replayed"
ANONYMOUS = "anonymous"
RETENTION = timedelta(hours=24)
MAX_ACTOR = 255
_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_KEY_RULE = "1 to 255 printable ASCII characters"

Endpoint = Callable[[Request], Awaitable[Response]]


# ---------------------------------------------------------------- request facts


def idempotency_key(headers: Headers) -> str | None:
    """The request's Idempotency-Key, None without one; 400 problem when it is malformed or repeated."""
    values = headers.getlist(KEY_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise ProblemError(400, "Invalid Idempotency-Key", "send one Idempotency-Key header, not several")
    if not _KEY.match(values[0]):
        raise ProblemError(400, "Invalid Idempotency-Key", f"an Idempotency-Key is {_KEY_RULE}")
    return values[0]


def actor_of(request: Request) -> str:
    """Who sends the command: the verified token's subject, else the subject the api forwarded."""
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        return str(principal.subject)[:MAX_ACTOR]
    # Until the internal routes verify tokens themselves: the api's header. Then this line becomes
    # `return ANONYMOUS` (a route without a principal is then one that needs no token).
    return (request.headers.get(ACTOR_HEADER) or ANONYMOUS)[:MAX_ACTOR]


def request_digest(method: str, path: str, body: bytes) -> tuple[str, str | None]:
    """The SHA-256 (hex) of the method, path and body, and the body as JSON text to store (None when it
    is empty, not JSON, or holds a NUL PostgreSQL's jsonb cannot). A JSON body is digested in canonical
    form (keys sorted, no spaces), so the same object sent with another layout is the same request."""
    stored: str | None = None
    canonical = body
    if body:
        try:
            canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
        except orjson.JSONDecodeError:
            canonical = body
        else:
            text = canonical.decode()
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
        entry = _Entry(now, actor, kind, request.method, request.url.path)
        try:
            raw = await request.body()
            key = idempotency_key(request.headers)
        except ProblemError as exc:  # a malformed key, or a streamed body over the limit
            resp = problem(exc.status, exc.title, exc.detail, **exc.extra)
            await self._audit(pool, entry, resp)
            return resp
        entry.digest, entry.body = request_digest(request.method, request.url.path, raw)
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
                422, "Idempotency-Key reused",
                f"this Idempotency-Key was first sent with another request ({found.kind}); use a new key",
            )
        elif found.status is None:
            resp = problem(
                409, "Request in progress",
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
        if resp.status_code >= 400 and (resp.headers.get("content-type") or "").startswith("application/problem+json"):
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
            log.exception("a command's audit entry could not be written", extra={"kind": entry.kind, "path": entry.path})


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
    under an Idempotency-Key.

    Order of wrappers: inside authentication (``request.state.principal`` must be set when this runs; a
    request refused for its token is not a command), outside whatever turns the service's own errors into
    answers (``_guard`` in the ledger). Exceptions that reach it are answered by the app's exception
    handlers (``shared.http``: ProblemError as its problem, anything else 500), so a domain error nobody
    mapped would be stored and replayed as a 500."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        async def wrapped(request: Request) -> Response:
            return await journal_of(request).run(request, kind, endpoint)

        wrapped.__name__ = getattr(endpoint, "__name__", kind)
        wrapped.__doc__ = endpoint.__doc__
        wrapped.command_kind = kind  # type: ignore[attr-defined]
        return wrapped

    return wrap


def command_kind(endpoint: object) -> str | None:
    """The kind of a ``command`` endpoint; None for any other."""
    kind = getattr(endpoint, "command_kind", None)
    return kind if isinstance(kind, str) else None

# ---------------------------------------------------------------- OpenAPI



IDEMPOTENCY_KEY_PARAMETER: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
    "description": f"{_KEY_RULE}. A retry with the same key and request answers the first answer (header "
    "Idempotent-Replayed: true) without running the command again; keys are per actor and kept 24 hours.",
}
_COMMAND_ERRORS = {
    "400": "The Idempotency-Key is malformed (or sent twice).",
    "409": "A request with this Idempotency-Key has not answered yet (running, or stopped midway).",
    "422": "This Idempotency-Key was sent with another request (method, path or body).",
}


def with_command(operation: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI operation of a command: with the Idempotency-Key header and its refusals."""
    out = dict(operation)
    out["parameters"] = [*operation.get("parameters", []), IDEMPOTENCY_KEY_PARAMETER]
    responses = dict(operation.get("responses", {}))
    for status, text in _COMMAND_ERRORS.items():
        if status in responses:
            responses[status] = {**responses[status], "description": f"{responses[status]['description']} Or: {text}"}
        else:
            responses[status] = problem_doc(text)
    out["responses"] = responses
    return out


def with_commands(paths: dict[str, Any]) -> dict[str, Any]:
    """``paths`` with every POST operation documented as a command (all of a service's POSTs are)."""
    return {path: {m: with_command(op) if m == "post" else op for m, op in ops.items()} for path, ops in paths.items()}
