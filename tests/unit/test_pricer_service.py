"""The pricer's pure logic: exact amounts, the in-memory catalog, the charge documents and their fast
helpers, each checked against an independent oracle (fractions, shared.ids, shared.money, the contract
model, a linear scan of the prices)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.pricer.schemas import PriceIn
from services.pricer.service import (
    MAX_AMOUNT,
    Catalog,
    Price,
    PriceEndRefusedError,
    charge_id_str,
    check_end,
    display_amount,
    exact_amount,
    price_batch,
    reprice_document,
)
from shared import ids
from shared.contracts import ChargeComputed, MeasurementTaken
from shared.money import display_credits

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRICED_AT = datetime(2026, 6, 1, 12, 30, 15, 123456, tzinfo=UTC)


def price(meter: str, kind: str, mpu: int, unit: int, start: datetime, end: datetime | None) -> Price:
    return Price(uuid.uuid4(), meter, kind, "MB-hour", mpu, unit, start, end, T0)


def measurement(hour: datetime, resource: str, value: int, meter: str = "cfapps", kind: str = "", **extra: object) -> MeasurementTaken:
    return MeasurementTaken(
        id=ids.measurement_id(hour, meter, resource),
        reading_id=ids.reading_id(hour),
        reading_hour=hour,
        meter=meter,
        resource_id=resource,
        resource_kind=kind,
        resource_name=f"name of {resource}",
        org_id="org-7",
        org_name="Org \"Seven\" ✓",
        space_id="space-1",
        space_name="dev",
        value=value,
        unit="MB",
        taken_at=hour + timedelta(hours=1),
        **extra,  # type: ignore[arg-type]
    )


@given(st.integers(0, 2**40), st.integers(0, 2**20), st.integers(1, 2**40))
def test_exact_amount_is_the_reduced_fraction(value: int, mpu: int, unit: int) -> None:
    n, d = exact_amount(value, mpu, unit)
    assert Fraction(n, d) == Fraction(value * mpu, unit)
    assert d >= 1 and Fraction(n, d).denominator == d  # lowest terms


@given(st.integers(0, 2**62), st.integers(1, 2**62))
def test_display_amount_equals_shared_display_credits(n: int, d: int) -> None:
    assert display_amount(n, d) == display_credits(Fraction(n, d))


@given(st.uuids(), st.integers(1, 10_000))
def test_charge_id_str_equals_shared_ids(measurement: uuid.UUID, revision: int) -> None:
    assert charge_id_str(str(measurement), revision) == str(ids.charge_id(measurement, revision))


def _oracle(prices: list[Price], meter: str, kind: str, at: datetime) -> Price | None:
    found = [
        p for p in prices
        if p.meter == meter and p.resource_kind == kind and p.valid_from <= at and (p.valid_until is None or at < p.valid_until)
    ]
    assert len(found) <= 1
    return found[0] if found else None


@st.composite
def catalogs(draw: st.DrawFn) -> list[Price]:
    """Non-overlapping prices per (meter, kind), with gaps, starting anywhere within 30 days."""
    out: list[Price] = []
    for meter, kind in [("cfapps", ""), ("cfservices", "a"), ("cfservices", "b")]:
        cuts = sorted(draw(st.sets(st.integers(0, 30 * 24), max_size=8)))
        for i in range(0, len(cuts) - 1, 1):
            if draw(st.booleans()):
                out.append(price(meter, kind, i + 1, 3, T0 + timedelta(hours=cuts[i]), T0 + timedelta(hours=cuts[i + 1])))
        if cuts and draw(st.booleans()):
            out.append(price(meter, kind, 99, 7, T0 + timedelta(hours=cuts[-1]), None))
    return out


@given(catalogs(), st.lists(st.tuples(st.sampled_from([("cfapps", ""), ("cfservices", "a"), ("cfservices", "b"), ("x", "")]), st.integers(-5, 31 * 24)), max_size=60))
def test_catalog_finds_the_price_valid_at_the_instant(prices: list[Price], probes: list[tuple[tuple[str, str], int]]) -> None:
    catalog = Catalog(prices)
    for (meter, kind), h in probes:
        at = T0 + timedelta(hours=h)
        assert catalog.price_at(meter, kind, at) == _oracle(prices, meter, kind, at)
        assert catalog.price_at(meter, kind, at) == _oracle(prices, meter, kind, at)  # memoised answer too


def test_charge_document_is_the_contract_message() -> None:
    p = price("cfapps", "", 1_000_000, 730 * 1024, T0, None)
    m = measurement(T0 + timedelta(hours=5), "app-1", 3 * 1024, estimated=True)
    batch = price_batch([m], Catalog([p]), PRICED_AT)
    assert batch.rejects == [] and batch.unpriced == []
    got = ChargeComputed.model_validate_json(batch.payloads[0])
    amount = Fraction(3 * 1024 * 1_000_000, 730 * 1024)
    expected = ChargeComputed(
        id=ids.charge_id(m.id, 1),
        measurement_id=m.id,
        revision=1,
        reading_hour=m.reading_hour,
        meter="cfapps",
        resource_id="app-1",
        resource_kind="",
        resource_name="name of app-1",
        org_id="org-7",
        org_name="Org \"Seven\" ✓",
        space_id="space-1",
        space_name="dev",
        value=3 * 1024,
        unit="MB",
        estimated=True,
        status="priced",
        price_id=p.id,
        amount_numerator=amount.numerator,
        amount_denominator=amount.denominator,
        display_amount=display_credits(amount),
        priced_at=PRICED_AT,
    )
    assert got == expected
    assert batch.rows == [(m.reading_hour, m.id, 1, "cfapps", "", 3 * 1024, p.id, amount.numerator, amount.denominator, PRICED_AT)]


def test_unpriced_charge_then_repriced_revision() -> None:
    m = measurement(T0 + timedelta(hours=2), "svc-1", 2, meter="cfservices", kind="a")
    batch = price_batch([m], Catalog([]), PRICED_AT)
    first = ChargeComputed.model_validate_json(batch.payloads[0])
    assert (first.status, first.price_id, first.amount_numerator, first.amount_denominator) == ("unpriced", None, 0, 1)
    assert first.display_amount == "0.000000"
    assert batch.rows == [(m.reading_hour, m.id, 1, "cfservices", "a", 2, None, 0, 1, PRICED_AT)]
    ((mid, hour, meter, kind, revision, doc),) = batch.unpriced
    assert (mid, hour, meter, kind, revision) == (m.id, m.reading_hour, "cfservices", "a", 1)
    assert orjson.loads(doc) == orjson.loads(batch.payloads[0])

    p = price("cfservices", "a", 1_000_000, 730, T0, None)
    later = PRICED_AT + timedelta(days=1)
    repriced = reprice_document(orjson.loads(batch.payloads[0]), m.reading_hour, Catalog([p]), later)
    assert repriced is not None
    second = ChargeComputed.model_validate_json(repriced.payload)
    assert second.model_dump(exclude={"id", "revision", "status", "price_id", "amount_numerator", "amount_denominator", "display_amount", "priced_at"}) == first.model_dump(
        exclude={"id", "revision", "status", "price_id", "amount_numerator", "amount_denominator", "display_amount", "priced_at"}
    )
    assert (second.revision, second.id, second.status, second.price_id) == (2, ids.charge_id(m.id, 2), "priced", p.id)
    assert Fraction(second.amount_numerator, second.amount_denominator) == Fraction(2 * 1_000_000, 730)
    assert second.priced_at == later and repriced.org_id == "org-7"
    # Still no covering price: nothing to re-price.
    assert reprice_document(orjson.loads(batch.payloads[0]), m.reading_hour, Catalog([]), later) is None


def test_batch_rejects_what_it_cannot_price_and_prices_the_rest_once() -> None:
    p = price("cfapps", "", 2**40, 1, T0, None)
    hour = T0 + timedelta(hours=3)
    good = measurement(hour, "app-ok", 10)
    not_whole = measurement(hour, "app-half", 10).model_copy(update={"reading_hour": hour + timedelta(minutes=30)})
    wrong_id = measurement(hour, "app-id", 10).model_copy(update={"id": uuid.uuid4()})
    too_big = measurement(hour, "app-big", 2**30)  # 2**70 microcredits > 2**62
    batch = price_batch([good, not_whole, good, wrong_id, too_big, good], Catalog([p]), PRICED_AT)
    assert [i for i, _ in batch.rejects] == [1, 3, 4]
    reasons = [why for _, why in batch.rejects]
    assert "whole UTC hour" in reasons[0] and "measurement_id" in reasons[1] and "2**62" in reasons[2]
    assert [m.id for m in batch.measurements] == [good.id]
    assert len(batch.rows) == len(batch.payloads) == 1


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
    ok = {"meter": "cfapps", "unit_of_measure": "MB-hour", "microcredits_per_unit": 1, "unit": 1, "valid_from": "2026-03-08T00:00:00-05:00"}
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
