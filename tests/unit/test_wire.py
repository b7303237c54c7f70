"""The fast decoders against the pydantic contracts they mirror: shared/wire.py (the v1 messages,
``MeasurementTaken`` and ``ChargeComputed``) and shared/batches.py (the v2 batches, ``MeasurementsTaken``
and ``ChargesComputed``, decoded with item checks).

What consumers rely on: a message the fast path accepts is one the contract accepts, with equal values
(times in UTC); a message the contract refuses is refused with the contract's reason; and the messages
our own producers write take the fast path (otherwise it buys nothing). For a batch, the items it keeps
are items the contract accepts, read the same; whatever the contract refuses, the decoder refuses too,
as a whole or item by item; and every item is kept, refused (with its own bytes), or a repeat of a kept one.
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

from shared.batches import (
    MAX_ITEMS,
    SHARDS,
    Charges,
    Measurements,
    decode_charges,
    decode_measurements,
    describe_error,
    encode_charges,
    encode_measurements,
    read_as_written,
    shard_of,
)
from shared.contracts import ChargeComputed, ChargesComputed, ChargesComputedV2, MeasurementsTaken, MeasurementTaken
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
    bads = ({"value": -1}, {"value": "512"}, {"revision": 0}, {"reading_hour": "2026-03-08T06:00:00"}, {"extra": 1})
    for bad in bads:
        raw = orjson.dumps(charge_doc() | bad)
        with pytest.raises(ValidationError) as err:
            decode(raw)
        with pytest.raises(ValidationError) as expected:
            ChargeComputed.model_validate_json(raw)
        assert str(err.value) == str(expected.value)


# -- generated documents ---------------------------------------------------------------------------

_times = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.sampled_from([UTC, None])  # noqa: DTZ001
    ).map(lambda d: d.isoformat()),
    st.builds(
        lambda d, frac, sep, tz: d.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + tz,
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),  # noqa: DTZ001 - naive on purpose
        st.sampled_from(["", ".5", ".123456", ".1234567", ".9999999", ".123456789", "."]),
        st.sampled_from(["T", "t", " ", "_"]),
        st.sampled_from(["Z", "z", "+00:00", "-00:00", "+0000", "+05:30", "-14:00", "+23:59", "+24:00", "+00", ""]),
    ),
    st.sampled_from(
        ["2026-03-08T06:00Z", "2026-03-08", "0001-01-01T00:00:00+01:00", "2026-02-30T00:00:00Z", "2026-03-08T23:59:60Z"]
    ),
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
    _times, _uuids, _ints, _texts, st.booleans(), st.none(), st.just([]), st.just({}),
    st.sampled_from([0, 1, 2, "1", True]),
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
    elif tweak == 4:
        text = _escape_a_time_digit(draw, doc, text)
    return text.encode()


_TIME_FIELDS = ("reading_hour", "taken_at", "priced_at")


def _escape_a_time_digit(draw: st.DrawFn, doc: dict[str, Any], text: str) -> str:
    """A digit of a time written as a JSON escape (``\\u0039`` for 9): the same string to every JSON reader,
    but not to a scan of the raw bytes."""
    names = [n for n in _TIME_FIELDS if isinstance(doc.get(n), str) and any(c.isdigit() for c in doc[n])]
    if not names:
        return text
    name = draw(st.sampled_from(names))
    value: str = doc[name]
    positions = [i for i, c in enumerate(value) if c.isdigit()]
    i = draw(st.sampled_from(positions))
    escaped = json.dumps(value[:i])[:-1] + f"\\u{ord(value[i]):04x}" + json.dumps(value[i + 1 :])[1:]
    key = json.dumps(name) + ": "
    return text.replace(key + json.dumps(value, ensure_ascii=False), key + escaped, 1)


def _differential(model: type[BaseModel], raw: bytes) -> None:
    fast = _fast(MIRRORS[model])(raw)
    try:
        expected = model.model_validate_json(raw)
    except ValidationError as exc:
        assert fast is None, f"the fast path accepted what the contract refuses: {raw[:300]!r}"
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
    "0f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f60", "0f4b5a4e9c1e5d558f7a2b1d3c4e5f60",
    "urn:uuid:0f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f60",
]


@pytest.mark.parametrize("model", list(MIRRORS))
def test_every_field_at_its_edges(model: type[BaseModel]) -> None:
    """Each field set to each edge value (types, integer and length limits, time forms), one at a time."""
    for name in DOCS[model]():
        for value in EDGES:
            _differential(model, json.dumps(DOCS[model]() | {name: value}, ensure_ascii=False).encode())


def test_a_time_with_an_escaped_digit_is_read_like_the_contract() -> None:
    raw = orjson.dumps(measurement_doc() | {"taken_at": "2026-03-08T06:01:30.999999Z"}).replace(
        b'30.999999Z"', b'30.999999\\u0039Z"'
    )
    msg = decoder_for(MeasurementTaken)(raw)
    assert msg.taken_at == MeasurementTaken.model_validate_json(raw).taken_at == datetime(
        2026, 3, 8, 6, 1, 30, 999999, tzinfo=UTC
    )


# -- the v2 batches (shared/batches.py) ---------------------------------------------------------------

BATCH_MODELS: dict[type[BaseModel], tuple[type[msgspec.Struct], Any]] = {
    MeasurementsTaken: (Measurements, decode_measurements),
    ChargesComputed: (Charges, decode_charges),
}
ITEM_COLUMNS = ("resource_id", "resource_name", "org", "space", "kind", "value", "estimated")
CHARGE_COLUMNS = (*ITEM_COLUMNS, "revision", "price", "amount_numerator", "amount_denominator")
TABLES = ("orgs", "spaces", "kinds", "prices")
SHARD = 7
RESOURCES = [f"si-{i}" for i in range(400) if shard_of(f"si-{i}") == SHARD][:4]
STRANGER = next(f"si-{i}" for i in range(400) if shard_of(f"si-{i}") != SHARD)


def measurements_doc() -> dict[str, Any]:
    return {
        "id": "4f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f64",
        "schema_name": "usage.measurements",
        "schema_version": 2,
        "reading_id": "1f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f61",
        "reading_hour": HOUR,
        "meter": "cfservices",
        "unit": "instance",
        "shard": SHARD,
        "taken_at": "2026-03-08T06:01:30.123456Z",
        "orgs": [{"id": "org-1", "name": "Agency"}, {"id": "", "name": ""}],
        "spaces": [{"id": "space-1", "name": "prod"}],
        "kinds": ["plan-small", "plan-large"],
        "resource_id": RESOURCES[:3],
        "resource_name": ["db", "web", "cache"],
        "org": [0, 1, 0],
        "space": [0, 0, 0],
        "kind": [0, 1, 1],
        "value": [1, 2, 3],
        "estimated": [False, True, False],
    }


def charges_doc() -> dict[str, Any]:
    doc = measurements_doc()
    del doc["reading_id"], doc["taken_at"]
    return doc | {
        "id": "5f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f65",
        "schema_name": "usage.charges",
        "schema_version": 3,
        "priced_at": "2026-03-08T06:02:00+00:00",
        "prices": [{"id": "3f4b5a4e-9c1e-5d55-8f7a-2b1d3c4e5f63", "microcredits_per_unit": 1_000_000, "unit": 730}],
        "revision": [1, 2, 1],
        "price": [0, -1, 0],
        "amount_numerator": [1_000_000, 0, 3_000_000],
        "amount_denominator": [730, 1, 730],
    }


BATCH_DOCS = {MeasurementsTaken: measurements_doc, ChargesComputed: charges_doc}

_item_values = st.one_of(
    _ints,
    _texts,
    st.booleans(),
    st.none(),
    st.sampled_from([-1, 0, 1, 2, 3, 5000, 2**31 - 1, 2**31, STRANGER, *RESOURCES, "", "x" * 65, "é" * 513]),
)
_table_entries = st.one_of(
    _values,
    st.fixed_dictionaries({"id": _texts}, optional={"name": _texts, "extra": st.just(1)}),
    st.fixed_dictionaries(
        {"id": _uuids, "microcredits_per_unit": _ints, "unit": _ints}, optional={"extra": st.just(1)}
    ),
    st.sampled_from(["x" * 128, "x" * 129, "é" * 129]),
)


@st.composite
def batch_documents(draw: st.DrawFn, model: type[BaseModel]) -> bytes:
    doc = BATCH_DOCS[model]()
    columns = CHARGE_COLUMNS if model is ChargesComputed else ITEM_COLUMNS
    n = len(doc["resource_id"])
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.integers(0, 9))
        lists = [c for c in columns if isinstance(doc.get(c), list) and len(doc[c]) == n]
        tables = [t for t in TABLES if isinstance(doc.get(t), list) and doc[t]]
        if what <= 3 and lists:  # an item's entry
            doc[draw(st.sampled_from(lists))][draw(st.integers(0, n - 1))] = draw(_item_values)
        elif what == 4 and tables:  # a table's entry
            table = draw(st.sampled_from(tables))
            doc[table][draw(st.integers(0, len(doc[table]) - 1))] = draw(_table_entries)
        elif what == 5 and lists:  # a column one entry short or long
            column = draw(st.sampled_from(lists))
            doc[column] = doc[column][:-1] if draw(st.booleans()) else [*doc[column], doc[column][0]]
        elif what == 6 and len(lists) == len(columns):  # an item repeated, as it was or changed
            i = draw(st.integers(0, n - 1))
            changed = draw(st.one_of(st.none(), st.sampled_from(columns)))
            for column in columns:
                doc[column].append(doc[column][i] if column != changed else draw(_item_values))
            n += 1
        elif what == 7:  # a whole field
            name = draw(st.sampled_from(sorted(doc)))
            if draw(st.booleans()):
                doc[name] = draw(st.one_of(_values, st.lists(_item_values, max_size=3)))
            else:
                del doc[name]
        elif what == 8:  # a table beyond MAX_ITEMS entries, or a time of the generated forms
            if draw(st.booleans()) and tables:
                table = draw(st.sampled_from(tables))
                doc[table] = doc[table] * (MAX_ITEMS // len(doc[table]) + draw(st.integers(0, 1)))
            else:
                doc[draw(st.sampled_from([t for t in _TIME_FIELDS if t in BATCH_DOCS[model]()]))] = draw(_times)
        elif what == 9:
            doc[draw(st.sampled_from(["extra", "Value", "ID"]))] = 1
    text = json.dumps(doc, ensure_ascii=False)
    tweak = draw(st.integers(0, 12))
    if tweak == 0 and doc:
        name = draw(st.sampled_from(sorted(doc)))
        text = text[:-1] + "," + json.dumps(name) + ":" + json.dumps(draw(_values)) + "}"
    elif tweak == 1:
        text = text.replace('"web"', '"\\ud800"')
    elif tweak == 2:
        text = text + draw(st.sampled_from(["", " ", "\n", "x", "}"]))
    elif tweak == 3:
        text = draw(st.sampled_from(["[]", "null", "1", '"x"', "", "{"]))
    elif tweak == 4:
        text = _escape_a_time_digit(draw, doc, text)
    return text.encode()


def _resolved(m: Any, i: int, charges: bool) -> tuple[Any, ...]:
    """Item ``i`` of a mirror struct or a contract model, its positions resolved into the tables' values."""
    org, space = m.orgs[m.org[i]], m.spaces[m.space[i]]
    facts: tuple[Any, ...] = (
        m.resource_id[i], m.resource_name[i], (org.id, org.name), (space.id, space.name), m.kinds[m.kind[i]],
        m.value[i], m.estimated[i],
    )
    if charges:
        p = None if m.price[i] < 0 else m.prices[m.price[i]]
        terms = None if p is None else (p.id, p.microcredits_per_unit, p.unit)
        facts += (m.revision[i], terms, m.amount_numerator[i], m.amount_denominator[i])
    for value in facts:
        assert type(value) in (str, int, bool, tuple, type(None)), facts
    return facts


def _same_envelope(struct: msgspec.Struct, model: BaseModel, columns: tuple[str, ...]) -> None:
    for name in type(model).model_fields:
        if name in columns or name in TABLES:
            continue
        ours, theirs = getattr(struct, name), getattr(model, name)
        assert ours == theirs, name
        assert type(ours) is type(theirs), name
        if isinstance(ours, datetime):
            assert ours.utcoffset() == timedelta(0) and ours.tzinfo is UTC, name


def _contract_of(model: type[BaseModel], raw: bytes) -> type[BaseModel]:
    """The contract a batch is read against: the charges mirror reads usage.charges.v3 and the v2 bodies
    that topic's predecessor (and the pricer's stored batches) carry, so a body saying schema_version 2 is
    held to the v2 contract."""
    if model is ChargesComputed:
        try:
            version = json.loads(raw).get("schema_version")
        except (ValueError, AttributeError):
            return model
        if version == 2 and not isinstance(version, bool):
            return ChargesComputedV2
    return model


def _batch_differential(model: type[BaseModel], raw: bytes) -> None:
    struct, decode = BATCH_MODELS[model]
    charges = model is ChargesComputed
    columns = CHARGE_COLUMNS if charges else ITEM_COLUMNS
    decoded = decode(raw)
    contract = _contract_of(model, raw)
    try:
        whole: BaseModel | None = contract.model_validate_json(raw)
        refusal = ""
    except ValidationError as exc:
        whole, refusal = None, f"invalid {model.__name__}: {describe_error(exc)}"
    whole_refusals = [r for r in decoded.rejected if not r.positions]
    if whole_refusals:
        assert decoded.message is None and len(decoded.rejected) == 1
        (rej,) = whole_refusals
        assert rej.value is None
        if whole is None:
            assert rej.reason == refusal
        else:
            assert "cannot read" in rej.reason, rej.reason
        return
    # Read item by item: what the contract refuses must not pass unrefused.
    if whole is None:
        assert decoded.rejected, f"the decoder accepted whole what the contract refuses ({refusal}): {raw[:300]!r}"
    original = read_as_written(raw, struct)  # readable: the decoder split its items
    kept = decoded.message
    kept_items: dict[str, tuple[Any, ...]] = {}
    if kept is not None:
        assert kept.reading_hour.tzinfo is UTC
        # The good items are, together, a message the contract accepts, with the same values.
        alone = contract.model_validate_json(decode_encode(kept))
        _same_envelope(kept, alone, columns)
        n = len(kept.resource_id)
        assert len(set(kept.resource_id)) == n
        kept_items = {kept.resource_id[i]: _resolved(kept, i, charges) for i in range(n)}
        ids_alone: list[str] = alone.resource_id  # type: ignore[attr-defined]
        assert kept_items == {ids_alone[i]: _resolved(alone, i, charges) for i in range(n)}
        if whole is not None:
            _same_envelope(kept, whole, columns)
            first: dict[str, tuple[Any, ...]] = {}
            for i, rid in enumerate(whole.resource_id):  # type: ignore[attr-defined]
                first.setdefault(rid, _resolved(whole, i, charges))
            assert all(first[rid] == facts for rid, facts in kept_items.items())
    # Every item is kept, refused with its own bytes, or a repeat of a kept item with the same facts.
    refused: set[int] = set()
    for rej in decoded.rejected:
        assert rej.reason.startswith(f"item {rej.positions[0]}: ")
        refused.update(rej.positions)
        assert rej.value is not None
        split = read_as_written(rej.value, struct)
        for column in columns:
            assert getattr(split, column) == [getattr(original, column)[i] for i in rej.positions], column
        for name in msgspec.structs.asdict(split):
            if name not in columns:
                assert getattr(split, name) == getattr(kept or original, name) or name in _TIME_FIELDS, name
    original_ids: list[str] = original.resource_id  # type: ignore[attr-defined]
    for i, rid in enumerate(original_ids):
        if i not in refused:
            assert rid in kept_items, (i, rid)


def decode_encode(m: Measurements | Charges) -> bytes:
    return encode_measurements(m) if isinstance(m, Measurements) else encode_charges(m)


@pytest.mark.parametrize("model", list(BATCH_MODELS))
def test_batch_mirror_has_the_contracts_fields_and_defaults(model: type[BaseModel]) -> None:
    struct = BATCH_MODELS[model][0]
    info = msgspec.structs.fields(struct)
    assert {f.name for f in info} == set(model.model_fields)
    for f in info:
        field = model.model_fields[f.name]
        assert f.required == field.is_required(), f.name
        if not f.required:
            assert f.default == field.default, f.name


@pytest.mark.parametrize("model", list(BATCH_MODELS))
def test_what_producers_write_decodes_whole_with_the_contracts_values(model: type[BaseModel]) -> None:
    raw = model.model_validate(BATCH_DOCS[model]()).model_dump_json().encode()
    decoded = BATCH_MODELS[model][1](raw)
    assert decoded.rejected == []
    _batch_differential(model, raw)
    whole = model.model_validate_json(raw)
    columns = CHARGE_COLUMNS if model is ChargesComputed else ITEM_COLUMNS
    _same_envelope(decoded.message, whole, columns)
    n = len(whole.resource_id)  # type: ignore[attr-defined]
    charges = model is ChargesComputed
    ours = [_resolved(decoded.message, i, charges) for i in range(n)]
    assert ours == [_resolved(whole, i, charges) for i in range(n)]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_batch_decoder_never_reads_measurements_differently(data: st.DataObject) -> None:
    _batch_differential(MeasurementsTaken, data.draw(batch_documents(MeasurementsTaken)))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_batch_decoder_never_reads_charges_differently(data: st.DataObject) -> None:
    _batch_differential(ChargesComputed, data.draw(batch_documents(ChargesComputed)))


@pytest.mark.parametrize("model", list(BATCH_MODELS))
def test_every_batch_field_and_item_at_its_edges(model: type[BaseModel]) -> None:
    """Each envelope field, and each item column's second entry, set to each edge value, one at a time."""
    columns = CHARGE_COLUMNS if model is ChargesComputed else ITEM_COLUMNS
    for name in BATCH_DOCS[model]():
        for value in EDGES:
            doc = BATCH_DOCS[model]()
            if name in columns:
                doc[name][1] = value
            else:
                doc[name] = value
            _batch_differential(model, json.dumps(doc, ensure_ascii=False).encode())


@pytest.mark.parametrize(
    ("model", "name"),
    [(MeasurementsTaken, "reading_hour"), (MeasurementsTaken, "taken_at"), (ChargesComputed, "reading_hour"),
     (ChargesComputed, "priced_at")],
)
def test_batch_times_with_more_than_six_fractional_digits_are_read_like_the_contract(
    model: type[BaseModel], name: str
) -> None:
    """pydantic truncates what msgspec would round: 05:59:59.9999999 is not the hour 06:00."""
    doc = BATCH_DOCS[model]()
    for text in ("2026-03-08T05:59:59.9999999Z", "2026-03-08T05:59:59.999999\\u0039Z"):
        raw = json.dumps(doc | {name: "TIME"}).encode().replace(b"TIME", text.encode())
        _batch_differential(model, raw)


def test_batch_generated_documents_exercise_every_answer() -> None:
    """Guard for the property tests above: the canonical batches decode whole, and these mutations are
    refused whole, item by item, or kept once (so the property compares every branch)."""
    assert decode_measurements(orjson.dumps(measurements_doc())).rejected == []
    assert decode_charges(orjson.dumps(charges_doc())).rejected == []
    whole = decode_measurements(orjson.dumps(measurements_doc() | {"shard": SHARDS}))
    assert whole.message is None and whole.rejected[0].positions == ()
    doc = measurements_doc()
    doc["value"][1] = -1
    assert [r.positions for r in decode_measurements(orjson.dumps(doc)).rejected] == [(1,)]
    doc = measurements_doc()
    doc["resource_id"][0] = STRANGER
    assert [r.positions for r in decode_measurements(orjson.dumps(doc)).rejected] == [(0,)]
    MeasurementsTaken.model_validate_json(orjson.dumps(doc))  # valid to the contract: the decoder is stricter
