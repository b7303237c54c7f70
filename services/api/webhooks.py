"""Webhooks: deliver each alert and each statement (issued or amended) of a customer to the URLs subscribed to
it, as signed POSTs (``shared.webhooks``), retried with exponential backoff for 24 hours, every attempt recorded.

- Enqueueing: the alerts consumer (``ledger.alerts.v1``) and the read model's ledger consumer (statements, in
  the projector's transaction) insert one delivery per (subscription, event), with an id derived from both,
  so a message consumed again enqueues nothing twice. Posting in the ledger never waits for any of this.
- Sending: a loop of each api instance claims due deliveries (``FOR UPDATE SKIP LOCKED``, then a
  ``claimed_until`` committed before any POST: instances never send the same delivery at once, and no
  transaction stays open while receivers answer), POSTs them, records the attempt and schedules the next
  one; a 2xx answer delivers, no 2xx within 24 hours of the event fails the delivery.
- ``clock`` (the time of enqueueing, signing and scheduling) is an attribute, so a test can move it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import orjson
from prometheus_client import Counter
from starlette.responses import Response

from services.api import webhook_schemas as ws
from shared.clock import utcnow
from shared.contracts import AlertRaised, StatementIssued
from shared.db import Conn
from shared.edge import NOT_FOUND, Call, Cursor, Operation, ProblemError, answer
from shared.edge.problems import INVALID_BODY
from shared.ids import uuid7
from shared.kafka import Received
from shared.webhooks import GIVE_UP_AFTER, backoff, delivery_id, signed_headers

__all__ = ["Webhooks", "envelope"]

log = logging.getLogger(__name__)

ATTEMPTS = Counter("billing_webhook_attempts_total", "Webhook POSTs made", ["outcome"])
# A claim lasts a POST's timeout and this much more (recording the attempts after the answers).
CLAIM_MARGIN_SECONDS = 30

Event = AlertRaised | StatementIssued
CheckCustomer = Callable[[Call, UUID], Any]  # awaitable: raises the ProblemError of an unknown customer


def event_type(event: Event) -> str:
    """An alert; a month's statement: its close (version 1) or an amended version (2, 3, ...)."""
    if isinstance(event, AlertRaised):
        return "alert.raised"
    return "statement.issued" if event.version == 1 else "statement.amended"


def envelope(event: Event, kind: str, created_at: datetime) -> bytes:
    """The body POSTed for ``event``: its id, type and customer, when it was enqueued, and the message."""
    return orjson.dumps(
        {
            "id": str(event.id),
            "type": kind,
            "created_at": created_at.isoformat().replace("+00:00", "Z"),
            "customer_id": str(event.customer_id),
            "data": event.model_dump(mode="json"),
        }
    )


class Webhooks:
    """The subscriptions' routes, the enqueueing of events and the sending loop of one api instance."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        check_customer: CheckCustomer,
        *,
        poll_seconds: float = 1.0,
        timeout_seconds: float = 5.0,
        batch: int = 20,
        https_only: bool = False,
    ) -> None:
        self._pool = pool
        self._check_customer = check_customer
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        self.batch = batch
        self.https_only = https_only
        self.clock: Callable[[], datetime] = utcnow
        self.jitter: Callable[[], float] = random.random
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_seconds), follow_redirects=False, trust_env=False
        )
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="webhook-sender")

    async def stop(self) -> None:
        """Let the batch in hand finish and be recorded (a POST answered 2xx but not recorded would be sent
        again), then stop; cancelled if it takes longer than a POST may (its deliveries are tried again once
        their claim has run out)."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            # Past that, wait_for cancels it: its deliveries are tried again when their claim runs out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._task, self.timeout_seconds + 5)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def operations(self) -> list[Operation]:
        return [
            ws.WEBHOOKS.bind(self.list_webhooks),
            ws.SUBSCRIBE.bind(self.subscribe),
            ws.UNSUBSCRIBE.bind(self.unsubscribe),
            ws.DELIVERIES.bind(self.deliveries),
        ]

    # ------------------------------------------------------------------------------------ enqueueing

    async def on_alerts(self, batch: list[Received[AlertRaised]]) -> None:
        """The alerts consumer: one delivery per subscription that wants alerts, committed before the offset."""
        async with self._pool().acquire() as conn, conn.transaction():
            await self.enqueue(conn, [r.message for r in batch])

    async def enqueue(self, conn: Conn, events: Sequence[Event]) -> int:
        """Insert the deliveries of ``events`` (in the caller's transaction); returns how many are new."""
        if not events:
            return 0
        subs = await conn.fetch(
            "SELECT id, customer_id, events FROM webhook_subscription WHERE active AND customer_id = ANY($1::uuid[])",
            list({e.customer_id for e in events}),
        )
        if not subs:
            return 0
        now = self.clock()
        rows = []
        for e in events:
            kind = event_type(e)
            body = envelope(e, kind, now)
            for s in subs:
                if s["customer_id"] == e.customer_id and kind in s["events"]:
                    rows.append((delivery_id(s["id"], e.id), s["id"], e.id, kind, body, now))
        if not rows:
            return 0
        inserted = await conn.fetch(
            """
            INSERT INTO webhook_delivery (id, subscription_id, event_id, event_type, payload, next_attempt_at,
                                          created_at)
            SELECT r.id, r.sub, r.event, r.kind, r.payload, r.at, r.at
            FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bytea[], $6::timestamptz[])
                 AS r(id, sub, event, kind, payload, at)
            ON CONFLICT (id) DO NOTHING
            RETURNING id
            """,
            *map(list, zip(*rows, strict=True)),
        )
        if inserted:
            self._wake.set()
        return len(inserted)

    async def enqueue_statements(self, conn: Conn, statements: Sequence[StatementIssued]) -> None:
        """The projector's hook: statements, in the read model's transaction."""
        await self.enqueue(conn, statements)

    # ------------------------------------------------------------------------------------ sending

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking: an event enqueued while sending wakes the next wait at once
            try:
                sent = await self.send_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database away: try again at the next poll
                log.exception("webhook sending failed; retrying")
                sent = 0
            if sent < self.batch and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    async def send_due(self) -> int:
        """Claim up to ``batch`` deliveries due by the clock, POST them at once, record the attempts; returns
        how many were tried. The claim (``claimed_until``, longer than a POST may take) is committed before
        the POSTs, so no transaction or row lock is held while the receivers answer; another instance skips
        claimed rows, and a claim whose sender died runs out and the delivery is tried again."""
        assert self._client is not None, "webhooks not started"
        now = self.clock()
        async with self._pool().acquire() as conn, conn.transaction():
            due = await conn.fetch(
                """
                SELECT d.id, d.payload, d.attempts, d.created_at, s.url, s.secret
                FROM webhook_delivery d JOIN webhook_subscription s ON s.id = d.subscription_id
                WHERE d.status = 'pending' AND d.next_attempt_at <= $1
                  AND (d.claimed_until IS NULL OR d.claimed_until <= $1)
                ORDER BY d.next_attempt_at
                LIMIT $2
                FOR UPDATE OF d SKIP LOCKED
                """,
                now,
                self.batch,
            )
            if not due:
                return 0
            await conn.execute(
                "UPDATE webhook_delivery SET claimed_until = $2 WHERE id = ANY($1::uuid[])",
                [r["id"] for r in due], now + timedelta(seconds=self.timeout_seconds + CLAIM_MARGIN_SECONDS),
            )
        results = await asyncio.gather(*(self._post(r) for r in due))
        async with self._pool().acquire() as conn, conn.transaction():
            for r, (at, code, error, ms) in zip(due, results, strict=True):
                n = r["attempts"] + 1
                await conn.execute(
                    "INSERT INTO webhook_attempt (delivery_id, n, at, status_code, error, duration_ms) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    r["id"], n, at, code, error, ms,
                )
                status, next_at = self.outcome(n, at, r["created_at"], code)
                await conn.execute(
                    "UPDATE webhook_delivery SET attempts = $2, status = $3, next_attempt_at = $4, "
                    "claimed_until = NULL, "
                    "finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE $5::timestamptz END WHERE id = $1",
                    r["id"], n, status, next_at, at,
                )
                ATTEMPTS.labels(status if status != "pending" else "retry").inc()
        return len(due)

    def outcome(self, n: int, at: datetime, created_at: datetime, code: int | None) -> tuple[str, datetime]:
        """(status, next attempt) after attempt ``n`` at ``at`` answered ``code``: delivered on a 2xx; else
        retried after the backoff, the last time at 24 hours after creation, then failed."""
        if code is not None and 200 <= code < 300:
            return "delivered", at
        deadline = created_at + GIVE_UP_AFTER
        if at >= deadline:
            return "failed", at
        return "pending", min(at + backoff(n, self.jitter), deadline)

    async def _post(self, r: asyncpg.Record) -> tuple[datetime, int | None, str | None, int]:
        """One attempt: (when, status code or None, error or None, milliseconds)."""
        assert self._client is not None
        at = self.clock()
        body: bytes = r["payload"]
        started = time.perf_counter()
        code: int | None = None
        error: str | None = None
        try:
            headers = signed_headers(r["secret"], r["id"], at, body)
            resp = await self._client.post(r["url"], content=body, headers=headers)
            code = resp.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        return at, code, error, int((time.perf_counter() - started) * 1000)

    # ------------------------------------------------------------------------------------ routes

    async def subscribe(self, call: Call) -> Response:
        body = call.body_as(ws.WebhookIn)
        if self.https_only and body.url.scheme != "https":
            raise ProblemError(INVALID_BODY, "url: only https URLs are accepted in production")
        await self._check_customer(call, body.customer_id)
        secret = body.secret or secrets.token_urlsafe(32)
        async with self._pool().acquire() as conn:
            row = await conn.fetchrow(
                """
                INSERT INTO webhook_subscription (id, customer_id, url, events, secret, created_at, created_by)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                RETURNING id, customer_id, url, events, active, created_at, created_by
                """,
                uuid7(), body.customer_id, str(body.url), list(body.events), secret, self.clock(), call.caller.subject,
            )
        assert row is not None
        return answer(ws.WebhookCreated.model_validate({**dict(row), "secret": secret}), 201)

    async def list_webhooks(self, call: Call) -> Response:
        q = call.query_as(ws.WebhooksQuery)
        scope = Cursor.scope_of("webhooks", q.customer_id)
        pos = Cursor.decode(q.cursor, scope, (UUID,))
        async with self._pool().acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT id, customer_id, url, events, active, created_at, created_by FROM webhook_subscription
                WHERE active AND ($1::uuid IS NULL OR customer_id = $1) AND ($2::uuid IS NULL OR id > $2)
                ORDER BY id LIMIT $3
                """,
                q.customer_id, pos[0] if pos else None, q.limit + 1,
            )
        page, more = rows[:q.limit], len(rows) > q.limit
        return answer(
            ws.WebhookPage(
                items=[ws.Webhook.model_validate(dict(r)) for r in page],
                next_cursor=Cursor.encode(scope, [page[-1]["id"]]) if more else None,
            )
        )

    async def unsubscribe(self, call: Call) -> Response:
        webhook = call.path_as(ws.WebhookPath).webhook_id
        async with self._pool().acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "UPDATE webhook_subscription SET active = false WHERE id = $1 AND active RETURNING id", webhook
            )
            if done is None:
                raise ProblemError(NOT_FOUND, ws.NO_WEBHOOK)
            await conn.execute(
                "UPDATE webhook_delivery SET status = 'failed', finished_at = $2 "
                "WHERE subscription_id = $1 AND status = 'pending'",
                webhook, self.clock(),
            )
        return Response(status_code=204)

    async def deliveries(self, call: Call) -> Response:
        webhook = call.path_as(ws.WebhookPath).webhook_id
        q = call.query_as(ws.DeliveriesQuery)
        scope = Cursor.scope_of("webhook-deliveries", webhook, q.status)
        pos = Cursor.decode(q.cursor, scope, (datetime, UUID))
        async with self._pool().acquire() as conn:
            if await conn.fetchval("SELECT 1 FROM webhook_subscription WHERE id = $1", webhook) is None:
                raise ProblemError(NOT_FOUND, "no such subscription")
            rows = await conn.fetch(
                """
                SELECT id, event_id, event_type, status, attempts, next_attempt_at, created_at, finished_at
                FROM webhook_delivery
                WHERE subscription_id = $1 AND ($2::text IS NULL OR status = $2)
                  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
                ORDER BY created_at DESC, id DESC LIMIT $5
                """,
                webhook, q.status, pos[0] if pos else None, pos[1] if pos else None, q.limit + 1,
            )
            page, more = rows[:q.limit], len(rows) > q.limit
            attempts = await conn.fetch(
                "SELECT delivery_id, n, at, status_code, error, duration_ms FROM webhook_attempt "
                "WHERE delivery_id = ANY($1::uuid[]) ORDER BY delivery_id, n",
                [r["id"] for r in page],
            )
        log_of: dict[UUID, list[ws.Attempt]] = {}
        for a in attempts:
            log_of.setdefault(a["delivery_id"], []).append(ws.Attempt.model_validate(dict(a)))
        items = [
            ws.Delivery.model_validate(
                {
                    **dict(r),
                    "next_attempt_at": r["next_attempt_at"] if r["status"] == "pending" else None,
                    "attempt_log": log_of.get(r["id"], []),
                }
            )
            for r in page
        ]
        last = page[-1] if page else None
        cursor = Cursor.encode(scope, [last["created_at"], last["id"]]) if more and last is not None else None
        return answer(ws.DeliveryPage(items=items, next_cursor=cursor))

