"""The fast decoders of shared/wire.py against the pydantic contracts they mirror.

What consumers rely on: a message the fast path accepts is one the contract accepts, with equal values
(times in UTC); a message the contract refuses is refused with the contract's reason; and the messages
our own producers write take the fast path (otherwise it buys nothing).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from shared.contracts import ChargeComputed, MeasurementTaken
from shared.wire import MIRRORS, Charge, Measurement, _fast, decoder_for

HOUR = "2026-03-08T06:00:00Z"


def measurement_doc() -> dict[str, Any]:
    return {
        "id": "0f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f60",
        "schema_name": "usage.measurement",
        "schema_version": 1,
        "reading_id": "1f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f61",
        "reading_hour": HOUR,
        "meter": "cfapps",
        "resource_id": "app-1",
        "resource_kind": "",
        "resource_name": "web",
        "org_id": "org-1",
        "org_name": "Agency",
        "space_id": "space-1",
        "space_name": "prod",
        "value": 1024,
        "unit": "MB",
        "estimated": False,
        "taken_at": "2026-03-08T06:01:30.123456Z",
    }


def charge_doc() -> dict[str, Any]:
    return {
        "id": "2f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f62",
        "schema_name": "usage.charge",
        "schema_version": 1,
        "measurement_id": "0f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f60",
        "revision": 1,
        "reading_hour": HOUR,
        "meter": "cfservices",
        "resource_id": "si-1",
        "resource_kind": "plan-small",
        "resource_name": "db",
        "org_id": "org-1",
        "org_name": "Agency",
        "space_id": "space-1",
        "space_name": "prod",
        "value": 1,
        "unit": "instance",
        "estimated": True,
        "status": "priced",
        "price_id": "3f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f63",
        "amount_numerator": 1_000_000,
        "amount_denominator": 730,
        "display_amount": "0.001370",
        "priced_at": "2026-03-08T06:02:00+00:00",
    }


DOCS = {MeasurementTaken: measurement_doc, ChargeComputed: charge_doc}


def assert_same(struct: msgspec.Struct, model: BaseModel) -> None:
    for name in type(model).model_fields:
        ours, theirs = getattr(struct, name), getattr(model, name)
        assert ours == theirs, name
        assert type(ours) is type(theirs), name
        if isinstance(ours, datetime):
            assert ours.utcoffset() == timedelta(0), name


@pytest.mark.parametrize("model", list(MIRRORS))
def test_mirror_has_the_contracts_fields_and_defaults(model: type[BaseModel]) -> None:
    struct = MIRRORS[model]
    info = msgspec.structs.fields(struct)
    assert {f.name for f in info} == set(model.model_fields)
    for f in info:
        field = model.model_fields[f.name]
        assert f.required == field.is_required(), f.name
        if not f.required:
            assert f.default == field.default, f.name


@pytest.mark.parametrize("model", list(MIRRORS))
def test_what_producers_write_takes_the_fast_path(model: type[BaseModel]) -> None:
    raw = model.model_validate(DOCS[model]()).model_dump_json().encode()
    msg = _fast(MIRRORS[model])(raw)
    assert msg is not None
    assert_same(msg, model.model_validate_json(raw))


def test_offsets_become_utc_and_long_fractions_are_truncated_like_the_contract() -> None:
    decode = decoder_for(MeasurementTaken)
    doc = measurement_doc() | {"reading_hour": "2026-03-08T01:00:00-05:00", "taken_at": "2026-03-08T06:01:30.9999999Z"}
    msg = decode(orjson.dumps(doc))
    assert isinstance(msg, Measurement)
    assert msg.reading_hour == datetime(2026, 3, 8, 6, tzinfo=UTC) and msg.reading_hour.tzinfo is UTC
    assert msg.taken_at == datetime(2026, 3, 8, 6, 1, 30, 999999, tzinfo=UTC)  # truncated, not rounded


def test_invalid_messages_raise_the_contracts_reason() -> None:
    decode = decoder_for(ChargeComputed)
    for bad in ({"value": -1}, {"value": "512"}, {"revision": 0}, {"reading_hour": "2026-03-08T06:00:00"}, {"extra": 1}):
        raw = orjson.dumps(charge_doc() | bad)
        with pytest.raises(ValidationError) as err:
            decode(raw)
        with pytest.raises(ValidationError) as expected:
            ChargeComputed.model_validate_json(raw)
        assert str(err.value) == str(expected.value)


# -- generated documents ---------------------------------------------------------------------------

_times = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.sampled_from([UTC, None])
    ).map(lambda d: d.isoformat()),
    st.builds(
        lambda d, frac, sep, tz: d.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + tz,
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
        st.sampled_from(["", ".5", ".123456", ".1234567", ".9999999", ".123456789", "."]),
        st.sampled_from(["T", "t", " ", "_"]),
        st.sampled_from(["Z", "z", "+00:00", "-00:00", "+0000", "+05:30", "-14:00", "+23:59", "+24:00", "+00", ""]),
    ),
    st.sampled_from(["2026-03-08T06:00Z", "2026-03-08", "0001-01-01T00:00:00+01:00", "2026-02-30T00:00:00Z", "2026-03-08T23:59:60Z"]),
)
_uuids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: "urn:uuid:" + str(u)),
    st.uuids().map(lambda u: str(u)[:-1]),
)
_ints = st.one_of(
    st.integers(-5, 5),
    st.sampled_from([2**62 - 1, 2**62, 2**62 + 1, 2**63, 2**64, 2**70, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.just(1.0),
)
_texts = st.one_of(
    st.text(max_size=3),
    st.integers(0, 600).map(lambda n: "x" * n),
    st.integers(0, 600).map(lambda n: "é" * n),
    st.integers(0, 200).map(lambda n: "\U0001f600" * n),
    st.sampled_from(["priced", "unpriced", "usage.measurement", "usage.charge", "\x00", "MB"]),
)
_values = st.one_of(
    _times, _uuids, _ints, _texts, st.booleans(), st.none(), st.just([]), st.just({}), st.sampled_from([0, 1, 2, "1", True])
)


@st.composite
def documents(draw: st.DrawFn, model: type[BaseModel]) -> bytes:
    doc = DOCS[model]()
    names = sorted(doc)
    for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        if draw(st.booleans()):
            doc[name] = draw(_values)
        elif draw(st.integers(0, 3)) == 0:
            del doc[name]
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(["extra", "Value", "ID"]))] = 1
    text = json.dumps(doc, ensure_ascii=False)  # the standard library writes integers beyond 64 bits
    tweak = draw(st.integers(0, 12))
    if tweak == 0 and doc:  # a key twice: the later value is the one both read (or one refuses)
        name = draw(st.sampled_from(sorted(doc)))
        text = text[:-1] + "," + json.dumps(name) + ":" + json.dumps(draw(_values)) + "}"
    elif tweak == 1:
        text = text.replace('"web"', '"\\ud800"')  # a lone surrogate
    elif tweak == 2:
        text = text + draw(st.sampled_from(["", " ", "\n", "x", "}"]))
    elif tweak == 3:
        text = draw(st.sampled_from(["[]", "null", "1", '"x"', "", "{"]))
    return text.encode()


def _differential(model: type[BaseModel], raw: bytes) -> None:
    fast = _fast(MIRRORS[model])(raw)
    try:
        expected = model.model_validate_json(raw)
    except ValidationError as exc:
        assert fast is None, f"the fast path accepted what the contract refuses: {raw!r}"
        with pytest.raises(ValidationError) as err:
            decoder_for(model)(raw)
        assert str(err.value) == str(exc)
        return
    if fast is not None:
        assert_same(fast, expected)
    decoded = decoder_for(model)(raw)
    assert isinstance(decoded, MIRRORS[model])
    assert_same(decoded, expected)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_fast_path_never_reads_a_measurement_differently(data: st.DataObject) -> None:
    _differential(MeasurementTaken, data.draw(documents(MeasurementTaken)))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_fast_path_never_reads_a_charge_differently(data: st.DataObject) -> None:
    _differential(ChargeComputed, data.draw(documents(ChargeComputed)))


def test_generated_documents_exercise_both_answers() -> None:
    """Guard for the property tests above: canonical documents decode on the fast path, and these
    mutations are refused by both (so the property compares both branches, not one)."""
    assert _fast(Measurement)(orjson.dumps(measurement_doc())) is not None
    assert _fast(Charge)(orjson.dumps(charge_doc())) is not None
    for raw in (b"[]", b"{", orjson.dumps(measurement_doc() | {"value": 2**62 + 1})):
        assert _fast(Measurement)(raw) is None
        with pytest.raises(ValidationError):
            MeasurementTaken.model_validate_json(raw)
    assert uuid.UUID(str(decoder_for(MeasurementTaken)(orjson.dumps(measurement_doc())).id))


EDGES: list[Any] = [
    None, True, False, 0, 1, -1, 2, "1", 1.0, 0.5, [], {}, "", "x", "\x00", "priced", "unpriced",
    2**62 - 1, 2**62, 2**62 + 1, 2**63, 2**64, 2**70,
    *("x" * n for n in (31, 32, 33, 63, 64, 65, 127, 128, 129, 511, 512, 513)),
    *("é" * n for n in (32, 33, 64, 65, 512, 513)),
    *("\U0001f600" * n for n in (32, 33, 64, 65, 512, 513)),
    "2026-03-08T06:00:00Z", "2026-03-08T06:00:00", "2026-03-08T01:00:00-05:00", "2026-03-08T06:00:00.9999999Z",
    "2026-03-08T06:00Z", "0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00-01:00", "9999-12-31T23:59:59-01:00",
    "2026-03-08T06:00:00+24:00", "2026-03-08",
    "0f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f60", "0f4b5a4e9c1e5d558f7a2b1d3c4e5f60", "urn:uuid:0f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f60",
]


@pytest.mark.parametrize("model", list(MIRRORS))
def test_every_field_at_its_edges(model: type[BaseModel]) -> None:
    """Each field set to each edge value (types, integer and length limits, time forms), one at a time."""
    for name in DOCS[model]():
        for value in EDGES:
            _differential(model, json.dumps(DOCS[model]() | {name: value}, ensure_ascii=False).encode())
