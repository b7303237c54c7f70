"""Factories of contract messages for the api's tests: charges (items dealt into ``usage.charges.v2``
batches, one per reading hour, meter and shard of resources), ledger transactions, statements."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from shared.batches import Charges, Price, Ref, charges_id, encode_charges, shard_key, shard_of
from shared.contracts import EntryLine, StatementIssued, StatementLine, TransactionPosted, UsageLine
from shared.kafka import Outgoing

__all__ = ["ChargeItem", "amount_of", "batches", "charge", "outgoing", "statement", "txn"]


@dataclass(frozen=True, slots=True)
class ChargeItem:
    """One measurement's charge as a test states it, before it is dealt to its shard's batch. Its
    measurement is (hour, meter, resource); ``amount`` is exact microcredits (0 when unpriced)."""

    reading_hour: datetime
    resource_id: str
    org_id: str
    space_id: str
    meter: str
    resource_kind: str
    unit: str
    value: int
    amount: Fraction
    revision: int
    priced: bool
    estimated: bool = False

    @property
    def measurement(self) -> tuple[datetime, str, str]:
        return self.reading_hour, self.meter, self.resource_id

    @property
    def shard(self) -> int:
        return shard_of(self.resource_id)


def charge(
    hour: datetime,
    resource: str,
    *,
    org: str,
    space: str = "space-1",
    meter: str = "cfapps",
    kind: str = "",
    value: int = 1024,
    amount: Fraction = Fraction(1_000_000, 730),
    revision: int = 1,
    priced: bool = True,
    unit: str = "MB",
) -> ChargeItem:
    return ChargeItem(
        reading_hour=hour, resource_id=resource, org_id=org, space_id=space, meter=meter, resource_kind=kind, unit=unit,
        value=value,
        amount=amount if priced else Fraction(0), revision=revision, priced=priced,
    )


def amount_of(item: ChargeItem) -> Fraction:
    """What an item charges, exactly: its amount when priced, else nothing."""
    return item.amount if item.priced else Fraction(0)


def _batch(items: Sequence[ChargeItem], priced_at: datetime | None) -> Charges:
    first = items[0]
    orgs: dict[str, int] = {}
    spaces: dict[str, int] = {}
    kinds: dict[str, int] = {}
    # denominator -> position in prices: a price's unit is its charges' denominator (the api reads only the
    # items' amounts, not the terms that produced them)
    prices: dict[int, int] = {}
    price_refs: list[Price] = []
    price_col: list[int] = []
    for it in items:
        if not it.priced:
            price_col.append(-1)
            continue
        den = it.amount.denominator
        if den not in prices:
            prices[den] = len(price_refs)
            price_id = uuid.uuid5(uuid.NAMESPACE_URL, f"price/{den}")
            price_refs.append(Price(id=price_id, microcredits_per_unit=1, unit=den))
        price_col.append(prices[den])
    rids = [it.resource_id for it in items]
    revisions = [it.revision for it in items]
    return Charges(
        id=charges_id(first.reading_hour, first.meter, first.shard, rids, revisions),
        reading_hour=first.reading_hour,
        meter=first.meter,
        unit=first.unit,
        shard=first.shard,
        priced_at=priced_at or first.reading_hour + timedelta(minutes=10 * max(revisions)),
        orgs=[Ref(o, f"name-of-{o}") for o in dict.fromkeys(it.org_id for it in items)],
        spaces=[Ref(s, f"name-of-{s}") for s in dict.fromkeys(it.space_id for it in items)],
        kinds=list(dict.fromkeys(it.resource_kind for it in items)),
        prices=price_refs,
        resource_id=rids,
        resource_name=[f"name-of-{it.resource_id}" for it in items],
        org=[orgs.setdefault(it.org_id, len(orgs)) for it in items],
        space=[spaces.setdefault(it.space_id, len(spaces)) for it in items],
        kind=[kinds.setdefault(it.resource_kind, len(kinds)) for it in items],
        value=[it.value for it in items],
        estimated=[it.estimated for it in items],
        revision=revisions,
        price=price_col,
        amount_numerator=[it.amount.numerator if it.priced else 0 for it in items],
        amount_denominator=[it.amount.denominator if it.priced else 1 for it in items],
    )


def batches(items: Sequence[ChargeItem], *, priced_at: datetime | None = None) -> list[Charges]:
    """``items`` dealt into charges batches as the pricer publishes them: one per (reading hour, meter,
    shard, unit), items in the order given. A resource that comes again (a duplicate, another revision)
    opens a new batch of its key, after the one holding it, so a batch never repeats a resource and the
    batches keep the items' order."""
    open_: dict[tuple[datetime, str, int, str], list[ChargeItem]] = {}
    out: list[list[ChargeItem]] = []
    for it in items:
        key = (it.reading_hour, it.meter, it.shard, it.unit)
        current = open_.get(key)
        if current is None or any(o.resource_id == it.resource_id for o in current):
            current = open_[key] = []
            out.append(current)
        current.append(it)
    return [_batch(group, priced_at) for group in out]


def outgoing(c: Charges) -> Outgoing:
    """A charges batch as the pricer publishes it: its JSON, keyed by its shard."""
    return Outgoing(shard_key(c.shard), encode_charges(c))


def txn(
    customer: uuid.UUID,
    type_: str,
    amount: int,
    *,
    occurred_at: datetime,
    reading_hour: datetime | None = None,
    orgs: Sequence[str] = (),
    idempotency_key: str | None = None,
    pool: str = "credit_pool:agreement-1",
    counter: str | None = None,
    reverse_sides: bool = False,
) -> TransactionPosted:
    counter = counter or {"funding": "funding", "usage": "usage", "late_usage": "usage", "expiry": "expired"}.get(
        type_, "usage"
    )
    # funding: debit funding, credit pool; usage/expiry: debit usage/expired, credit pool. (Any balanced pair
    # works: the api reads the amount and the type, not the account names.)
    debit, credit = (counter, pool)
    if reverse_sides:
        debit, credit = credit, debit
    tid = uuid.uuid4()
    return TransactionPosted(
        id=tid,
        customer_id=customer,
        type=type_,  # type: ignore[arg-type]
        occurred_at=occurred_at,
        reading_hour=reading_hour,
        description=f"{type_} {amount}",
        idempotency_key=idempotency_key or f"{type_}:{tid}",
        entries=[
            EntryLine(account=debit, side="debit", amount=amount),
            EntryLine(account=credit, side="credit", amount=amount),
        ],
        usage=[UsageLine(org_id=o, meter="cfapps", microcredits=amount // max(1, len(orgs))) for o in orgs],
        posted_at=occurred_at,
    )


def statement(customer: uuid.UUID, month: str, **figures: int) -> StatementIssued:
    return StatementIssued(
        id=uuid.uuid4(),
        customer_id=customer,
        month=month,
        opening_balance=figures.get("opening_balance", 0),
        funded=figures.get("funded", 0),
        used=figures.get("used", 0),
        expired=figures.get("expired", 0),
        closing_balance=figures.get("closing_balance", 0),
        used_by_kind=[StatementLine(meter="cfapps", microcredits=figures.get("used", 0))],
        issued_at=datetime(2026, 11, 2, 12, tzinfo=UTC),
    )
