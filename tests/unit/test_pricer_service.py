"""The pricer's pure logic (services/pricer/pricing.py): exact amounts, the in-memory catalog, a batch of
measurements priced into a charges batch, what a shard holds and re-pricing, the v1 readings regrouped into
batches; each checked against an independent oracle (fractions, a linear scan of the prices, the contract
model, charge batches written out by hand)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.pricer.pricing import (
    MAX_AMOUNT,
    Catalog,
    Price,
    PriceEndRefusedError,
    batches_of_v1,
    check_end,
    exact_amount,
    latest_items,
    price_items,
    reprice_items,
)
from services.pricer.schemas import PriceIn
from shared import ids
from shared.batches import (
    Charges,
    Item,
    Measurements,
    Ref,
    charges_id,
    encode_charges,
    measurement_batches,
    shard_of,
)
from shared.batches import Price as PriceRef
from shared.contracts import ChargesComputed, MeasurementTaken
from shared.wire import decoder_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRICED_AT = datetime(2026, 6, 1, 12, 30, 15, 123456, tzinfo=UTC)
KINDS = ["", "plan-a", "plan-b"]


def price(meter: str, kind: str, mpu: int, unit: int, start: datetime, end: datetime | None) -> Price:
    return Price(uuid.uuid4(), meter, kind, "MB-hour", mpu, unit, start, end, T0)


def resources(shard: int, n: int) -> list[str]:
    return [r for r in (f"res-{i}" for i in range(40 * n + 200)) if shard_of(r) == shard][:n]


def one_batch(
    hour: datetime, values: list[int], kinds: list[str], meter: str = "cfapps", shard: int = 3, **kw: Any
) -> Measurements:
    """A batch whose item i has ``values[i]`` and ``kinds[i]`` (resource ids sorted as batches sort them)."""
    rids = sorted(resources(shard, len(values)))
    items = [Item(r, f"name of {r}", "org-7", 'Org "Seven" ✓', "space-1", "dev", k, v, **kw)
             for r, v, k in zip(rids, values, kinds, strict=True)]
    taken = hour + timedelta(hours=1)
    (b,) = measurement_batches(hour, meter, "MB", items, reading_id=ids.reading_id(hour), taken_at=taken)
    assert b.value == values
    return b


def charge_of(c: Charges, i: int) -> tuple[int, uuid.UUID | None, Fraction, int]:
    """(revision, price id, exact amount, denominator) of item ``i``."""
    p = c.price[i]
    return (c.revision[i], None if p < 0 else c.prices[p].id, Fraction(c.amount_numerator[i], c.amount_denominator[i]),
            c.amount_denominator[i])


# ------------------------------------------------------------------------------------------ amounts, catalog


@given(st.integers(0, 2**62), st.integers(0, 2**40), st.integers(1, 2**62))
def test_exact_amount_is_the_fraction_over_the_unit_unless_too_large(value: int, mpu: int, unit: int) -> None:
    n, d = exact_amount(value, mpu, unit)
    assert Fraction(n, d) == Fraction(value * mpu, unit)
    if value * mpu <= 2**62:
        assert d == unit  # a price's charges share its unit: they sum without a common-denominator search
    else:
        assert Fraction(n, d).denominator == d  # reduced only when it has to be


def _oracle(prices: list[Price], meter: str, kind: str, at: datetime) -> Price | None:
    found = [
        p for p in prices
        if p.meter == meter and p.resource_kind == kind and p.valid_from <= at
        and (p.valid_until is None or at < p.valid_until)
    ]
    assert len(found) <= 1
    return found[0] if found else None


@st.composite
def catalogs(draw: st.DrawFn) -> list[Price]:
    """Non-overlapping prices per (meter, kind), with gaps, starting anywhere within 30 days."""
    out: list[Price] = []
    for meter, kind in [("cfapps", ""), ("cfapps", "plan-a"), ("cfapps", "plan-b"), ("cfservices", "plan-a")]:
        cuts = sorted(draw(st.sets(st.integers(0, 30 * 24), max_size=8)))
        for i in range(len(cuts) - 1):
            if draw(st.booleans()):
                mpu = draw(st.integers(0, 2**40))
                unit = draw(st.integers(1, 2**40))
                start, end = T0 + timedelta(hours=cuts[i]), T0 + timedelta(hours=cuts[i + 1])
                out.append(price(meter, kind, mpu, unit, start, end))
        open_ended: bool = draw(st.booleans())
        if cuts and open_ended:
            out.append(price(meter, kind, 99, 7, T0 + timedelta(hours=cuts[-1]), None))
    return out


PROBE_KEYS = [("cfapps", ""), ("cfapps", "plan-a"), ("cfservices", "plan-a"), ("cfservices", "b"), ("x", "")]


@given(catalogs(), st.lists(st.tuples(st.sampled_from(PROBE_KEYS), st.integers(-5, 31 * 24)), max_size=60))
def test_catalog_finds_the_price_valid_at_the_instant(
    prices: list[Price], probes: list[tuple[tuple[str, str], int]]
) -> None:
    catalog = Catalog(prices)
    assert len(catalog) == len(prices)
    for (meter, kind), h in probes:
        at = T0 + timedelta(hours=h)
        assert catalog.price_at(meter, kind, at) == _oracle(prices, meter, kind, at)


# ------------------------------------------------------------------------------------------ pricing a batch


@settings(max_examples=200)
@given(catalogs(), st.integers(0, 30 * 24),
       st.lists(st.tuples(st.integers(0, 2**40), st.sampled_from(KINDS)), min_size=1, max_size=30))
def test_every_item_is_charged_exactly_with_the_price_of_its_kind_at_its_hour(
    prices: list[Price], h: int, items: list[tuple[int, str]]
) -> None:
    hour = T0 + timedelta(hours=h)
    m = one_batch(hour, [v for v, _ in items], [k for _, k in items])
    priced = price_items(m, None, Catalog(prices), PRICED_AT)
    rejected = {i for i, _ in priced.rejects}
    expected_unpriced = 0
    c = priced.message
    kept = [i for i in range(len(m.resource_id)) if i not in rejected]
    if not kept:
        assert c is None
        return
    assert c is not None
    assert c.resource_id == [m.resource_id[i] for i in kept]
    for j, i in enumerate(kept):
        p = _oracle(prices, "cfapps", m.kinds[m.kind[i]], hour)
        revision, price_id, amount, den = charge_of(c, j)
        assert revision == 1
        if p is None:
            expected_unpriced += 1
            assert (price_id, c.amount_numerator[j], den) == (None, 0, 1)
        else:
            assert price_id == p.id and c.prices[c.price[j]] == PriceRef(p.id, p.microcredits_per_unit, p.unit)
            assert amount == Fraction(m.value[i] * p.microcredits_per_unit, p.unit)
            if m.value[i] * p.microcredits_per_unit <= 2**62:
                assert den == p.unit
    for i in rejected:
        p = _oracle(prices, "cfapps", m.kinds[m.kind[i]], hour)
        assert p is not None and Fraction(m.value[i] * p.microcredits_per_unit, p.unit).numerator > 2**62
    counts = (priced.priced, priced.unpriced, priced.revisions)
    assert counts == (len(kept) - expected_unpriced, expected_unpriced, len(kept))
    # What the pricer publishes is a valid contract message.
    ChargesComputed.model_validate_json(encode_charges(c))


def test_a_charges_batch_is_the_contract_message_written_out_by_hand() -> None:
    hour = T0 + timedelta(hours=5)
    app = price("cfapps", "", 1_000_000, 730 * 1024, T0, None)
    m = one_batch(hour, [3 * 1024, 512], ["", "plan-z"], estimated=True)
    priced = price_items(m, None, Catalog([app]), PRICED_AT)
    assert priced.rejects == [] and priced.message is not None
    assert priced.price_ids == {app.id} and priced.unpriced_kinds == {"plan-z"}
    got = ChargesComputed.model_validate_json(encode_charges(priced.message))
    expected = ChargesComputed.model_validate({
        "id": charges_id(hour, "cfapps", 3, m.resource_id, [1, 1]),
        "reading_hour": hour,
        "meter": "cfapps",
        "unit": "MB",
        "shard": 3,
        "priced_at": PRICED_AT,
        "orgs": [{"id": "org-7", "name": 'Org "Seven" ✓'}],
        "spaces": [{"id": "space-1", "name": "dev"}],
        "kinds": ["", "plan-z"],
        "prices": [{"id": app.id, "microcredits_per_unit": 1_000_000, "unit": 730 * 1024}],
        "resource_id": m.resource_id,
        "resource_name": [f"name of {r}" for r in m.resource_id],
        "org": [0, 0],
        "space": [0, 0],
        "kind": [0, 1],
        "value": [3 * 1024, 512],
        "estimated": [True, True],
        "revision": [1, 1],
        "price": [0, -1],
        "amount_numerator": [3 * 1024 * 1_000_000, 0],
        "amount_denominator": [730 * 1024, 1],
    })
    assert got == expected


def test_only_the_positions_asked_for_are_priced() -> None:
    m = one_batch(T0, [1, 2, 3, 4], ["", "", "", ""])
    priced = price_items(m, [1, 3], Catalog([price("cfapps", "", 5, 2, T0, None)]), PRICED_AT)
    assert priced.message is not None
    assert priced.message.resource_id == [m.resource_id[1], m.resource_id[3]]
    assert [charge_of(priced.message, j)[2] for j in range(2)] == [Fraction(2 * 5, 2), Fraction(4 * 5, 2)]


def test_an_amount_beyond_2_62_is_refused_and_the_rest_is_priced() -> None:
    huge = price("cfapps", "", 2**40, 1, T0, None)
    m = one_batch(T0 + timedelta(hours=3), [10, 2**30, 2**21, 7], ["", "", "", ""])
    priced = price_items(m, None, Catalog([huge]), PRICED_AT)
    assert [i for i, _ in priced.rejects] == [1]  # 2**70 microcredits; 2**61 is fine
    assert "exceeds 2**62" in priced.rejects[0][1]
    assert priced.message is not None and priced.message.resource_id == [m.resource_id[i] for i in (0, 2, 3)]
    assert priced.message.amount_numerator == [10 * 2**40, 2**61, 7 * 2**40]
    # Reducible below 2**62: kept, in lowest terms.
    reducible = price("cfapps", "", 2**40, 2**20, T0, None)
    again = price_items(one_batch(T0, [2**30], [""]), None, Catalog([reducible]), PRICED_AT)
    assert again.rejects == [] and again.message is not None
    assert (again.message.amount_numerator, again.message.amount_denominator) == ([2**50], [1])


# ------------------------------------------------------------------------------------------ stored shards, re-pricing


def test_an_unpriced_charge_is_repriced_as_the_next_revision_once_a_price_covers_it() -> None:
    hour = T0 + timedelta(hours=2)
    m = one_batch(hour, [2, 5, 7], ["plan-a", "plan-b", "plan-a"], meter="cfservices")
    first = price_items(m, None, Catalog([]), PRICED_AT)
    assert first.message is not None and first.unpriced == 3 and first.unpriced_kinds == {"plan-a", "plan-b"}
    assert reprice_items([first.message], Catalog([]), PRICED_AT) is None  # nothing covers them yet

    plan_a = price("cfservices", "plan-a", 1_000_000, 730, T0, None)
    later = PRICED_AT + timedelta(days=1)
    again = reprice_items([first.message], Catalog([plan_a]), later)
    assert again is not None and again.message is not None
    c = again.message
    assert c.resource_id == [m.resource_id[0], m.resource_id[2]]
    assert [charge_of(c, j)[:3] for j in range(2)] == [
        (2, plan_a.id, Fraction(2 * 1_000_000, 730)), (2, plan_a.id, Fraction(7 * 1_000_000, 730))]
    assert c.priced_at == later and c.id == charges_id(hour, "cfservices", m.shard, c.resource_id, [2, 2])
    assert [c.orgs[c.org[j]] for j in range(2)] == [Ref("org-7", 'Org "Seven" ✓')] * 2
    assert again.priced == 2 and again.revisions == 4
    ChargesComputed.model_validate_json(encode_charges(c))

    # Only the kinds asked for; and an item whose latest charge is priced is never re-priced.
    both = Catalog([plan_a, price("cfservices", "plan-b", 3, 2, T0, None)])
    only_b = reprice_items([first.message, c], both, later, kinds={"plan-b"})
    assert only_b is not None and only_b.message is not None
    assert only_b.message.resource_id == [m.resource_id[1]] and only_b.message.revision == [2]
    assert reprice_items([first.message, c, only_b.message], both, later) is None


def test_the_latest_charge_of_a_resource_is_its_highest_revision_whatever_the_order_stored() -> None:
    m = one_batch(T0, [1, 2], ["", ""])
    r1 = price_items(m, None, Catalog([]), PRICED_AT).message
    r2 = price_items(m, [0], Catalog([]), PRICED_AT, revisions=[2]).message
    assert r1 is not None and r2 is not None
    latest = latest_items([r2, r1])
    assert {rid: (at.batch, at.revision) for rid, at in latest.items()} == {m.resource_id[0]: (0, 2),
                                                                           m.resource_id[1]: (1, 1)}


# ------------------------------------------------------------------------------------------ v1 input


def v1(hour: datetime, resource: str, value: int, meter: str = "cfapps", unit: str = "MB") -> Any:
    msg = MeasurementTaken(
        id=ids.measurement_id(hour, meter, resource), reading_id=ids.reading_id(hour), reading_hour=hour,
        meter=meter, resource_id=resource, resource_kind="plan" if meter == "cfservices" else "",
        resource_name=f"n-{resource}", org_id="org-1", org_name="Org", space_id="s-1", space_name="S",
        value=value, unit=unit, taken_at=hour + timedelta(minutes=61),
    )
    return decoder_for(MeasurementTaken)(msg.model_dump_json().encode())


def test_v1_measurements_are_regrouped_into_batches_per_hour_meter_shard_and_unit() -> None:
    h1, h2 = T0, T0 + timedelta(hours=1)
    rids = resources(4, 3) + resources(9, 1)
    items = [v1(h1, rids[2], 3), v1(h1, rids[0], 1), v1(h2, rids[0], 10), v1(h1, rids[3], 4),
             v1(h1, rids[0], 99), v1(h1, rids[1], 2, meter="cfservices", unit="instance"), v1(h1, rids[1], 5),
             v1(h1, rids[2], 3)]
    groups = batches_of_v1(items)
    got = [((b.reading_hour, b.meter, b.shard, b.unit), (b.resource_id, b.value, kept)) for b, kept in groups]
    # The identical repeat of rids[2] (position 7) counts once; the copy of rids[0] with another value (99)
    # comes after every first copy, in a batch of its own, to meet the first as stored (a conflict).
    assert got == [
        ((h1, "cfapps", 4, "MB"), ([rids[0], rids[1], rids[2]], [1, 5, 3], [1, 6, 0])),
        ((h2, "cfapps", 4, "MB"), ([rids[0]], [10], [2])),
        ((h1, "cfapps", 9, "MB"), ([rids[3]], [4], [3])),
        ((h1, "cfservices", 4, "instance"), ([rids[1]], [2], [5])),
        ((h1, "cfapps", 4, "MB"), ([rids[0]], [99], [4])),
    ]
    for b, kept in groups:
        assert b.reading_id == ids.reading_id(b.reading_hour)
        assert b.taken_at == max(items[n].taken_at for n in kept)
        for i, n in enumerate(kept):
            src = items[n]
            assert (b.resource_name[i], b.orgs[b.org[i]], b.spaces[b.space[i]], b.kinds[b.kind[i]]) == (
                src.resource_name, Ref(src.org_id, src.org_name), Ref(src.space_id, src.space_name), src.resource_kind)


# ------------------------------------------------------------------------------------------ prices


def test_check_end() -> None:
    p = price("cfapps", "", 1, 1, T0, T0 + timedelta(days=10))
    assert check_end(p, T0 + timedelta(days=5), None) is True
    assert check_end(p, T0 + timedelta(days=10), None) is False  # already ends then
    assert check_end(p, T0 + timedelta(days=5), T0 + timedelta(days=4, hours=23)) is True
    for at, last in [
        (T0, None),  # empty range
        (T0 - timedelta(hours=1), None),
        (T0 + timedelta(days=11), None),  # would extend it
        (T0 + timedelta(days=5), T0 + timedelta(days=5)),  # an hour it priced
    ]:
        with pytest.raises(PriceEndRefusedError):
            check_end(p, at, last)


def test_price_input_validation() -> None:
    ok = {"meter": "cfapps", "unit_of_measure": "MB-hour", "microcredits_per_unit": 1, "unit": 1,
          "valid_from": "2026-03-08T00:00:00-05:00"}
    parsed = PriceIn.model_validate(ok)
    assert parsed.valid_from == datetime(2026, 3, 8, 5, tzinfo=UTC) and parsed.valid_from.tzinfo == UTC
    assert parsed.resource_kind == "" and parsed.valid_until is None
    for bad in [
        {**ok, "valid_from": "2026-03-08T00:00:00"},
        {**ok, "valid_until": "2026-03-08T05:00:00Z"},
        {**ok, "unit": 0},
        {**ok, "microcredits_per_unit": MAX_AMOUNT + 1},
        {**ok, "meter": "x" * 65},
    ]:
        with pytest.raises(ValidationError):
            PriceIn.model_validate(bad)
