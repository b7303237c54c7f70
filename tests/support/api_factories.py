"""Factories of contract messages for the api's tests: charges, ledger transactions, statements."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from fractions import Fraction

from shared import ids
from shared.contracts import ChargeComputed, EntryLine, StatementIssued, StatementLine, TransactionPosted, UsageLine


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
) -> ChargeComputed:
    mid = ids.measurement_id(hour, meter, resource)
    return ChargeComputed(
        id=ids.charge_id(mid, revision),
        measurement_id=mid,
        revision=revision,
        reading_hour=hour,
        meter=meter,
        resource_id=resource,
        resource_kind=kind,
        resource_name=f"name-of-{resource}",
        org_id=org,
        org_name=f"name-of-{org}",
        space_id=space,
        space_name=f"name-of-{space}",
        value=value,
        unit=unit,
        status="priced" if priced else "unpriced",
        price_id=uuid.uuid4() if priced else None,
        amount_numerator=amount.numerator if priced else 0,
        amount_denominator=amount.denominator if priced else 1,
        display_amount="0",
        priced_at=hour,
    )


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
    counter = counter or {"funding": "funding", "usage": "usage", "late_usage": "usage", "expiry": "expired"}.get(type_, "usage")
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
        entries=[EntryLine(account=debit, side="debit", amount=amount), EntryLine(account=credit, side="credit", amount=amount)],
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
