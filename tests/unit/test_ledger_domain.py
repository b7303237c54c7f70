"""The ledger's pure rules: drawing order, giving back, balanced drafts, open months, thresholds, batch ids,
the exact allocation of fractional charges to whole microcredits, and what the consumer hands the ledger."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
from services.ledger.posting import allocate, batch_months, change_mark
from shared.batches import Charges, ShardKey, decode_charges, encode_charges, read_as_written, shard_of
from tests.support.ledger import charges_batch, item

HOUR = datetime(2026, 4, 10, 15, tzinfo=UTC)
PRICE = uuid.UUID(int=1)


def book(*pools: tuple[datetime, datetime, int, int, bool]) -> Book:
    """A customer with its four accounts and pools (starts, ends, credits, remaining, expired)."""
    accounts = {name: Account(i + 1, name, name, 0) for i, name in enumerate((FUNDING, USAGE, EXPIRED, OVERAGE))}
    b = Book(uuid.UUID(int=99), accounts)
    for n, (start, end, credits, left, expired) in enumerate(pools):
        aid = uuid.UUID(int=100 + n)
        b.pools.append(
            Pool(aid, start, end, credits, expired, Account(10 + n, f"credit_pool:{aid}", "credit_pool", -left))
        )
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
    [
        (1000, 499, []),
        (1000, 500, [50]),
        (1000, 899, [50, 75]),
        (1000, 900, [50, 75, 90]),
        (1000, 1500, [50, 75, 90, 100]),
        (0, 10, []),
    ],
)
def test_thresholds_reached(funded: int, used: int, expected: list[int]) -> None:
    assert thresholds_reached(funded, used) == expected


def batch(hour: datetime, *resources: str, revision: int = 1) -> Charges:
    """A charges batch of one shard: ``resources`` must share it (the test picks them so)."""
    return charges_batch(hour, [item("o", Fraction(1, 3), resource=r, revision=revision) for r in resources])


def same_shard(n: int, shard: int = 0) -> list[str]:
    """``n`` resource ids of ``shard``."""
    return [r for r in (f"res-{i}" for i in range(10_000)) if shard_of(r) == shard][:n]


def test_change_marks_tell_apart_every_part_of_a_charge_applied() -> None:
    key = ShardKey(HOUR, "cfapps", 3)
    marks = {
        change_mark(key, "r", 1),
        change_mark(key, "r", 2),
        change_mark(key, "s", 1),
        change_mark(ShardKey(HOUR, "cfapps", 4), "r", 1),
        change_mark(ShardKey(HOUR, "services", 3), "r", 1),
        change_mark(ShardKey(HOUR.replace(hour=HOUR.hour + 1), "cfapps", 3), "r", 1),
    }
    assert len(marks) == 6 and all(0 <= m < 1 << 128 for m in marks)
    assert change_mark(key, "r", 1) == change_mark(ShardKey(HOUR, "cfapps", 3), "r", 1)


def test_batch_months_span_new_york_months_of_the_hours() -> None:
    # 04:00 UTC on Mar 1 is still February in New York; 05:00 is March.
    hours = [datetime(2026, 3, 1, 4, tzinfo=UTC), datetime(2026, 5, 1, 3, tzinfo=UTC)]
    assert batch_months([batch(h, "r") for h in hours]) == {date(2026, 2, 1), date(2026, 4, 1)}
    assert batch_months([batch(datetime(2026, 3, 1, 5, tzinfo=UTC), "r")]) == {date(2026, 3, 1)}


def test_the_consumer_hands_the_ledger_only_consistent_items() -> None:
    """What ``invalid_reason`` refused per charge in v1, the decoder now refuses per item: the ledger is
    never handed an unpriced item with an amount, an item of another shard, or a measurement twice."""
    r1, r2, r3 = same_shard(3)
    other = next(r for r in (f"x-{i}" for i in range(1000)) if shard_of(r) != shard_of(r1))
    good = item("o", 5, resource=r1)
    unpriced = item("o", 5, resource=r2, price_id=None)
    zero = item("o", 0, resource=r3, price_id=None)
    stray = item("o", 7, resource=other)
    decoded = decode_charges(
        encode_charges(charges_batch(HOUR, [good, unpriced, zero, stray, good], shard=shard_of(r1)))
    )
    assert decoded.message is not None
    assert decoded.message.resource_id == [r1, r3]  # the good one once, the unpriced zero
    assert sorted((r.positions, r.reason) for r in decoded.rejected) == [
        ((1,), "item 1: unpriced with a non-zero amount"),
        ((3,), f"item 3: resource {other} belongs to shard {shard_of(other)}, not {shard_of(r1)}"),
    ]
    for r, rid in zip(sorted(decoded.rejected, key=lambda r: r.positions), [r2, other], strict=True):
        # Each refused item goes to the DLQ as a well-formed batch of its own, refused again for its reason.
        assert r.value is not None
        alone = read_as_written(r.value, Charges)
        assert alone.resource_id == [rid] and alone.shard == shard_of(r1)
        assert [x.reason for x in decode_charges(r.value).rejected] == [
            r.reason.replace(f"item {r.positions[0]}", "item 0")
        ]
    twice = decode_charges(encode_charges(charges_batch(HOUR, [good, item("o", 6, resource=r1)])))
    assert twice.message is not None and twice.message.amount_numerator == [5]
    assert [r.positions for r in twice.rejected] == [(1,)]


LINE = tuple[datetime, str, str, str]
lines = st.lists(
    st.tuples(
        st.integers(0, 3),  # hour
        st.sampled_from(["o1", "o2"]),
        st.integers(-3_000_000, 3_000_000),
        st.sampled_from([1, 3, 7, 730, 2**31 - 1]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(start=st.tuples(st.integers(0, 10**9), st.sampled_from([1, 2, 3, 730, 999_983])), changes=lines)
def test_allocated_whole_microcredits_telescope_to_the_change_of_the_floor(
    start: tuple[int, int], changes: list[tuple[int, str, int, int]]
) -> None:
    """``allocate`` against Fraction: the group's new exact sum, its posted floor, and line amounts whose
    total is floor(new sum) - floor(old sum), each line off its own exact change by less than one."""
    before = Fraction(*start)
    deltas: dict[int, dict[LINE, dict[int, int]]] = {7: {}}
    exact: dict[LINE, Fraction] = {}
    for h, org, num, den in changes:
        line = (datetime(2026, 4, 1, h, tzinfo=UTC), org, "cfapps", "")
        cell = deltas[7].setdefault(line, {})
        cell[den] = cell.get(den, 0) + num
        exact[line] = exact.get(line, Fraction(0)) + Fraction(num, den)
    after = before + sum(exact.values())
    assume(after >= 0)  # a group's sum never goes below zero: amounts are taken back only once added
    updates, amounts, units = allocate({7: (start[0], start[1])}, deltas)
    assert units == {}  # a flat price's group has no units
    [(gid, num, den, posted)] = updates
    assert gid == 7 and Fraction(num, den) == after and posted == after.numerator // after.denominator
    assert math.gcd(num, den) == 1
    assert sum(a for _, _, a in amounts) == posted - before.numerator // before.denominator
    assert {line for _, line, _ in amounts} == set(exact)
    for _, line, amount in amounts:
        assert abs(amount - exact[line]) < 1
