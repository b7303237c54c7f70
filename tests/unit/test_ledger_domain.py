"""The ledger's pure rules: drawing order, giving back, balanced drafts, open months, thresholds, batch ids."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from fractions import Fraction

import pytest

from services.ledger.domain import (
    EXPIRED,
    FUNDING,
    OVERAGE,
    USAGE,
    Account,
    Book,
    Pool,
    UsageAmount,
    effective_time,
    expiry_transaction,
    funding_transaction,
    open_month_on_or_after,
    reversal_transaction,
    thresholds_reached,
    usage_transaction,
)
from services.ledger.posting import batch_digest, batch_months, invalid_reason
from shared import ids
from shared.contracts import ChargeComputed

HOUR = datetime(2026, 4, 10, 15, tzinfo=UTC)
PRICE = uuid.UUID(int=1)


def book(*pools: tuple[datetime, datetime, int, int, bool]) -> Book:
    """A customer with its four accounts and pools (starts, ends, credits, remaining, expired)."""
    accounts = {name: Account(i + 1, name, name, 0) for i, name in enumerate((FUNDING, USAGE, EXPIRED, OVERAGE))}
    b = Book(uuid.UUID(int=99), accounts)
    for n, (start, end, credits, left, expired) in enumerate(pools):
        aid = uuid.UUID(int=100 + n)
        b.pools.append(Pool(aid, start, end, credits, expired, Account(10 + n, f"credit_pool:{aid}", "credit_pool", -left)))
    return b


def line(amount: int, org: str = "o") -> UsageAmount:
    return UsageAmount(org, "cfapps", "", PRICE, date(2026, 4, 1), amount)


def moves(draft) -> dict[tuple[str, str], int]:  # type: ignore[no-untyped-def]
    return {(e.account, e.side): e.amount for e in draft.entries}


def balanced(draft) -> bool:  # type: ignore[no-untyped-def]
    return sum(e.amount if e.side == "debit" else -e.amount for e in draft.entries) == 0 and len(draft.entries) >= 2


JAN, JUN, JUL, DEC = (datetime(2026, m, 1, tzinfo=UTC) for m in (1, 6, 7, 12))


def test_usage_draws_from_the_pool_that_expires_first_then_the_next_then_overage() -> None:
    b = book((JAN, DEC, 1000, 500, False), (JAN, JUN, 1000, 300, False))
    draft = usage_transaction(b, HOUR, [line(900)], late=False, occurred_at=HOUR, idempotency_key="k")
    assert draft is not None and balanced(draft)
    first, second = b.pools[1], b.pools[0]  # the June one expires first
    assert moves(draft) == {
        ("usage", "credit"): 900,
        (first.account.name, "debit"): 300,
        (second.account.name, "debit"): 500,
        ("overage", "debit"): 100,
    }
    assert (first.remaining, second.remaining, b.accounts[OVERAGE].balance) == (0, 0, 100)


def test_pools_that_do_not_cover_the_hour_or_have_expired_are_skipped() -> None:
    b = book((JUN, DEC, 1000, 1000, False), (JAN, JUN, 1000, 1000, True), (JAN, JUL, 1000, 1000, False))
    draft = usage_transaction(b, HOUR, [line(10)], late=False, occurred_at=HOUR, idempotency_key="k")
    assert draft is not None
    assert moves(draft) == {("usage", "credit"): 10, (b.pools[2].account.name, "debit"): 10}


def test_a_decrease_repays_overage_first_then_the_pools_last_drawn_first() -> None:
    b = book((JAN, JUN, 1000, 0, False), (JAN, DEC, 1000, 400, False))
    b.accounts[OVERAGE].balance = 50
    draft = usage_transaction(b, HOUR, [line(-700)], late=False, occurred_at=HOUR, idempotency_key="k")
    assert draft is not None and balanced(draft)
    assert moves(draft) == {
        ("usage", "debit"): 700,
        ("overage", "credit"): 50,
        (b.pools[1].account.name, "credit"): 600,  # up to what the December pool had drawn
        (b.pools[0].account.name, "credit"): 50,
    }


def test_a_decrease_beyond_what_was_drawn_becomes_a_credit_on_overage() -> None:
    b = book((JAN, DEC, 100, 90, False))
    draft = usage_transaction(b, HOUR, [line(-30)], late=False, occurred_at=HOUR, idempotency_key="k")
    assert draft is not None and balanced(draft)
    assert moves(draft) == {("usage", "debit"): 30, (b.pools[0].account.name, "credit"): 10, ("overage", "credit"): 20}
    assert b.accounts[OVERAGE].balance == -20


def test_increases_and_decreases_of_one_hour_move_the_usage_account_both_ways() -> None:
    b = book((JAN, DEC, 1000, 1000, False))
    draft = usage_transaction(b, HOUR, [line(5, "a"), line(-5, "b")], late=True, occurred_at=HOUR, idempotency_key="k")
    assert draft is not None and balanced(draft) and draft.type == "late_usage"
    assert moves(draft) == {("usage", "credit"): 5, ("usage", "debit"): 5}
    assert usage_transaction(b, HOUR, [line(0)], late=False, occurred_at=HOUR, idempotency_key="k") is None


def test_funding_expiry_and_reversal_drafts_are_balanced() -> None:
    b = book((JAN, DEC, 1000, 0, False))
    pool = b.pools[0]
    funding = funding_transaction(b, pool, JAN)
    assert balanced(funding) and moves(funding) == {("funding", "debit"): 1000, (pool.account.name, "credit"): 1000}
    b.pools[0].account.balance = -250  # 250 left
    expiry = expiry_transaction(b, pool, DEC)
    assert expiry is not None and balanced(expiry)
    assert moves(expiry) == {(pool.account.name, "debit"): 250, ("expired", "credit"): 250}
    assert expiry_transaction(b, pool, DEC) is None  # nothing left once expired
    reversal = reversal_transaction(
        b, uuid.uuid4(), expiry.entries, [line(7)], occurred_at=DEC, reading_hour=None, reason="x"
    )
    assert balanced(reversal)
    assert moves(reversal) == {(pool.account.name, "credit"): 250, ("expired", "debit"): 250}
    assert [u.microcredits for u in reversal.usage] == [-7]


def test_a_closed_month_posts_in_the_first_open_month_after_it() -> None:
    closed = {date(2026, 11, 1), date(2026, 12, 1)}
    assert open_month_on_or_after(date(2026, 11, 1), closed) == date(2027, 1, 1)
    assert open_month_on_or_after(date(2026, 10, 1), closed) == date(2026, 10, 1)
    at, late = effective_time(HOUR, date(2026, 11, 1), closed)
    assert late and at == datetime(2027, 1, 1, 5, tzinfo=UTC)  # midnight in New York (EST)
    assert effective_time(HOUR, date(2026, 4, 1), closed) == (HOUR, False)


@pytest.mark.parametrize(
    ("funded", "used", "expected"),
    [(1000, 499, []), (1000, 500, [50]), (1000, 899, [50, 75]), (1000, 900, [50, 75, 90]), (1000, 1500, [50, 75, 90, 100]), (0, 10, [])],
)
def test_thresholds_reached(funded: int, used: int, expected: list[int]) -> None:
    assert thresholds_reached(funded, used) == expected


def charge(hour: datetime, resource: str, revision: int = 1, **kw: object) -> ChargeComputed:
    mid = ids.measurement_id(hour, "cfapps", resource)
    fields: dict[str, object] = dict(
        id=ids.charge_id(mid, revision), measurement_id=mid, revision=revision, reading_hour=hour, meter="cfapps",
        resource_id=resource, org_id="o", value=1, unit="MB", status="priced", price_id=PRICE,
        amount_numerator=Fraction(1, 3).numerator, amount_denominator=3, display_amount="0", priced_at=hour,
    )
    fields.update(kw)
    return ChargeComputed(**fields)  # type: ignore[arg-type]


def test_a_batch_digest_ignores_order_and_tells_batches_apart() -> None:
    a, b, c = charge(HOUR, "a"), charge(HOUR, "b"), charge(HOUR, "b", revision=2)
    assert batch_digest([a, b]) == batch_digest([b, a])
    assert batch_digest([a, b]) != batch_digest([a, c])
    assert batch_digest([a]) != batch_digest([a, a])


def test_batch_months_span_new_york_months_of_the_hours() -> None:
    # 04:00 UTC on Mar 1 is still February in New York; 05:00 is March.
    hours = [datetime(2026, 3, 1, 4, tzinfo=UTC), datetime(2026, 5, 1, 3, tzinfo=UTC)]
    assert batch_months([charge(h, "r") for h in hours]) == {date(2026, 2, 1), date(2026, 3, 1), date(2026, 4, 1)}


def test_inconsistent_charges_are_refused() -> None:
    assert invalid_reason(charge(HOUR, "a")) is None
    assert invalid_reason(charge(HOUR, "a", price_id=None)) == "priced charge without price_id"
    assert invalid_reason(charge(HOUR, "a", status="unpriced", price_id=None)) == "unpriced charge with a non-zero amount"
    assert invalid_reason(charge(HOUR, "a", status="unpriced", price_id=None, amount_numerator=0)) is None
