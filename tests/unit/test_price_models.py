"""Price models (``shared.price_models``): the generalised exactness rule, proved against an independent model.

The expected figures never come from the code under test: ``reference_f`` below prices units with plain
Fractions, band by band in a loop (the code uses prefix sums and a bisection), and the expected total of a
group is computed from the latest revision of each usage item directly, not from the ledger simulation.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.price_models import (
    MAX_BANDS,
    AmountOutOfRangeError,
    Band,
    InvalidPriceModelError,
    PriceModel,
    amount,
    from_document,
    line_postings,
    posted,
    posting,
    to_document,
    units_of,
)
from tests.support.price_models import RawBand, floor_of, reference_f

# ------------------------------------------------------------------------------------- independent model
# ``reference_f`` (tests/support/price_models.py) is written from the definitions, shared with the ledger's tests.


def build(model: str, bands: list[RawBand]) -> PriceModel:
    return PriceModel(model, tuple(Band(u, r, f) for u, r, f in bands))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- strategies

_edge = st.builds(Fraction, st.integers(1, 5_000), st.integers(1, 12))


@st.composite
def price_bands(draw: st.DrawFn, model: str | None = None) -> tuple[str, list[RawBand]]:
    kind = model or draw(st.sampled_from(["flat", "graduated", "volume"]))
    if kind == "flat":
        return kind, [(None, draw(st.integers(0, 10**7)), 0)]
    edges = sorted(set(draw(st.lists(_edge, min_size=0, max_size=5))))
    n = len(edges) + 1
    rates = draw(st.lists(st.integers(0, 10**7), min_size=n, max_size=n))
    fees = draw(st.lists(st.one_of(st.just(0), st.integers(0, 10**6)), min_size=n, max_size=n))
    ups: list[Fraction | None] = [*edges, None]
    return kind, list(zip(ups, rates, fees, strict=True))


@dataclass(frozen=True)
class Delivery:
    """One charge revision as the ledger receives it: (measurement, revision), its hour and customer, its
    price (None: unpriced) and value in the meter's quantity."""

    item: int
    revision: int
    hour: int
    customer: int
    price: int | None
    value: int


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[str, list[RawBand], int]], list[Delivery], list[list[Delivery]]]:
    """Prices (model, bands, unit), the charges (every revision of every measurement) and the batches they
    reach the ledger in: each revision delivered once or more, shuffled, cut into random batches."""
    n_prices = draw(st.integers(1, 3))
    prices = []
    for _ in range(n_prices):
        kind, bands = draw(price_bands())
        prices.append((kind, bands, draw(st.integers(1, 730))))
    # Values that put one item's units exactly on a band edge of its price, so that totals land on edges.
    on_edge = sorted(
        {int(u * unit) for _, bands, unit in prices for u, _, _ in bands if u and (u * unit).denominator == 1}
    )
    values = st.one_of(
        st.integers(0, 50_000), st.integers(0, 5_000_000), *([st.sampled_from(on_edge)] if on_edge else [])
    )
    charges: list[Delivery] = []
    for item in range(draw(st.integers(0, 25))):
        hour = draw(st.integers(0, 23))
        customer = draw(st.integers(0, 1))
        for rev in range(1, draw(st.integers(1, 3)) + 1):
            price = draw(st.one_of(st.none(), st.integers(0, n_prices - 1)))
            value = draw(values)
            charges.append(Delivery(item, rev, hour, customer, price, value))
    copies = [c for c in charges for _ in range(draw(st.integers(1, 3)))]
    rnd = random.Random(draw(st.integers(0, 2**32)))
    rnd.shuffle(copies)
    batches: list[list[Delivery]] = []
    i = 0
    while i < len(copies):
        size = draw(st.integers(1, 8))
        batches.append(copies[i : i + size])
        i += size
    return prices, charges, batches


# ------------------------------------------------------------------------ the rule, through the ledger's way


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_posted_per_group_is_floor_of_f_of_latest_total_whatever_the_delivery(
    scenario: tuple[list[tuple[str, list[RawBand], int]], list[Delivery], list[list[Delivery]]],
) -> None:
    """Random graduated, volume and flat prices; usage items with revisions (re-priced, or another value)
    delivered duplicated, shuffled and in random batches. Applied as the ledger applies them — per item the
    highest revision seen wins, an older or equal one changes nothing, a newer one takes back the units it
    replaces (from the group it counted in) and adds its own; per batch the changes summed per (group,
    hour) and posted line by line with ``line_postings`` — each (customer, price) group ends with
    posted == floor(f(total units of the latest revisions)), is floor(f(current total)) after every batch,
    and its hourly postings sum to it."""
    prices, charges, batches = scenario
    models = [build(kind, bands) for kind, bands, _ in prices]

    applied: dict[int, tuple[int, tuple[int, int] | None, Fraction]] = {}
    totals: dict[tuple[int, int], Fraction] = defaultdict(Fraction)
    posted_sum: dict[tuple[int, int], int] = defaultdict(int)
    per_hour: dict[tuple[tuple[int, int], int], int] = defaultdict(int)
    for batch in batches:
        changes: dict[tuple[int, int], dict[int, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
        for d in batch:
            have = applied.get(d.item)
            if have is not None and have[0] >= d.revision:
                continue
            if have is not None and have[1] is not None:
                changes[have[1]][d.hour] -= have[2]
            group = None if d.price is None else (d.customer, d.price)
            units = Fraction(0) if d.price is None else units_of(d.value, prices[d.price][2])
            if group is not None:
                changes[group][d.hour] += units
            applied[d.item] = (d.revision, group, units)
        for group in sorted(changes):
            hours = sorted(changes[group])
            deltas = [changes[group][h] for h in hours]
            amounts = line_postings(models[group[1]], totals[group], deltas)
            for h, a in zip(hours, amounts, strict=True):
                per_hour[(group, h)] += a
            totals[group] += sum(deltas, Fraction(0))
            posted_sum[group] += sum(amounts)
            kind, bands, _ = prices[group[1]]
            assert posted_sum[group] == floor_of(reference_f(kind, bands, totals[group])), "balance not current"

    # Expected, from the charges alone: each item's highest revision, its units in its price's group.
    latest: dict[int, Delivery] = {}
    for c in charges:
        if c.item not in latest or c.revision > latest[c.item].revision:
            latest[c.item] = c
    expected_units: dict[tuple[int, int], Fraction] = defaultdict(Fraction)
    for c in latest.values():
        if c.price is not None:
            expected_units[(c.customer, c.price)] += Fraction(c.value, prices[c.price][2])
    for customer in (0, 1):
        for p, (kind, bands, _) in enumerate(prices):
            group = (customer, p)
            expected = floor_of(reference_f(kind, bands, expected_units[group]))
            assert posted_sum[group] == expected
            assert sum(a for (g, _), a in per_hour.items() if g == group) == expected


@st.composite
def paths(draw: st.DrawFn) -> tuple[tuple[str, list[RawBand]], list[Fraction]]:
    """A price and a path of group totals, some of them exactly on the price's edges."""
    kind, bands = draw(price_bands())
    edges = [u for u, _, _ in bands if u is not None]
    total = st.builds(Fraction, st.integers(0, 40_000), st.integers(1, 9))
    if edges:
        total = st.one_of(total, st.sampled_from(edges))
    return (kind, bands), draw(st.lists(total, max_size=12))


@settings(max_examples=300, deadline=None)
@given(paths())
def test_postings_telescope_over_any_path_of_totals(path_of: tuple[tuple[str, list[RawBand]], list[Fraction]]) -> None:
    """A group's total may go up and down (revisions replacing larger charges), through band edges: whatever
    the path from 0, the postings sum to floor(f(last total)), each one is floor(f(after)) − floor(f(before))."""
    (kind, bands), totals = path_of
    model = build(kind, bands)
    path = [Fraction(0), *totals]
    steps = [posting(model, a, b) for a, b in itertools.pairwise(path)]
    for (a, b), step in zip(itertools.pairwise(path), steps, strict=True):
        assert step == floor_of(reference_f(kind, bands, b)) - floor_of(reference_f(kind, bands, a))
    assert sum(steps) == floor_of(reference_f(kind, bands, path[-1]))


@settings(max_examples=300, deadline=None)
@given(price_bands(), st.builds(Fraction, st.integers(0, 60_000), st.integers(1, 13)))
def test_amount_is_f_exactly(price: tuple[str, list[RawBand]], units: Fraction) -> None:
    kind, bands = price
    assert amount(build(kind, bands), units) == reference_f(kind, bands, units)


@settings(max_examples=200, deadline=None)
@given(
    price_bands("graduated"),
    st.builds(Fraction, st.integers(0, 60_000), st.integers(1, 13)),
    st.builds(Fraction, st.integers(0, 60_000), st.integers(1, 13)),
)
def test_graduated_never_posts_a_decrease_when_units_grow(
    price: tuple[str, list[RawBand]], a: Fraction, b: Fraction
) -> None:
    kind, bands = price
    lo, hi = sorted((a, b))
    assert posting(build(kind, bands), lo, hi) >= 0


@given(st.integers(0, 10**9), st.builds(Fraction, st.integers(0, 10**6), st.integers(1, 97)))
def test_flat_is_graduated_and_volume_of_one_band(rate: int, units: Fraction) -> None:
    flat = PriceModel.flat(rate)
    expected = rate * units
    assert amount(flat, units) == expected
    assert amount(PriceModel("graduated", (Band(None, rate),)), units) == expected
    assert amount(PriceModel("volume", (Band(None, rate),)), units) == expected


# ------------------------------------------------------------------------------------------------- edges

_TIERS = (Band(Fraction(100), 10, 7), Band(None, 5, 3))


def test_a_total_on_an_edge_is_in_the_lower_band() -> None:
    volume = PriceModel("volume", _TIERS)
    graduated = PriceModel("graduated", _TIERS)
    # Volume: 100 units at 10 (+ fee 7); one unit more, all 101 at 5 (+ fee 3).
    assert amount(volume, Fraction(100)) == 1_007
    assert amount(volume, Fraction(101)) == 508
    # Graduated: 100 units at 10 + fee 7; half a unit more adds the second band's fee 3 and 5/2.
    assert amount(graduated, Fraction(100)) == 1_007
    assert amount(graduated, Fraction(201, 2)) == Fraction(2_025, 2)
    assert posted(graduated, Fraction(201, 2)) == 1_012
    assert volume.band_of(Fraction(100)) == 0 and volume.band_of(Fraction(100) + Fraction(1, 10**9)) == 1


def test_volume_crossing_into_a_cheaper_band_posts_a_decrease_and_still_telescopes() -> None:
    volume = PriceModel("volume", _TIERS)
    assert posting(volume, Fraction(0), Fraction(100)) == 1_007
    assert posting(volume, Fraction(100), Fraction(101)) == 508 - 1_007
    assert line_postings(volume, Fraction(0), [Fraction(60), Fraction(40), Fraction(1)]) == [607, 400, -499]
    # A revision taking units back moves the group down into the dearer band again.
    assert posting(volume, Fraction(101), Fraction(100)) == 1_007 - 508


def test_zero_usage_costs_nothing_fees_included() -> None:
    for kind in ("graduated", "volume"):
        model = PriceModel(kind, (Band(Fraction(10), 3, 1_000), Band(None, 1, 50)))
        assert amount(model, Fraction(0)) == 0
        assert posting(model, Fraction(0), Fraction(0)) == 0
        assert line_postings(model, Fraction(0), []) == []
        assert line_postings(model, Fraction(5), [Fraction(-5)]) == [-(1_000 + 15)]
    assert posted(PriceModel.flat(0), Fraction(10**30)) == 0


def test_amounts_near_two_to_the_62() -> None:
    flat = PriceModel.flat(1)
    assert posted(flat, Fraction(2**62)) == 2**62
    with pytest.raises(AmountOutOfRangeError):
        posted(flat, Fraction(2**62 + 1))
    huge = PriceModel.flat(2**62)
    units = units_of(2**62, 1)
    assert amount(huge, units) == 2**124  # exact, no overflow
    with pytest.raises(AmountOutOfRangeError):
        posting(huge, Fraction(0), units)
    # A fraction of a unit at the largest rate stays exact and in range.
    assert posted(huge, units_of(1, 2**62)) == 1
    with pytest.raises(AmountOutOfRangeError):
        amount(flat, Fraction(-1, 3))
    with pytest.raises(AmountOutOfRangeError):
        units_of(1, 0)


@pytest.mark.parametrize(
    ("model", "bands", "reason"),
    [
        ("graduated", (), "at least one band"),
        ("graduated", (Band(Fraction(10), 1),), "open-ended"),
        ("graduated", (Band(None, 1), Band(None, 2)), "only the last band"),
        ("volume", (Band(Fraction(10), 1), Band(Fraction(10), 2), Band(None, 3)), "increase strictly"),
        ("volume", (Band(Fraction(10), 1), Band(Fraction(5), 2), Band(None, 3)), "increase strictly"),
        ("flat", (Band(Fraction(10), 1), Band(None, 2)), "flat price"),
        ("flat", (Band(None, 1, 5),), "flat price"),
        ("tiered", (Band(None, 1),), "model must be one of"),
        ("graduated", (*(Band(Fraction(i + 1), 1) for i in range(MAX_BANDS)), Band(None, 1)), "at most"),
    ],
)
def test_invalid_models_are_refused(model: str, bands: tuple[Band, ...], reason: str) -> None:
    with pytest.raises(InvalidPriceModelError, match=reason):
        PriceModel(model, bands)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("up_to", "rate", "fee", "reason"),
    [
        (Fraction(0), 1, 0, "positive"),
        (Fraction(-3, 2), 1, 0, "positive"),
        (Fraction(2**62 + 1), 1, 0, "above 2\\*\\*62"),
        (Fraction(1, 2**62 + 1), 1, 0, "above 2\\*\\*62"),
        (None, 2**62 + 1, 0, "microcredits_per_unit"),
        (None, -1, 0, "microcredits_per_unit"),
        (None, 1, 2**62 + 1, "flat_fee"),
        (None, True, 0, "integer"),
        (0.5, 1, 0, "Fraction"),
    ],
)
def test_invalid_bands_are_refused(up_to: object, rate: object, fee: object, reason: str) -> None:
    with pytest.raises(InvalidPriceModelError, match=reason):
        Band(up_to, rate, fee)  # type: ignore[arg-type]


def test_bounds_themselves_are_accepted() -> None:
    band = Band(Fraction(2**62), 2**62, 2**62)
    assert band.up_to == 2**62
    assert Band(3, 1).up_to == Fraction(3)  # type: ignore[arg-type]
    model = PriceModel("graduated", (*(Band(Fraction(i + 1), 1) for i in range(MAX_BANDS - 1)), Band(None, 2)))
    assert amount(model, Fraction(MAX_BANDS)) == (MAX_BANDS - 1) + 2


# ---------------------------------------------------------------------------------------- stored form


@given(price_bands())
def test_the_json_form_reads_back_to_the_same_function(price: tuple[str, list[RawBand]]) -> None:
    kind, bands = price
    model = build(kind, bands)
    doc = to_document(model)
    assert from_document(json.loads(json.dumps(doc))) == model
    edges = [b["up_to"] for b in doc["bands"]]  # type: ignore[attr-defined]
    assert edges == [None if u is None else str(u) for u, _, _ in bands]  # Fraction's str: "n" or "n/d"


def test_the_json_form_of_a_graduated_price() -> None:
    doc = {
        "model": "graduated",
        "bands": [
            {"up_to": "1000", "microcredits_per_unit": 0},
            {"up_to": "4001/2", "microcredits_per_unit": 1370, "flat_fee": 250},
            {"up_to": None, "microcredits_per_unit": 1000, "flat_fee": 0},
        ],
    }
    model = from_document(doc)
    assert model.bands[1] == Band(Fraction(4001, 2), 1370, 250)
    # 1,000 free, then 1,000.5 units at 1,370 plus the fee 250, then 2.5 units at 1,000.
    assert amount(model, Fraction(2003)) == 250 + Fraction(2001, 2) * 1370 + Fraction(5, 2) * 1000


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([], "exactly"),
        ({"model": "volume"}, "exactly"),
        ({"model": "volume", "bands": {}}, "must be a list"),
        ({"model": "volume", "bands": [{"up_to": None}]}, "must have"),
        ({"model": "volume", "bands": [{"up_to": None, "microcredits_per_unit": 1, "fee": 1}]}, "must have"),
        ({"model": "volume", "bands": [{"up_to": 10, "microcredits_per_unit": 1}]}, "string"),
        ({"model": "volume", "bands": [{"up_to": "1.5", "microcredits_per_unit": 1}]}, "string"),
        ({"model": "volume", "bands": [{"up_to": "010", "microcredits_per_unit": 1}]}, "string"),
        ({"model": "volume", "bands": [{"up_to": "-1", "microcredits_per_unit": 1}]}, "string"),
        ({"model": "volume", "bands": [{"up_to": "3/0", "microcredits_per_unit": 1}]}, "string"),
        ({"model": "volume", "bands": [{"up_to": "10", "microcredits_per_unit": 1}]}, "open-ended"),
        ({"model": "volume", "bands": [{"up_to": None, "microcredits_per_unit": "1"}]}, "integer"),
        ({"model": "volume", "bands": [{"up_to": None, "microcredits_per_unit": 1.0}]}, "integer"),
    ],
)
def test_bad_json_forms_are_refused(doc: object, reason: str) -> None:
    with pytest.raises(InvalidPriceModelError, match=reason):
        from_document(doc)
