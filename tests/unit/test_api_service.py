"""The api's pure logic: usage periods in America/New_York, revision handling per shard of charges and the
rollup deltas it makes (services/api/charges.py), balance buckets of ledger transactions and amounts as
answered (strict parameter parsing: tests/unit/test_edge.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.cache import SingleFlight, TtlCache
from services.api.charges import ResourceDoc, Rollup, ShardDoc, contributions
from services.api.service import (
    UsageRangeError,
    amount_fields,
    balance_from_buckets,
    credits_text,
    entries_mirror,
    period_of,
    reversal_candidates,
    transaction_row,
    usage_org_hours,
    usage_range,
)
from shared.batches import Charges, ShardKey, shard_of
from shared.contracts import EntryLine, TransactionPosted, UsageLine
from shared.money import display_credits
from tests.support.api_factories import ChargeItem, batches, charge, txn

CUST = uuid.UUID("0190a000-0000-7000-8000-0000000000c1")


# ------------------------------------------------------------------------------------------- periods


def test_day_and_month_ranges_must_fall_on_new_york_boundaries() -> None:
    r = usage_range(datetime(2026, 10, 1, 4, tzinfo=UTC), datetime(2026, 12, 1, 5, tzinfo=UTC), "month")
    assert (r.first, r.stop) == (date(2026, 10, 1), date(2026, 12, 1))
    with pytest.raises(UsageRangeError, match="start of a month"):
        usage_range(datetime(2026, 10, 1, 0, tzinfo=UTC), datetime(2026, 11, 1, 4, tzinfo=UTC), "month")
    d = usage_range(datetime(2026, 11, 1, 4, tzinfo=UTC), datetime(2026, 11, 2, 5, tzinfo=UTC), "day")
    assert (d.first, d.stop) == (date(2026, 11, 1), date(2026, 11, 2))
    with pytest.raises(UsageRangeError, match="midnight"):
        usage_range(datetime(2026, 11, 1, 5, tzinfo=UTC), datetime(2026, 11, 2, 5, tzinfo=UTC), "day")
    with pytest.raises(UsageRangeError, match="whole hour"):
        usage_range(datetime(2026, 11, 1, 5, 30, tzinfo=UTC), datetime(2026, 11, 2, 5, tzinfo=UTC), "hour")
    with pytest.raises(UsageRangeError, match="after"):
        usage_range(datetime(2026, 11, 2, 5, tzinfo=UTC), datetime(2026, 11, 2, 5, tzinfo=UTC), "hour")
    with pytest.raises(UsageRangeError, match="at most"):
        usage_range(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC), "hour")


def test_periods_carry_their_utc_bounds_including_the_daylight_saving_days() -> None:
    assert period_of("day", date(2026, 11, 1)) == {
        "period": "2026-11-01",
        "period_start": "2026-11-01T04:00:00Z",
        "period_end": "2026-11-02T05:00:00Z",  # 25 hours
    }
    assert period_of("day", date(2026, 3, 8))["period_end"] == "2026-03-09T04:00:00Z"  # 23 hours
    assert period_of("month", date(2026, 12, 1)) == {
        "period": "2026-12",
        "period_start": "2026-12-01T05:00:00Z",
        "period_end": "2027-01-01T05:00:00Z",
    }
    h = datetime(2026, 11, 1, 6, tzinfo=UTC)
    assert period_of("hour", h)["period_end"] == "2026-11-01T07:00:00Z"


# ------------------------------------------------------------------------------------------- charges

H = datetime(2026, 11, 1, 3, tzinfo=UTC)  # Oct 31, 23:00 in New York


def one(c: ChargeItem) -> Charges:
    (batch,) = batches([c])
    return batch


def key_of(c: Charges) -> ShardKey:
    return ShardKey(c.reading_hour, c.meter, c.shard)


def test_only_a_newer_revision_replaces_a_stored_charge_whatever_the_order() -> None:
    r1 = charge(H, "app", org="o", amount=Fraction(1, 3))
    r2 = charge(H, "app", org="o", amount=Fraction(2, 3), revision=2)
    r3 = charge(H, "app", org="o", amount=Fraction(5, 3), revision=3)
    doc = ShardDoc.of(one(r1))
    assert doc.merge(one(r3)) == ([0], [0])  # the stored item replaced, in place
    assert doc.merge(one(r2)) == ([], []) and doc.merge(one(r1)) == ([], []) and doc.merge(one(r3)) == ([], [])
    assert (doc.r, doc.v, doc.n, doc.d) == (["app"], [3], [5], [3])
    # a new resource of the shard is added after the others; the document survives storage as it was
    sibling = next(f"s{i}" for i in range(1000) if shard_of(f"s{i}") == shard_of("app"))
    assert doc.merge(one(charge(H, sibling, org="o2", value=5, amount=Fraction(9)))) == ([], [1])
    assert ShardDoc.load(doc.dump()) == doc and doc.orgs == ["o", "o2"]


def test_an_unpriced_charge_counts_its_value_but_no_microcredits() -> None:
    doc = ShardDoc.of(one(charge(H, "app", org="o", value=300, priced=False)))
    ((sums, _),) = contributions(doc).values()
    assert list(sums.values()) == [[300, 0]]


def exact_groups(r: Rollup) -> dict[str, dict[Any, tuple[int, Fraction]]]:
    return {t: {k: (v, Fraction(n, d)) for k, (v, n, d) in cells.items()} for t, cells in r.groups().items()}


def test_rollups_move_a_replaced_revision_out_and_leave_unattributed_charges_out() -> None:
    old = charge(H, "app", org="o", value=100, amount=Fraction(1, 3))
    new = charge(H, "app", org="o", value=150, amount=Fraction(1, 7), revision=2)
    stray = next(f"s{i}" for i in range(1000) if shard_of(f"s{i}") == old.shard)
    first = batches([old, charge(H, stray, org="nobody", value=5, amount=Fraction(9))])
    assert len(first) == 1  # one batch: both resources are of one shard
    doc = ShardDoc.of(first[0])
    before = doc.copy()
    replaced, changed = doc.merge(one(new))
    r = Rollup()
    key = key_of(first[0])
    customers = [CUST if org == "o" else None for org in doc.orgs]
    r.add(key, before, replaced, customers, -1)
    r.add(key, doc, changed, customers, +1)
    delta = (50, Fraction(1, 7) - Fraction(1, 3))
    groups = exact_groups(r)
    assert groups["month"] == {
        (CUST, dim, date(2026, 10, 1), k, k2, "MB", "exact"): delta
        for dim, k, k2 in (("org", "o", ""), ("space", "space-1", ""), ("meter", "cfapps", ""), ("kind", "cfapps", ""))
    }
    assert set(groups["day"]) == {(CUST, k[1], date(2026, 10, 31), *k[3:]) for k in groups["month"]}
    assert set(groups["hour"]) == {(CUST, k[1], H, *k[3:]) for k in groups["month"]}
    assert all(v == delta for t in ("day", "hour") for v in groups[t].values())
    # the per-resource document of the day (months are read as their days) takes it, and nothing of "nobody"
    changes = r.resource_changes()
    assert set(changes) == {"day"} and set(changes["day"]) == {(CUST, date(2026, 10, 31), "cfapps")}
    day = ResourceDoc()
    day.add([(["app"], ["MB"], [100], [1], [3], [0])])  # what revision 1 had put there
    day.add(changes["day"][(CUST, date(2026, 10, 31), "cfapps")])
    assert {k: (x, Fraction(n, d)) for k, (x, n, d) in day.cells.items()} == {
        ("app", "MB", 0): (150, Fraction(1, 7))
    }


def test_resource_documents_sum_exactly_and_drop_a_resource_taken_back_entirely() -> None:
    doc = ResourceDoc()
    doc.add([(["a", "b", "idle"], ["MB", "MB", "MB"], [10, 1, 0], [1, 2, 0], [3, 7, 1], [0, 0, 0])])
    doc.add([
        (["a"], ["MB"], [5], [1], [730], [0]),
        (["b", "c", "g"], ["MB", "instance", "MB"], [-1, 2, 9], [-2, 0, 0], [7, 1, 1], [0, 0, 1]),
    ])
    cells = {k: (x, Fraction(n, d)) for k, (x, n, d) in ResourceDoc.load(doc.dump()).cells.items()}
    assert cells == {
        ("a", "MB", 0): (15, Fraction(1, 3) + Fraction(1, 730)),
        ("idle", "MB", 0): (0, Fraction(0)),  # used nothing, but was not taken back: still there
        ("c", "instance", 0): (2, Fraction(0)),
        ("g", "MB", 1): (9, Fraction(0)),  # priced on the month's total: its units, apart
    }
    # a document written before price models (no "p" column) reads as all exact
    old = ResourceDoc.load(b'{"r":["a"],"u":["MB"],"x":[3],"n":[1],"d":[2]}')
    assert old.cells == {("a", "MB", 0): [3, 1, 2]}


# -------------------------------------------------------------------------------------------- ledger


def test_transaction_buckets_and_reversals() -> None:
    t0 = datetime(2026, 10, 1, 4, tzinfo=UTC)
    funding = txn(CUST, "funding", 1_000, occurred_at=t0)
    row = transaction_row(funding)
    assert (row.bucket, row.signed_amount, row.amount) == ("funded", 1_000, 1_000)
    assert transaction_row(txn(CUST, "late_usage", 7, occurred_at=t0)).bucket == "used"
    assert transaction_row(txn(CUST, "expiry", 9, occurred_at=t0)).bucket == "expired"
    rev = txn(
        CUST, "reversal", 1_000, occurred_at=t0, idempotency_key=f"reversal:{funding.id}", counter="funding",
        reverse_sides=True,
    )
    assert reversal_candidates(rev) == [funding.id]
    r = transaction_row(rev, (funding.id, "funded", 1_000))
    assert (r.bucket, r.signed_amount, r.reverses) == ("funded", -1_000, funding.id)
    orphan = transaction_row(rev, None)
    assert (orphan.bucket, orphan.signed_amount) == ("none", 0)
    assert entries_mirror(row.entries, rev.entries)
    assert not entries_mirror(row.entries, funding.entries)  # the same sides
    other_account = txn(CUST, "reversal", 1_000, occurred_at=t0, counter="usage", reverse_sides=True)
    assert not entries_mirror(row.entries, other_account.entries)


def test_a_multi_entry_transaction_moves_its_debit_total() -> None:
    t = TransactionPosted(
        id=uuid.uuid4(),
        customer_id=CUST,
        type="usage",
        occurred_at=datetime(2026, 10, 5, 15, tzinfo=UTC),
        reading_hour=datetime(2026, 10, 5, 14, tzinfo=UTC),
        idempotency_key="k",
        entries=[
            EntryLine(account="usage", side="debit", amount=30),
            EntryLine(account="usage", side="debit", amount=12),
            EntryLine(account="credit_pool:a", side="credit", amount=40),
            EntryLine(account="credit_pool:b", side="credit", amount=2),
        ],
        usage=[
            UsageLine(org_id="o1", meter="cfapps", microcredits=30),
            UsageLine(org_id="o2", meter="cfapps", microcredits=12),
        ],
        posted_at=datetime(2026, 10, 5, 15, tzinfo=UTC),
    )
    assert transaction_row(t).amount == 42
    facts = usage_org_hours([t, txn(CUST, "funding", 5, occurred_at=t.occurred_at, orgs=["o3"])])
    assert {(f.org_id, f.hour, f.customer_id) for f in facts} == {
        ("o1", t.reading_hour, CUST), ("o2", t.reading_hour, CUST)
    }


def test_balance_remaining_and_overage() -> None:
    b = balance_from_buckets({"funded": 100, "used": 130, "expired": 5})
    assert (b.remaining, b.overage) == (-35, 35)
    assert balance_from_buckets({}).as_json()["remaining"] == 0


# ------------------------------------------------------------------------------------------- amounts


@given(st.integers(min_value=-(10**15), max_value=10**15), st.integers(min_value=1, max_value=10**9))
def test_credits_text_is_display_credits(n: int, d: int) -> None:
    assert credits_text(n, d) == display_credits(Fraction(n, d))


def test_amounts_are_the_floor_and_the_reduced_fraction() -> None:
    assert amount_fields(Fraction(2_000_000, 730)) == {
        "microcredits": 2739,
        "microcredits_exact": "200000/73",
        "credits": "0.002740",
    }


def test_the_ttl_cache_forgets_after_its_time_and_can_be_off() -> None:
    now = [0.0]
    c: TtlCache[str] = TtlCache(1.0, max_entries=2, clock=lambda: now[0])
    c.put("a", "1")
    assert c.get("a") == "1"
    now[0] = 1.0
    assert c.get("a") is None
    c.put("a", "1")
    c.put("b", "2")
    c.put("c", "3")
    assert c.get("a") is None and c.get("c") == "3"  # bounded: the oldest went first
    off: TtlCache[str] = TtlCache(0)
    off.put("a", "1")
    assert off.get("a") is None


async def test_identical_queries_that_arrive_together_share_one_computation() -> None:
    flights: SingleFlight[str] = SingleFlight()
    calls: list[str] = []
    gate = asyncio.Event()

    async def compute(key: str) -> str:
        calls.append(key)
        await gate.wait()
        if key == "bad":
            raise ValueError("no such range")
        return f"answer {key} #{calls.count(key)}"

    waiting = [asyncio.ensure_future(flights.run(k, lambda k=k: compute(k))) for k in ["a"] * 50 + ["b"] * 3]
    failing = [asyncio.ensure_future(flights.run("bad", lambda: compute("bad"))) for _ in range(2)]
    while len(calls) < 3:  # every computation under way, waiting at the gate
        await asyncio.sleep(0)
    waiting[0].cancel()  # the first caller goes away: the others still get the answer
    gate.set()
    answers = await asyncio.gather(*waiting[1:])
    assert sorted(calls) == ["a", "b", "bad"]  # one computation per key, not 55
    assert set(answers[:49]) == {"answer a #1"} and set(answers[49:]) == {"answer b #1"}
    for f in failing:
        with pytest.raises(ValueError, match="no such range"):
            await f
    assert len(flights) == 0
    assert await flights.run("a", lambda: compute("a")) == "answer a #2"  # done: the next call computes anew


def test_periods_are_cached_but_not_shared_mutably() -> None:
    a = period_of("month", date(2026, 10, 1))
    b = {**period_of("month", date(2026, 10, 1))}
    b["period"] = "changed"
    assert period_of("month", date(2026, 10, 1))["period"] == "2026-10" == a["period"]
