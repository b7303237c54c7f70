"""The ledger's commands and queries. Each method is one database transaction (retried on a serialization
failure or deadlock) and returns what it did, with the outbox ids its caller publishes after the commit.
No HTTP or Kafka here."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from services.ledger import messages
from services.ledger import repository as repo
from services.ledger.domain import (
    CREDIT_POOL,
    CUSTOMER_ACCOUNTS,
    EXPIRED,
    FUNDING,
    USAGE,
    Account,
    Pool,
    closed_months_within,
    effective_time,
    expiry_transaction,
    funding_transaction,
    next_month,
    pool_account_name,
    reversal_transaction,
)
from services.ledger.posting import (
    Posting,
    ensure_frames,
    load_held,
    lock_open_months,
    post_batches,
    record_transactions,
)
from services.ledger.settings import LedgerSettings
from shared.batches import Charges, ShardKey
from shared.blobs import Frames
from shared.clock import billing_month, month_bounds, utcnow
from shared.contracts import StatementIssued, StatementLine
from shared.db import Conn
from shared.ids import measurement_id, uuid7

__all__ = [
    "CloseResult",
    "ConflictError",
    "HeldPage",
    "InvalidError",
    "LedgerError",
    "LedgerService",
    "NotFoundError",
    "Result",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

HELD_BATCH = 200  # (shard, org) rows of held charges posted per database transaction
RETRIES = 4


class LedgerError(Exception):
    """A command the ledger refuses; ``title`` names the problem for the HTTP answer."""

    status = 400

    def __init__(self, title: str, detail: str = "") -> None:
        super().__init__(detail or title)
        self.title, self.detail = title, detail


class NotFoundError(LedgerError):
    status = 404


class ConflictError(LedgerError):
    status = 409


class InvalidError(LedgerError):
    status = 422


@dataclass
class Result:
    """A command's answer, and the outbox rows to publish once it is committed."""

    body: dict[str, Any]
    outbox_ids: list[int] = field(default_factory=list)
    created: bool = True


@dataclass
class HeldPage:
    """A page of held charges and the position of its last one (None: the end)."""

    items: list[dict[str, Any]]
    next_cursor: tuple[datetime, str, int, str, str] | None


@dataclass
class CloseResult:
    month: date
    closed_at: datetime
    statements: int
    already_closed: bool
    outbox_ids: list[int] = field(default_factory=list)


class LedgerService:
    def __init__(self, pool: asyncpg.Pool, settings: LedgerSettings, clock: Callable[[], datetime] = utcnow) -> None:
        self._pool = pool
        self._settings = settings
        self._clock = clock
        self.frames = Frames()  # the documents' compression frames (shared/blobs.py), one set per database

    async def _retrying(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``work`` in a transaction, again if PostgreSQL reports a serialization failure or deadlock."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    return await work(conn)
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                if attempt >= RETRIES:
                    raise
                log.warning("transaction conflict; retrying", extra={"attempt": attempt})

    # ------------------------------------------------------------ usage

    async def post_charges(self, batches: Sequence[Charges]) -> Posting:
        """Post charges batches in one transaction. Not retried here: the consumer retries."""
        await ensure_frames(self.frames, self._pool, batches)
        async with self._pool.acquire() as conn, conn.transaction():
            return await post_batches(conn, self.frames, batches, self._clock())

    async def post_resolvable_held(self, org_id: str | None = None) -> Posting:
        """Post held charges whose org now has a customer at their hour (one org, or all), some shards at
        a time."""
        total = Posting()
        while True:

            async def one_batch(conn: Conn) -> tuple[Posting, int]:
                found = await repo.resolvable_held(conn, org_id, HELD_BATCH)
                if not found:
                    return Posting(), 0
                return await post_batches(conn, self.frames, [], self._clock(), release=found), len(found)

            posting, found = await self._retrying(one_batch)
            total.changed += posting.changed
            total.released += posting.released
            total.transactions += posting.transactions
            total.alerts += posting.alerts
            total.outbox_ids += posting.outbox_ids
            if found < HELD_BATCH:
                return total

    async def list_held(self, after: tuple[datetime, str, int, str, str] | None, limit: int) -> HeldPage:
        """Held charges, one document each, in (hour, meter, shard, org, resource) order after ``after``."""
        items: list[dict[str, Any]] = []
        start = after[:4] if after is not None else None
        async with self._pool.acquire() as conn:
            while True:
                rows = await repo.list_held(conn, self.frames, start, 100)
                for r, doc in rows:
                    key = ShardKey(r["reading_hour"], r["meter"], r["shard"])
                    for rid, (rev, kind, price, num, den) in sorted(load_held(doc).items()):
                        position = (key.reading_hour, key.meter, key.shard, r["org_id"], rid)
                        if after is not None and position <= after:
                            continue
                        items.append(
                            {
                                "measurement_id": measurement_id(key.reading_hour, key.meter, rid),
                                "revision": rev,
                                "reading_hour": key.reading_hour,
                                "org_id": r["org_id"],
                                "meter": key.meter,
                                "resource_kind": kind,
                                "resource_id": rid,
                                "price_id": uuid.UUID(price) if price else None,
                                "amount_numerator": num,
                                "amount_denominator": den,
                                "held_at": r["held_at"],
                            }
                        )
                        if len(items) == limit:
                            return HeldPage(items, position)
                if len(rows) < 100:
                    return HeldPage(items, None)
                last = rows[-1][0]
                start = (last["reading_hour"], last["meter"], last["shard"], last["org_id"] + "\x00")

    # ------------------------------------------------------------ tiers and customers

    async def create_tier(self, name: str, credits_per_period: int) -> Result:
        async def work(conn: Conn) -> Result:
            row = await repo.insert_tier(conn, name, credits_per_period)
            if row is None:
                raise ConflictError("Tier exists", f"a tier named {name!r} already exists")
            return Result(dict(row))

        return await self._retrying(work)

    async def list_tiers(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await repo.list_tiers(conn, after, limit)]

    async def create_customer(self, name: str, tier: str) -> Result:
        async def work(conn: Conn) -> Result:
            if await repo.get_tier(conn, tier) is None:
                raise NotFoundError("Tier not found", f"no tier named {tier!r}")
            row = await repo.insert_customer(conn, uuid7(), name, tier, CUSTOMER_ACCOUNTS)
            return Result(dict(row))

        return await self._retrying(work)

    async def list_customers(self, after: uuid.UUID | None, limit: int) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await repo.list_customers(conn, after, limit)]

    async def get_customer(self, customer_id: uuid.UUID) -> dict[str, Any]:
        async with self._pool.acquire() as conn:
            row = await repo.get_customer(conn, customer_id)
        if row is None:
            raise NotFoundError("Customer not found", f"no customer {customer_id}")
        return dict(row)

    # ------------------------------------------------------------ org assignments

    async def assign_org(self, org_id: str, customer_id: uuid.UUID, starts_at: datetime) -> Result:
        """Assign ``org_id`` to a customer from ``starts_at``; held charges it covers are posted in the same
        transaction (up to HELD_BATCH of them; the periodic task posts any rest). Refused (409) when it
        would give a closed month's hours of the org to another customer than the one they had (an org
        without a customer then may be assigned: its held usage posts as late usage)."""

        async def work(conn: Conn) -> Result:
            customer = await repo.get_customer(conn, customer_id)
            if customer is None:
                raise NotFoundError("Customer not found", f"no customer {customer_id}")
            before, until = await repo.assignments_around(conn, org_id, starts_at)
            if before is not None and before != customer_id:
                months = closed_months_within(starts_at, until, await repo.closed_months(conn))
                if months:
                    last = months[-1]
                    raise ConflictError(
                        "Month closed",
                        f"{last:%Y-%m} is closed, and org {org_id} belonged to customer {before} in it: an assignment "
                        f"from {starts_at.isoformat()} would move usage posted in a closed month to another customer; "
                        f"start it at {month_bounds(last)[1].isoformat()} or later",
                    )
            row = await repo.insert_assignment(conn, org_id, customer_id, starts_at)
            if row is None:
                raise ConflictError(
                    "Assignment exists", f"org {org_id} already has an assignment starting {starts_at.isoformat()}"
                )
            # Published with the assignment (same transaction): the pricer resolves tier and customer prices
            # with it (ledger.assignments.v1).
            published = await repo.insert_outbox(
                conn,
                [messages.org_assigned_outbox(org_id, row["starts_at"], customer_id, customer["tier"],
                                              row["created_at"])],
            )
            found = await repo.resolvable_held(conn, org_id, HELD_BATCH)
            posting = await post_batches(conn, self.frames, [], self._clock(), release=found)
            body = dict(row) | {"held_charges_posted": posting.released}
            return Result(body, sorted(published + posting.outbox_ids))

        return await self._retrying(work)

    async def list_assignments(
        self, org_id: str | None, customer_id: uuid.UUID | None, after: tuple[str, datetime] | None, limit: int
    ) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [dict(r) for r in await repo.list_assignments(conn, org_id, customer_id, after, limit)]

    # ------------------------------------------------------------ agreements

    async def create_agreement(
        self, customer_id: uuid.UUID, starts_at: datetime, ends_at: datetime, credits: int | None
    ) -> Result:
        """Create an agreement and post its funding at ``starts_at`` (the tier's credits unless given)."""
        if ends_at <= starts_at:
            raise InvalidError("Invalid agreement", "ends_at must be after starts_at")

        async def work(conn: Conn) -> Result:
            customer = await repo.get_customer(conn, customer_id)
            if customer is None:
                raise NotFoundError("Customer not found", f"no customer {customer_id}")
            amount = credits
            if amount is None:
                tier = await repo.get_tier(conn, customer["tier"])
                assert tier is not None  # customers.tier references tiers (name)
                amount = int(tier["credits_per_period"])
            month = billing_month(starts_at)
            closed = closed_months_within(starts_at, None, await lock_open_months(conn, [month]))
            if closed:
                last = closed[-1]
                raise ConflictError(
                    "Month closed",
                    f"{last:%Y-%m} is closed; an agreement cannot be funded in or before a closed month (its funding "
                    f"would change that month's statement): start it at {month_bounds(last)[1].isoformat()} or later",
                )
            book = (await repo.load_books(conn, [customer_id]))[customer_id]
            agreement_id = uuid7()
            name = pool_account_name(agreement_id)
            account_id = await repo.insert_agreement(conn, agreement_id, customer_id, starts_at, ends_at, amount, name)
            pool = Pool(agreement_id, starts_at, ends_at, amount, False, Account(account_id, name, CREDIT_POOL, 0))
            book.pools.append(pool)
            ids, outbox = await record_transactions(conn, [funding_transaction(book, pool, starts_at)], self._clock())
            row = await repo.get_agreement(conn, agreement_id)
            assert row is not None  # inserted above, in this transaction
            return Result(_agreement(row) | {"funding_transaction_id": ids[0]}, outbox)

        return await self._retrying(work)

    async def list_agreements(
        self, customer_id: uuid.UUID | None, after: uuid.UUID | None, limit: int
    ) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return [_agreement(r) for r in await repo.list_agreements(conn, customer_id, after, limit)]

    async def expire_due(self) -> tuple[int, list[int]]:
        """Expire the unused credits of every agreement that ended more than the settlement delay ago.
        Returns (agreements expired, outbox ids)."""
        now = self._clock()
        cutoff = now - timedelta(hours=self._settings.settlement_delay_hours)
        async with self._pool.acquire() as conn:
            due = await repo.due_agreements(conn, cutoff, 1000)
        count, outbox_ids = 0, []
        for agreement in due:

            async def work(conn: Conn, agreement_id: uuid.UUID = agreement["id"]) -> list[int] | None:
                row = await repo.lock_unexpired_agreement(conn, agreement_id)
                if row is None:
                    return None  # another instance expired it
                month = billing_month(row["ends_at"])
                closed = await lock_open_months(conn, [month])
                occurred_at, _ = effective_time(row["ends_at"], month, closed)
                book = (await repo.load_books(conn, [row["customer_id"]]))[row["customer_id"]]
                pool = next(p for p in book.pools if p.agreement_id == agreement_id)
                draft = expiry_transaction(book, pool, occurred_at)
                ids, outbox = await record_transactions(conn, [draft] if draft else [], now)
                await repo.mark_expired(conn, agreement_id, now, ids[0] if ids else None)
                return outbox

            done = await self._retrying(work)
            if done is not None:
                count += 1
                outbox_ids += done
        return count, outbox_ids

    # ------------------------------------------------------------ months and statements

    async def close_month(self, month: date) -> CloseResult:
        """Close an ended month: a statement per customer, published as StatementIssued. Idempotent."""
        now = self._clock()
        start, end = month_bounds(month)
        if end > now:
            raise ConflictError("Month not ended", f"{month:%Y-%m} ends at {end.isoformat()}; it cannot be closed yet")

        async def work(conn: Conn) -> CloseResult:
            await repo.lock_month_exclusive(conn, month)
            closed_at = await repo.month_close(conn, month)
            if closed_at is not None:
                return CloseResult(month, closed_at, await repo.count_statements(conn, month), True)
            # Everything that has become postable belongs in the statement: held charges of the month (and
            # earlier) whose org got its customer meanwhile, e.g. charges in flight while an org was being
            # assigned. Posted under the exclusive lock, so nothing is held for the month after this.
            outbox: list[int] = []
            while found := await repo.resolvable_held(conn, None, HELD_BATCH, before=end):
                posted = await post_batches(conn, self.frames, [], now, release=found)
                outbox += posted.outbox_ids
                if len(found) < HELD_BATCH:
                    break
            await repo.insert_month_close(conn, month, now)
            customers = await repo.customers_active_before(conn, end)
            flows: dict[uuid.UUID, dict[str, tuple[int, int]]] = {c: {} for c in customers}
            for r in await repo.flows(conn, start, end):
                flows.setdefault(r["customer_id"], {})[r["type"]] = (r["before"], r["during"])
            kinds: dict[uuid.UUID, list[messages.Line]] = {}
            for r in await repo.used_by_kind(conn, start, end):
                if r["microcredits"] != 0:
                    kinds.setdefault(r["customer_id"], []).append(
                        (r["meter"], r["resource_kind"], _price_or_none(r["price_id"]), r["microcredits"])
                    )
            rows, outgoing = [], []
            for customer_id in sorted(flows):
                f = flows[customer_id]
                funding, usage, expired = f.get(FUNDING, (0, 0)), f.get(USAGE, (0, 0)), f.get(EXPIRED, (0, 0))
                # Normal sides: funding is debit-normal, usage and expired credit-normal.
                opening = funding[0] + usage[0] + expired[0]
                msg = messages.statement_issued(
                    customer_id,
                    month,
                    opening=opening,
                    funded=funding[1],
                    used=-usage[1],
                    expired=-expired[1],
                    used_by_kind=kinds.get(customer_id, []),
                    issued_at=now,
                )
                rows.append((msg, 0))
                outgoing.append(messages.to_outbox(msg))
            await repo.insert_statements(conn, rows)
            outbox += await repo.insert_outbox(conn, outgoing)
            return CloseResult(month, now, len(rows), False, outbox)

        return await self._retrying(work)

    async def close_due_months(self) -> tuple[int, list[int]]:
        """Close every month that ended more than the close delay ago, from the first month with activity."""
        now = self._clock()
        async with self._pool.acquire() as conn:
            first = await repo.first_activity(conn)
            closed = await repo.closed_months(conn)
        if first is None:
            return 0, []
        count, outbox = 0, []
        month = billing_month(first)
        delay = timedelta(hours=self._settings.month_close_delay_hours)
        while month_bounds(month)[1] + delay <= now:
            if month not in closed:
                result = await self.close_month(month)
                if not result.already_closed:
                    count += 1
                    outbox += result.outbox_ids
            month = next_month(month)
        return count, outbox

    async def statement(self, customer_id: uuid.UUID, month: date, version: int | None = None) -> dict[str, Any]:
        """A version of a closed month's statement (None: the latest), with the list of its versions."""
        async with self._pool.acquire() as conn:
            if await repo.get_customer(conn, customer_id) is None:
                raise NotFoundError("Customer not found", f"no customer {customer_id}")
            row = await repo.get_statement(conn, customer_id, month, version)
            versions = await repo.statement_versions(conn, customer_id, month)
        if row is None:
            if versions:
                raise NotFoundError(
                    "Statement version not found",
                    f"{month:%Y-%m} has versions 1 to {versions[-1]['version']}, not {version}",
                )
            raise NotFoundError("Statement not found", f"no statement for {month:%Y-%m}: the month is not closed")
        out = _statement(row).model_dump(exclude={"schema_name", "schema_version"})
        out["versions"] = [
            {"version": v["version"], "id": v["id"], "issued_at": v["issued_at"], "used": v["used"],
             "correction": v["correction"]}
            for v in versions
        ]
        return out

    async def amend_statements(self, quiet_seconds: float | None = None) -> tuple[list[dict[str, Any]], list[int]]:
        """Issue version n + 1 of each (customer, closed month) statement whose correction transactions are
        not all covered by its version n, once none has been posted for ``quiet_seconds`` (the setting
        ``amend_quiet_seconds`` unless given: the periodic task waits for it so that a re-rating in progress
        gets one version, not one per posting; the operator's command passes 0: it amends now). Returns what
        was issued ({customer_id, month, version, id}) and the outbox ids; issues nothing when nothing is due
        (asking again is harmless)."""
        now = self._clock()
        quiet = self._settings.amend_quiet_seconds if quiet_seconds is None else quiet_seconds
        quiet_since = now - timedelta(seconds=quiet)
        async with self._pool.acquire() as conn:
            due = await repo.due_amendments(conn, quiet_since, 1000)
        issued: list[dict[str, Any]] = []
        outbox: list[int] = []
        for customer_id, month in due:

            async def work(conn: Conn, customer_id: uuid.UUID = customer_id, month: date = month) -> list[int]:
                versions = await repo.lock_statements(conn, customer_id, month)
                fixes = await repo.month_corrections(conn, customer_id, month)
                if not versions or fixes["n"] <= versions[-1]["corrections"] or fixes["last"] > quiet_since:
                    return []  # another instance amended it meanwhile, or a correction came in since
                lines = [
                    (m, k, _price_or_none(uuid.UUID(p) if p else None), int(v))
                    for m, k, p, v in json.loads(fixes["lines"])
                ]
                msg = messages.statement_amended(
                    _statement(versions[0]), versions[-1]["version"] + 1, lines, json.loads(fixes["reasons"]), now
                )
                if not await repo.insert_statements(conn, [(msg, fixes["n"])]):
                    return []
                issued.append({"customer_id": customer_id, "month": msg.month, "version": msg.version, "id": msg.id})
                return await repo.insert_outbox(conn, [messages.to_outbox(msg)])

            outbox += await self._retrying(work)
        return issued, outbox

    # ------------------------------------------------------------ balances

    async def balance(self, customer_id: uuid.UUID, as_of: datetime | None) -> dict[str, Any]:
        """Funded, used, expired and remaining credits over transactions that occurred by ``as_of``."""
        at = as_of or self._clock()
        async with self._pool.acquire() as conn:
            if await repo.get_customer(conn, customer_id) is None:
                raise NotFoundError("Customer not found", f"no customer {customer_id}")
            signed = await repo.balance_flows(conn, customer_id, at)
            pools = await repo.pool_balances_as_of(conn, customer_id, at)
        funded, used, expired = signed.get(FUNDING, 0), -signed.get(USAGE, 0), -signed.get(EXPIRED, 0)
        return {
            "customer_id": customer_id,
            "as_of": at,
            "funded": funded,
            "used": used,
            "expired": expired,
            "remaining": funded - used - expired,
            "agreements": [
                {
                    "id": p["id"],
                    "starts_at": p["starts_at"],
                    "ends_at": p["ends_at"],
                    "credits": p["credits"],
                    "remaining": p["remaining"],
                    "expired_at": p["expired_at"],
                }
                for p in pools
            ],
        }

    # ------------------------------------------------------------ corrections

    async def reverse(self, transaction_id: uuid.UUID, reason: str) -> Result:
        """Post the mirror image of a transaction (once; asking again answers the same reversal)."""

        async def work(conn: Conn) -> Result:
            original = await repo.get_transaction(conn, transaction_id)
            if original is None:
                raise NotFoundError("Transaction not found", f"no transaction {transaction_id}")
            if original["type"] == "reversal":
                raise ConflictError("Cannot reverse a reversal", "post the original transaction again instead")
            now = self._clock()
            month = billing_month(now)
            closed = await lock_open_months(conn, [month])
            customer_id = original["customer_id"]
            book = (await repo.load_books(conn, [customer_id]))[customer_id]
            existing = await repo.reversal_of(conn, transaction_id)  # read under the accounts' locks
            if existing is not None:
                return Result(await self._transaction_body(conn, existing), created=False)
            occurred_at, _ = effective_time(now, month, closed)
            draft = reversal_transaction(
                book,
                transaction_id,
                await repo.transaction_entries(conn, transaction_id),
                await repo.transaction_usage(conn, transaction_id),
                occurred_at=occurred_at,
                reading_hour=original["reading_hour"],
                reason=reason,
            )
            ids, outbox = await record_transactions(conn, [draft], now)
            return Result(await self._transaction_body(conn, ids[0]), outbox)

        return await self._retrying(work)

    async def _transaction_body(self, conn: Conn, transaction_id: uuid.UUID) -> dict[str, Any]:
        row = await repo.get_transaction(conn, transaction_id)
        entries = await repo.transaction_entries(conn, transaction_id)
        usage = await repo.transaction_usage(conn, transaction_id)
        assert row is not None  # callers pass a transaction they found or posted in this transaction
        body = dict(row)
        body["corrects_month"] = row["corrects_month"].isoformat()[:7] if row["corrects_month"] else None
        body["entries"] = [{"account": e.account, "side": e.side, "amount": e.amount} for e in entries]
        body["usage"] = [
            {
                "org_id": u.org_id,
                "meter": u.meter,
                "resource_kind": u.resource_kind,
                "price_id": None if u.price_id.int == 0 else u.price_id,
                "month": u.month.isoformat()[:7],
                "microcredits": u.microcredits,
            }
            for u in usage
        ]
        return body

    # ------------------------------------------------------------ periodic

    async def run_periodic(self) -> list[int]:
        """Held charges that can now be posted, due expiries, due month closes. Returns outbox ids."""
        outbox = (await self.post_resolvable_held()).outbox_ids
        outbox += (await self.expire_due())[1]
        if self._settings.auto_close_months:
            outbox += (await self.close_due_months())[1]
        outbox += (await self.amend_statements())[1]
        return outbox


def _price_or_none(price_id: uuid.UUID | None) -> uuid.UUID | None:
    return None if price_id is None or price_id.int == 0 else price_id


def _statement(row: asyncpg.Record) -> StatementIssued:
    """A stored statement version as its message."""
    return StatementIssued(
        id=row["id"],
        customer_id=row["customer_id"],
        month=row["month"].isoformat()[:7],
        opening_balance=row["opening_balance"],
        funded=row["funded"],
        used=row["used"],
        expired=row["expired"],
        closing_balance=row["closing_balance"],
        used_by_kind=[StatementLine.model_validate(x) for x in json.loads(row["used_by_kind"])],
        issued_at=row["issued_at"],
        version=row["version"],
        original_used=row["original_used"],
        correction=row["correction"],
        reasons=json.loads(row["reasons"]),
    )


def _agreement(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "customer_id": row["customer_id"],
        "starts_at": row["starts_at"],
        "ends_at": row["ends_at"],
        "credits": row["credits"],
        "remaining": row["remaining"],
        "created_at": row["created_at"],
        "expired_at": row["expired_at"],
        "expiry_transaction_id": row["expiry_transaction_id"],
    }
