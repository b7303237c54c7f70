"""Continuous usage posting: a batch of charges (from Kafka, or held charges whose org got a customer)
becomes at most one usage transaction per (customer, reading hour), exactly.

The rule: for every (customer, billing month, price), the microcredits posted equal floor(exact sum of the
month's charges at their latest revision), whatever the order, batching, duplication, replay or revision.
``repository.allocate`` does the arithmetic; this module orders the locks, turns the allocated amounts
into balanced transactions (drawing on the agreements' pools), raises alerts and fills the outbox.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg

from services.ledger import messages
from services.ledger import repository as repo
from services.ledger.domain import (
    NIL_PRICE,
    Book,
    TransactionDraft,
    UsageAmount,
    effective_time,
    next_month,
    open_month_on_or_after,
    thresholds_reached,
    usage_transaction,
)
from shared.clock import billing_month
from shared.contracts import ChargeComputed
from shared.ids import uuid7

__all__ = [
    "ConcurrentChargeUpdateError",
    "Posting",
    "batch_digest",
    "batch_months",
    "charge_row",
    "invalid_reason",
    "lock_open_months",
    "post_incoming",
    "raise_alerts",
    "record_transactions",
]


class ConcurrentChargeUpdateError(asyncpg.SerializationError):
    """Another transaction applied a charge of this batch meanwhile: retry the batch (a serialization
    failure, so the shared consumer and the service's retries treat it as transient)."""


@dataclass
class Posting:
    """What one posting did; ``outbox_ids`` are to be published after the commit."""

    changed: int = 0
    held: int = 0
    transactions: int = 0
    alerts: int = 0
    outbox_ids: list[int] = field(default_factory=list)


def invalid_reason(charge: ChargeComputed) -> str | None:
    """Why the ledger refuses a (schema-valid) charge, or None."""
    if charge.status == "priced" and charge.price_id is None:
        return "priced charge without price_id"
    if charge.status == "unpriced" and charge.amount_numerator != 0:
        return "unpriced charge with a non-zero amount"
    return None


def charge_row(c: ChargeComputed) -> tuple[Any, ...]:
    """A charge as a row of the batch table (repository.INCOMING_COLUMNS)."""
    return (
        c.measurement_id,
        c.revision,
        c.reading_hour,
        c.org_id,
        c.meter,
        c.resource_kind,
        c.resource_id,
        c.price_id or NIL_PRICE,
        c.amount_numerator,
        c.amount_denominator,
    )


async def lock_open_months(conn: repo.Conn, months: Iterable[date]) -> frozenset[date]:
    """Take the shared lock of the month each of ``months`` posts into (itself, or the first open month
    after it when closed) and return the closed months, read once those locks are held: a month whose lock
    is held cannot be closed before this transaction ends."""
    months = set(months)
    locked: set[date] = set()
    while True:
        closed = await repo.closed_months(conn)
        need = {open_month_on_or_after(m, closed) for m in months} - locked
        if not need:
            return closed
        await repo.lock_months_shared(conn, need)
        locked |= need


async def post_incoming(
    conn: repo.Conn, now: datetime, months: Iterable[date] | None = None, digest: str | None = None
) -> Posting:
    """Post what the batch table (ledger_incoming) holds. Runs inside the caller's transaction.

    ``months`` (the billing months of the batch's hours) and ``digest`` (identifies the batch in its
    transactions' idempotency keys) are computed from the table when not given.
    Lock order, the same everywhere: months (shared), then (customer, month, price) rows by id, then the
    customers' accounts by id."""
    result = Posting()
    closed = await lock_open_months(conn, months if months is not None else await repo.incoming_months(conn))
    await repo.resolve(conn)
    result.held = await repo.hold_unassigned(conn)
    result.changed, replacing = await repo.work_counts(conn)
    if result.changed == 0:
        return result
    await repo.create_groups(conn)
    try:
        replaced = await repo.apply_charges(conn)
    except asyncpg.UniqueViolationError as exc:
        raise ConcurrentChargeUpdateError("a charge of this batch was first applied concurrently") from exc
    if replaced != replacing:
        raise ConcurrentChargeUpdateError("a charge of this batch was revised concurrently")
    await repo.collect_deltas(conn)
    await repo.lock_groups(conn)
    await repo.allocate(conn)
    amounts = await repo.allocations(conn)
    if not amounts:
        return result
    if digest is None:
        digest = await repo.incoming_digest(conn)
    per_hour: dict[tuple[uuid.UUID, datetime], list[UsageAmount]] = defaultdict(list)
    for r in amounts:
        per_hour[(r["customer_id"], r["reading_hour"])].append(
            UsageAmount(r["org_id"], r["meter"], r["resource_kind"], r["price_id"], r["month"], r["amount"])
        )
    books = await repo.load_books(conn, {cid for cid, _ in per_hour})
    drafts: list[TransactionDraft] = []
    for (customer_id, hour), lines in sorted(per_hour.items()):
        month = lines[0].month
        occurred_at, late = effective_time(hour, month, closed)
        kind = "late_usage" if late else "usage"
        draft = usage_transaction(
            books[customer_id],
            hour,
            lines,
            late=late,
            occurred_at=occurred_at,
            idempotency_key=f"{kind}:{customer_id}:{hour.isoformat()}:{digest}",
        )
        if draft is not None:
            drafts.append(draft)
    _, outbox = await record_transactions(conn, drafts, now)
    alert_messages = await raise_alerts(conn, books.values(), drafts, now)
    result.transactions = len(drafts)
    result.alerts = len(alert_messages)
    result.outbox_ids = outbox + await repo.insert_outbox(conn, alert_messages)
    return result


def batch_digest(charges: Sequence[ChargeComputed]) -> str:
    """Identifies a delivered batch by its charges (ids are uuid5 of measurement and revision): the sum of
    their ids and their count. Order-free, so a replayed batch yields the same idempotency keys."""
    total = sum(c.id.int for c in charges) % (1 << 128)
    return f"{total:032x}.{len(charges)}"


def batch_months(charges: Sequence[ChargeComputed]) -> set[date]:
    """The billing months from the batch's earliest to its latest hour (min/max are much cheaper than
    hashing every aware datetime; a month in between without charges costs one more shared lock)."""
    first = min(c.reading_hour for c in charges)
    last = billing_month(max(c.reading_hour for c in charges))
    months, month = set(), billing_month(first)
    while month <= last:
        months.add(month)
        month = next_month(month)
    return months


async def record_transactions(
    conn: repo.Conn, drafts: Sequence[TransactionDraft], now: datetime
) -> tuple[list[uuid.UUID], list[int]]:
    """Insert the drafts as transactions (new UUIDv7 ids) and their TransactionPosted messages into the
    outbox; returns (transaction ids, outbox ids)."""
    if not drafts:
        return [], []
    ids = [uuid7() for _ in drafts]
    await repo.insert_transactions(conn, drafts, ids, now)
    outbox = await repo.insert_outbox(
        conn, [messages.to_outbox(messages.transaction_posted(d, tid, now)) for d, tid in zip(drafts, ids, strict=True)]
    )
    return ids, outbox


async def raise_alerts(
    conn: repo.Conn, books: Iterable[Book], drafts: Sequence[TransactionDraft], now: datetime
) -> list[messages.OutboxMessage]:
    """AlertRaised for each threshold an agreement drawn on by ``drafts`` reached for the first time."""
    drawn = {e.account_id for d in drafts for e in d.entries if e.side == "debit"}
    rows = []
    for book in books:
        for pool in book.pools:
            if pool.account.id not in drawn:
                continue
            used = pool.credits - pool.remaining
            for threshold in thresholds_reached(pool.credits, used):
                rows.append((pool.agreement_id, threshold, book.customer_id, pool.credits, used, now))
    fresh = await repo.insert_alerts(conn, rows)
    return [
        messages.to_outbox(
            messages.alert_raised(
                r["customer_id"], r["agreement_id"], r["threshold_percent"], r["funded"], r["used"], r["raised_at"]
            )
        )
        for r in sorted(fresh, key=lambda r: (r["agreement_id"], r["threshold_percent"]))
    ]
