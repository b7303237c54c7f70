"""The ledger's rules as pure functions over plain data: which accounts a usage amount draws from (the
agreement that expires first, then the next, then overage), where a decrease goes back to, the entries
of each kind of transaction, months that are open, and alert thresholds. No I/O here."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

from shared.clock import month_bounds

__all__ = [
    "CREDIT_POOL",
    "CUSTOMER_ACCOUNTS",
    "EXPIRED",
    "FUNDING",
    "NIL_PRICE",
    "OVERAGE",
    "THRESHOLDS",
    "USAGE",
    "Account",
    "Book",
    "Entry",
    "InsufficientAccountsError",
    "Pool",
    "Side",
    "TransactionDraft",
    "UsageAmount",
    "closed_months_within",
    "effective_time",
    "expiry_transaction",
    "funding_transaction",
    "next_month",
    "open_month_on_or_after",
    "pool_account_name",
    "reversal_transaction",
    "thresholds_reached",
    "usage_transaction",
]

Side = Literal["debit", "credit"]

FUNDING, USAGE, EXPIRED, OVERAGE, CREDIT_POOL = "funding", "usage", "expired", "overage", "credit_pool"
# Every customer has these four accounts from its creation; each agreement adds a credit pool.
CUSTOMER_ACCOUNTS: tuple[str, ...] = (FUNDING, USAGE, EXPIRED, OVERAGE)
# The price id stored for unpriced charges (PostgreSQL keys cannot hold a null cheaply).
NIL_PRICE = uuid.UUID(int=0)
THRESHOLDS: tuple[int, ...] = (50, 75, 90, 100)


class InsufficientAccountsError(RuntimeError):
    """A customer's standard accounts are missing: the customer was not created through the ledger."""


def pool_account_name(agreement_id: uuid.UUID) -> str:
    return f"{CREDIT_POOL}:{agreement_id}"


@dataclass
class Account:
    id: int
    name: str
    type: str
    balance: int  # signed: debits minus credits

    def apply(self, side: Side, amount: int) -> None:
        self.balance += amount if side == "debit" else -amount


@dataclass
class Pool:
    """An agreement's credit pool."""

    agreement_id: uuid.UUID
    starts_at: datetime
    ends_at: datetime
    credits: int
    expired: bool
    account: Account

    @property
    def remaining(self) -> int:
        return -self.account.balance

    def covers(self, hour: datetime) -> bool:
        return not self.expired and self.starts_at <= hour < self.ends_at


@dataclass
class Book:
    """One customer's accounts and agreements, as locked for a posting."""

    customer_id: uuid.UUID
    accounts: dict[str, Account]
    pools: list[Pool] = field(default_factory=list)

    def account(self, name: str) -> Account:
        try:
            return self.accounts[name]
        except KeyError:
            raise InsufficientAccountsError(f"customer {self.customer_id} has no {name} account") from None

    def eligible(self, hour: datetime) -> list[Pool]:
        """The pools usage of ``hour`` draws from, the one that expires first first."""
        pools = [p for p in self.pools if p.covers(hour)]
        pools.sort(key=lambda p: (p.ends_at, p.starts_at, p.agreement_id))
        return pools


@dataclass(frozen=True)
class Entry:
    account_id: int
    account: str
    side: Side
    amount: int


@dataclass(frozen=True)
class UsageAmount:
    """Whole microcredits of one (org, meter, kind, price) posted for one hour (negative: a decrease)."""

    org_id: str
    meter: str
    resource_kind: str
    price_id: uuid.UUID
    month: date
    microcredits: int


@dataclass
class TransactionDraft:
    customer_id: uuid.UUID
    type: str
    occurred_at: datetime
    reading_hour: datetime | None
    description: str
    idempotency_key: str
    entries: list[Entry]
    usage: list[UsageAmount] = field(default_factory=list)
    agreement_id: uuid.UUID | None = None
    reverses: uuid.UUID | None = None
    corrects_month: date | None = None  # a correction: the closed month it restates


class _Entries:
    """Entries of one transaction being built, merged per (account, side), applied to the book."""

    def __init__(self) -> None:
        self._amounts: dict[tuple[int, str, Side], int] = defaultdict(int)
        self._accounts: dict[int, Account] = {}

    def add(self, account: Account, side: Side, amount: int) -> None:
        if amount <= 0:
            return
        self._amounts[(account.id, account.name, side)] += amount
        self._accounts[account.id] = account
        account.apply(side, amount)

    def build(self) -> list[Entry]:
        return [Entry(a, name, side, amt) for (a, name, side), amt in sorted(self._amounts.items())]


def _draw(book: Book, hour: datetime, amount: int, out: _Entries) -> None:
    """Debit ``amount`` from the pools covering ``hour``, earliest expiry first; the rest is overage."""
    for pool in book.eligible(hour):
        if amount == 0:
            return
        take = min(amount, max(0, pool.remaining))
        out.add(pool.account, "debit", take)
        amount -= take
    out.add(book.account(OVERAGE), "debit", amount)


def _give_back(book: Book, hour: datetime, amount: int, out: _Entries) -> None:
    """Credit a usage decrease back: first to the overage owed, then to the pools covering ``hour`` in the
    reverse of the drawing order (up to what each had drawn); any rest is a credit on overage."""
    overage = book.account(OVERAGE)
    take = min(amount, max(0, overage.balance))
    out.add(overage, "credit", take)
    amount -= take
    for pool in reversed(book.eligible(hour)):
        if amount == 0:
            return
        take = min(amount, max(0, pool.credits - pool.remaining))
        out.add(pool.account, "credit", take)
        amount -= take
    out.add(overage, "credit", amount)


def usage_transaction(
    book: Book,
    hour: datetime,
    lines: Sequence[UsageAmount],
    *,
    late: bool,
    occurred_at: datetime,
    idempotency_key: str,
    correction: tuple[str, date] | None = None,
) -> TransactionDraft | None:
    """The usage transaction of one customer and reading hour: the usage account is credited with the
    increases and debited with the decreases; the net draws from (or goes back to) the credit pools.
    None when every line is zero. With ``correction`` (a late one only: its description, "correction <job
    id>: <reason>", and the closed month it restates) it is a ``correction`` transaction instead of late
    usage, the same entries."""
    lines = [line for line in lines if line.microcredits != 0]
    if not lines:
        return None
    increases = sum(line.microcredits for line in lines if line.microcredits > 0)
    decreases = -sum(line.microcredits for line in lines if line.microcredits < 0)
    out = _Entries()
    usage = book.account(USAGE)
    out.add(usage, "credit", increases)
    out.add(usage, "debit", decreases)
    net = increases - decreases
    if net > 0:
        _draw(book, hour, net, out)
    elif net < 0:
        _give_back(book, hour, -net, out)
    kind = "late_usage" if late else "usage"
    stamp = hour.strftime("%Y-%m-%dT%H:00Z")
    draft = TransactionDraft(
        customer_id=book.customer_id,
        type=kind,
        occurred_at=occurred_at,
        reading_hour=hour,
        description=f"{'late usage' if late else 'usage'} of {stamp}",
        idempotency_key=idempotency_key,
        entries=out.build(),
        usage=list(lines),
    )
    if correction is not None:
        draft.type, draft.description, draft.corrects_month = "correction", correction[0], correction[1]
    return draft


def funding_transaction(book: Book, pool: Pool, occurred_at: datetime) -> TransactionDraft:
    out = _Entries()
    out.add(book.account(FUNDING), "debit", pool.credits)
    out.add(pool.account, "credit", pool.credits)
    return TransactionDraft(
        customer_id=book.customer_id,
        type="funding",
        occurred_at=occurred_at,
        reading_hour=None,
        description=f"agreement {pool.agreement_id} funds {pool.credits} microcredits",
        idempotency_key=f"funding:{pool.agreement_id}",
        entries=out.build(),
        agreement_id=pool.agreement_id,
    )


def expiry_transaction(book: Book, pool: Pool, occurred_at: datetime) -> TransactionDraft | None:
    """Expire what is left in ``pool``; None when nothing is left."""
    left = pool.remaining
    if left <= 0:
        return None
    out = _Entries()
    out.add(pool.account, "debit", left)
    out.add(book.account(EXPIRED), "credit", left)
    return TransactionDraft(
        customer_id=book.customer_id,
        type="expiry",
        occurred_at=occurred_at,
        reading_hour=None,
        description=f"agreement {pool.agreement_id} ended: {left} unused microcredits expire",
        idempotency_key=f"expiry:{pool.agreement_id}",
        entries=out.build(),
        agreement_id=pool.agreement_id,
    )


def reversal_transaction(
    book: Book,
    original_id: uuid.UUID,
    original_entries: Iterable[Entry],
    original_usage: Iterable[UsageAmount],
    *,
    occurred_at: datetime,
    reading_hour: datetime | None,
    reason: str,
) -> TransactionDraft:
    """The mirror image of a transaction: every entry on the other side, every usage line negated."""
    accounts_by_id = {a.id: a for a in book.accounts.values()} | {p.account.id: p.account for p in book.pools}
    out = _Entries()
    for e in original_entries:
        account = accounts_by_id.get(e.account_id)
        if account is None:
            raise InsufficientAccountsError(f"account {e.account_id} is not one of customer {book.customer_id}'s")
        out.add(account, "credit" if e.side == "debit" else "debit", e.amount)
    usage = [
        UsageAmount(u.org_id, u.meter, u.resource_kind, u.price_id, u.month, -u.microcredits) for u in original_usage
    ]
    text = f"reversal of {original_id}" + (f": {reason}" if reason else "")
    return TransactionDraft(
        customer_id=book.customer_id,
        type="reversal",
        occurred_at=occurred_at,
        reading_hour=reading_hour,
        description=text,
        idempotency_key=f"reversal:{original_id}",
        entries=out.build(),
        usage=usage,
        reverses=original_id,
    )


def next_month(month: date) -> date:
    return date(month.year + (month.month == 12), month.month % 12 + 1, 1)


def open_month_on_or_after(month: date, closed: set[date] | frozenset[date]) -> date:
    """The first month on or after ``month`` that is not closed."""
    while month in closed:
        month = next_month(month)
    return month


def closed_months_within(
    start: datetime, end: datetime | None, closed: set[date] | frozenset[date]
) -> list[date]:
    """The closed months with an instant in [start, end) (``end`` None: no end), in order. The rule of
    what a closed month accepts (README, "What a closed month accepts"): no transaction may be dated before
    the end of a closed month (it would change that month's statement: its figures or its opening balance),
    and no usage posted in a closed month may change customer."""
    return sorted(m for m in closed if month_bounds(m)[1] > start and (end is None or month_bounds(m)[0] < end))


def effective_time(moment: datetime, month: date, closed: set[date] | frozenset[date]) -> tuple[datetime, bool]:
    """When a fact of ``month`` at ``moment`` is posted: at ``moment`` if its month is open, else at the start
    of the first open month after it (late). Returns (occurred_at, late)."""
    target = open_month_on_or_after(month, closed)
    if target == month:
        return moment, False
    return month_bounds(target)[0], True


def thresholds_reached(funded: int, used: int) -> list[int]:
    """The alert thresholds (percent of ``funded``) that ``used`` has reached."""
    if funded <= 0:
        return []
    return [t for t in THRESHOLDS if used * 100 >= t * funded]
