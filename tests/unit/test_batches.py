"""shared/batches.py: what every producer and consumer of usage.readings.v2 and usage.charges.v2 relies on.

Shards (crc32 of the resource id, checked against an independent CRC-32), message ids, batches built the
same way byte for byte whatever the order of the items, split into parts above ``MAX_ITEMS``, and the
decoding with item checks: a bad item is split off with its reason and its own bytes (a batch of just that
item), the good ones go on; a resource twice with the same facts counts once, with other facts it is
refused; a message the mirror cannot read is refused whole with the contract's reason.
"""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.batches import (
    MAX_ITEMS,
    SHARDS,
    Charges,
    Item,
    Measurements,
    Price,
    Ref,
    charges_id,
    decode_charges,
    decode_measurements,
    encode_charges,
    encode_measurements,
    hour_text,
    measurement_batches,
    measurements_id,
    read_as_written,
    shard_key,
    shard_of,
    subset,
)
from shared.contracts import ChargesComputed, MeasurementsTaken

HOUR = datetime(2026, 3, 8, 6, tzinfo=UTC)
READING = uuid.UUID(int=42)
TAKEN = datetime(2026, 3, 8, 7, 1, 30, 123456, tzinfo=UTC)


def crc32_reference(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) bit by bit: the rule the contract names."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def ids_in_shard(shard: int, n: int, prefix: str = "res") -> list[str]:
    """``n`` resource ids of ``shard`` (by the reference CRC, not the code under test)."""
    out: list[str] = []
    for i in itertools.count():
        rid = f"{prefix}-{i}"
        if crc32_reference(rid.encode()) % SHARDS == shard:
            out.append(rid)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def item(rid: str, value: int = 512, org: str = "org-1", space: str = "space-1", kind: str = "", **kw: Any) -> Item:
    return Item(rid, f"name of {rid}", org, f"Org {org}", space, f"Space {space}", kind, value, **kw)


def batch(rids: list[str], values: list[int] | None = None, kinds: list[str] | None = None) -> Measurements:
    """One batch of the given resources, which must all be of one shard."""
    values = values or [512 * (i + 1) for i in range(len(rids))]
    kinds = kinds or [""] * len(rids)
    items = [item(r, v, kind=k) for r, v, k in zip(rids, values, kinds, strict=True)]
    (only,) = measurement_batches(HOUR, "cfapps", "MB", items, reading_id=READING, taken_at=TAKEN)
    return only


def doc(m: Measurements | Charges) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(encode_measurements(m) if isinstance(m, Measurements) else encode_charges(m))
    return out


def raw(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()  # the standard library writes integers of any size, as a producer could


def item_facts(m: Measurements | Charges, i: int) -> tuple[Any, ...]:
    """Item ``i`` with its table positions resolved."""
    facts: tuple[Any, ...] = (
        m.resource_id[i],
        m.resource_name[i],
        m.orgs[m.org[i]],
        m.spaces[m.space[i]],
        m.kinds[m.kind[i]],
        m.value[i],
        m.estimated[i],
    )
    if isinstance(m, Charges):
        price = None if m.price[i] < 0 else m.prices[m.price[i]]
        facts += (m.revision[i], price, m.amount_numerator[i], m.amount_denominator[i])
    return facts


def envelope(m: Measurements | Charges) -> dict[str, Any]:
    skip = {"resource_id", "resource_name", "org", "space", "kind", "value", "estimated", "revision", "price",
            "amount_numerator", "amount_denominator"}
    return {k: v for k, v in msgspec.structs.asdict(m).items() if k not in skip}


# ------------------------------------------------------------------------------------------ shards and ids


@given(st.text(min_size=1, max_size=64))
def test_shard_is_crc32_of_the_utf8_resource_id_modulo_24(resource_id: str) -> None:
    assert shard_of(resource_id) == crc32_reference(resource_id.encode("utf-8")) % 24


def test_shard_known_vectors() -> None:
    # The CRC-32 check value of "123456789" is 0xCBF43926 (every CRC-32 catalogue lists it).
    assert shard_of("123456789") == 0xCBF43926 % 24 == 14
    assert SHARDS == 24
    assert {shard_of(f"app-{i}") for i in range(2000)} == set(range(24))  # every shard is used


def test_shard_key_names_the_shard() -> None:
    assert [shard_key(n) for n in (0, 7, 23)] == [b"shard-0", b"shard-7", b"shard-23"]


def test_hour_text_is_the_utc_hour_whatever_the_zone() -> None:
    eastern = HOUR.astimezone(timezone(timedelta(hours=-5)))
    assert hour_text(eastern) == hour_text(HOUR) == "2026-03-08T06:00:00Z"


def test_message_ids_are_deterministic_and_tell_batches_apart() -> None:
    rids = ["a", "b", "c"]
    first = measurements_id(HOUR, "cfapps", 3, rids)
    assert first.version == 5
    assert measurements_id(HOUR.astimezone(timezone(timedelta(hours=2))), "cfapps", 3, list(rids)) == first
    others = [
        measurements_id(HOUR + timedelta(hours=1), "cfapps", 3, rids),
        measurements_id(HOUR, "cfservices", 3, rids),
        measurements_id(HOUR, "cfapps", 4, rids),
        measurements_id(HOUR, "cfapps", 3, ["a", "b"]),
        measurements_id(HOUR, "cfapps", 3, ["a", "b", "d"]),
    ]
    assert len({first, *others}) == 6
    # A charges batch: the same resources with other revisions is another message.
    one = charges_id(HOUR, "cfapps", 3, rids, [1, 1, 1])
    assert one == charges_id(HOUR, "cfapps", 3, list(rids), [1, 1, 1])
    assert len({one, charges_id(HOUR, "cfapps", 3, rids, [2, 2, 2]), charges_id(HOUR, "cfapps", 3, rids, [1, 2, 1]),
                charges_id(HOUR, "cfapps", 3, rids, [1, 1, 2]), first}) == 5


# ------------------------------------------------------------------------------------------ building batches

items_strategy = st.lists(
    st.builds(
        item,
        st.text(alphabet="abcdef0123456789-", min_size=1, max_size=12),
        st.integers(0, 2**40),
        st.sampled_from(["org-1", "org-2", ""]),
        st.sampled_from(["space-1", "space-2"]),
        st.sampled_from(["", "plan-a", "plan-b"]),
        estimated=st.booleans(),
    ),
    max_size=60,
    unique_by=lambda it: it.resource_id,
)


@settings(max_examples=150)
@given(items_strategy, st.randoms(use_true_random=False))
def test_measurement_batches_deal_every_item_to_its_shard_in_order_and_any_order_gives_the_same_bytes(
    items: list[Item], rnd: Any
) -> None:
    batches = measurement_batches(HOUR, "cfapps", "MB", items, reading_id=READING, taken_at=TAKEN)
    shuffled = list(items)
    rnd.shuffle(shuffled)
    again = measurement_batches(HOUR, "cfapps", "MB", shuffled, reading_id=READING, taken_at=TAKEN)
    assert [encode_measurements(b) for b in again] == [encode_measurements(b) for b in batches]

    assert [b.shard for b in batches] == sorted({crc32_reference(it.resource_id.encode()) % 24 for it in items})
    by_id = {it.resource_id: it for it in items}
    seen: list[str] = []
    for b in batches:
        raw_b = encode_measurements(b)
        model = MeasurementsTaken.model_validate_json(raw_b)  # a valid contract message
        assert model.id == b.id == measurements_id(HOUR, "cfapps", b.shard, b.resource_id)
        assert (model.reading_id, model.reading_hour, model.taken_at, model.meter, model.unit) == (
            READING, HOUR, TAKEN, "cfapps", "MB")
        assert b.resource_id == sorted(b.resource_id)
        assert all(crc32_reference(r.encode()) % 24 == b.shard for r in b.resource_id)
        for i, rid in enumerate(b.resource_id):
            it = by_id[rid]
            assert item_facts(b, i) == (rid, it.resource_name, Ref(it.org_id, it.org_name),
                                        Ref(it.space_id, it.space_name), it.kind, it.value, it.estimated)
        # Tables hold what the items use, in order of first use.
        assert b.orgs == list(dict.fromkeys(b.orgs[k] for k in b.org))
        assert b.kinds == list(dict.fromkeys(b.kinds[k] for k in b.kind))
        assert decode_measurements(raw_b).message == b and decode_measurements(raw_b).rejected == []
        seen.extend(b.resource_id)
    assert sorted(seen) == sorted(by_id)


def test_a_shard_above_max_items_is_split_into_parts_each_a_batch_of_its_own() -> None:
    rids = ids_in_shard(5, 23)
    items = [item(r, i, org=f"org-{i % 4}") for i, r in enumerate(reversed(rids))]
    parts = measurement_batches(HOUR, "cfapps", "MB", items, reading_id=READING, taken_at=TAKEN, max_items=10)
    assert [len(p.resource_id) for p in parts] == [10, 10, 3]
    assert [r for p in parts for r in p.resource_id] == sorted(rids)
    assert len({p.id for p in parts}) == 3
    for p in parts:
        assert p.shard == 5
        assert p.id == measurements_id(HOUR, "cfapps", 5, p.resource_id)
        assert sorted(p.orgs, key=lambda r: r.id) == sorted({p.orgs[k] for k in p.org}, key=lambda r: r.id)
        MeasurementsTaken.model_validate_json(encode_measurements(p))


def test_the_default_part_size_is_the_contracts_max_items() -> None:
    rids = ids_in_shard(11, MAX_ITEMS + 1)
    parts = measurement_batches(HOUR, "cfapps", "MB", [item(r) for r in rids], reading_id=READING, taken_at=TAKEN)
    assert [len(p.resource_id) for p in parts] == [MAX_ITEMS, 1]
    for p in parts:
        assert decode_measurements(encode_measurements(p)).rejected == []


def test_subset_keeps_the_envelope_and_tables_and_picks_the_items() -> None:
    b = batch(ids_in_shard(2, 4), kinds=["", "plan-a", "", "plan-b"])
    part = subset(b, [3, 1])
    assert envelope(part) == envelope(b)
    assert [item_facts(part, i) for i in range(2)] == [item_facts(b, 3), item_facts(b, 1)]


# ------------------------------------------------------------------------------------------ decoding


def test_offsets_become_utc() -> None:
    d = doc(batch(ids_in_shard(0, 1))) | {"reading_hour": "2026-03-08T01:00:00-05:00",
                                         "taken_at": "2026-03-08T09:01:30.123456+02:00"}
    m = decode_measurements(raw(d)).message
    assert m is not None
    assert m.reading_hour == HOUR and m.reading_hour.tzinfo is UTC
    assert m.taken_at == TAKEN and m.taken_at.tzinfo is UTC


def assert_split(raw_in: bytes, decoded: Any, positions: tuple[int, ...], struct: type) -> None:
    """The refused items' value is a batch of just those items: the same envelope and tables."""
    (rej,) = decoded.rejected
    assert rej.positions == positions
    assert rej.value is not None
    original: Any = read_as_written(raw_in, struct)
    alone: Any = read_as_written(rej.value, struct)
    assert envelope(alone) == envelope(original)
    for column in ("resource_id", "resource_name", "org", "space", "kind", "value", "estimated"):
        assert getattr(alone, column) == [getattr(original, column)[i] for i in positions], column


ITEM_DEFECTS: list[tuple[str, str, Any, str]] = [
    # (case, column, bad value for item 1, words of the reason)
    ("negative value", "value", -1, "value must be an integer from 0 to 2**62"),
    ("value beyond 2**62", "value", 2**62 + 1, "value must be an integer from 0 to 2**62"),
    ("empty resource id", "resource_id", "", "resource_id must be 1 to 64 characters"),
    ("long resource id", "resource_id", "x" * 65, "resource_id must be 1 to 64 characters"),
    ("long name", "resource_name", "é" * 513, "resource_name must be at most 512 characters"),
    ("org out of range", "org", 5, "org 5 is not a position in orgs"),
    ("negative space", "space", -1, "space -1 is not a position in spaces"),
    ("kind out of range", "kind", 1, "kind 1 is not a position in kinds"),
]


@pytest.mark.parametrize(("column", "bad", "words"), [c[1:] for c in ITEM_DEFECTS], ids=[c[0] for c in ITEM_DEFECTS])
def test_a_bad_item_is_split_off_with_its_reason_and_the_others_go_on(column: str, bad: Any, words: str) -> None:
    b = batch(ids_in_shard(3, 3))
    d = doc(b)
    d[column][1] = bad
    got = decode_measurements(raw(d))
    assert got.message is not None
    assert got.message.resource_id == [b.resource_id[0], b.resource_id[2]]
    assert [item_facts(got.message, i) for i in range(2)] == [item_facts(b, 0), item_facts(b, 2)]
    assert envelope(got.message) == envelope(b)
    (rej,) = got.rejected
    assert rej.reason.startswith("item 1: ") and words in rej.reason
    assert_split(raw(d), got, (1,), Measurements)


def test_an_item_of_another_shard_is_refused() -> None:
    b = batch(ids_in_shard(3, 2))
    stranger = ids_in_shard(4, 1)[0]
    d = doc(b)
    d["resource_id"][0] = stranger
    got = decode_measurements(raw(d))
    assert got.message is not None and got.message.resource_id == [b.resource_id[1]]
    (rej,) = got.rejected
    assert rej.reason == f"item 0: resource {stranger} belongs to shard 4, not 3"
    assert_split(raw(d), got, (0,), Measurements)
    # The item alone is a valid contract message: only the consumers' shard check refuses it.
    MeasurementsTaken.model_validate_json(rej.value)  # type: ignore[arg-type]


def test_each_bad_item_is_refused_on_its_own_and_all_bad_leaves_no_message() -> None:
    b = batch(ids_in_shard(6, 4))
    d = doc(b)
    d["value"][0] = d["value"][2] = -5
    got = decode_measurements(raw(d))
    assert got.message is not None and got.message.resource_id == [b.resource_id[1], b.resource_id[3]]
    assert [(r.positions, r.reason[:7]) for r in got.rejected] == [((0,), "item 0:"), ((2,), "item 2:")]
    for r in got.rejected:
        alone = read_as_written(r.value, Measurements)  # type: ignore[arg-type]
        assert alone.resource_id == [b.resource_id[r.positions[0]]] and alone.value == [-5]
    d["value"] = [-1] * 4
    nothing = decode_measurements(raw(d))
    assert nothing.message is None and [r.positions for r in nothing.rejected] == [(0,), (1,), (2,), (3,)]


def test_a_resource_twice_counts_once_with_the_same_facts_and_is_refused_with_other_facts() -> None:
    b = batch(ids_in_shard(8, 2))
    d = doc(b)
    for column in ("resource_id", "resource_name", "org", "space", "kind", "value", "estimated"):
        d[column].append(d[column][0])
    same = decode_measurements(raw(d))
    assert same.rejected == [] and same.message is not None
    assert same.message.resource_id == b.resource_id
    assert [item_facts(same.message, i) for i in range(2)] == [item_facts(b, 0), item_facts(b, 1)]

    d["value"][2] += 1
    other = decode_measurements(raw(d))
    assert other.message is not None and other.message.resource_id == b.resource_id
    (rej,) = other.rejected
    assert rej.reason == f"item 2: resource {b.resource_id[0]} appears again with other facts than item 0"
    assert_split(raw(d), other, (2,), Measurements)


def _whole(d: dict[str, Any]) -> bytes:
    return raw(d)


WHOLE_DEFECTS: list[tuple[str, Any]] = [
    ("not json", lambda d: b"{not json"),
    ("a list", lambda d: b"[]"),
    ("columns of different lengths", lambda d: _whole(d | {"value": d["value"][:-1]})),
    ("unknown field", lambda d: _whole(d | {"surprise": 1})),
    ("missing field", lambda d: _whole({k: v for k, v in d.items() if k != "taken_at"})),
    ("schema version 1", lambda d: _whole(d | {"schema_version": 1})),
    ("shard 24", lambda d: _whole(d | {"shard": 24})),
    ("value as a string", lambda d: _whole(d | {"value": ["512"] * len(d["value"])})),
    ("naive time", lambda d: _whole(d | {"reading_hour": "2026-03-08T06:00:00"})),
    ("more than MAX_ITEMS items", lambda d: _whole(d | {c: d[c] * (MAX_ITEMS + 1) for c in (
        "resource_id", "resource_name", "org", "space", "kind", "value", "estimated")})),
    ("more than MAX_ITEMS kinds", lambda d: _whole(d | {"kinds": [""] * (MAX_ITEMS + 1)})),
    ("more than MAX_ITEMS orgs", lambda d: _whole(d | {"orgs": d["orgs"] * (MAX_ITEMS + 1)})),
]


@pytest.mark.parametrize("make", [c[1] for c in WHOLE_DEFECTS], ids=[c[0] for c in WHOLE_DEFECTS])
def test_a_message_the_contract_refuses_as_a_whole_is_refused_whole_with_its_reason(make: Any) -> None:
    bad = make(doc(batch(ids_in_shard(1, 1))))
    got = decode_measurements(bad)
    assert got.message is None
    (rej,) = got.rejected
    assert rej.positions == () and rej.value is None
    with pytest.raises(ValueError):
        MeasurementsTaken.model_validate_json(bad)
    assert rej.reason.startswith("invalid MeasurementsTaken: ")


def test_a_time_the_contract_reads_but_the_mirror_cannot_is_refused_whole_and_says_so() -> None:
    # A time without seconds: pydantic reads it, the mirror (RFC 3339) does not. Refused, never misread.
    d = doc(batch(ids_in_shard(1, 1))) | {"taken_at": "2026-03-08T07:01Z"}
    MeasurementsTaken.model_validate_json(raw(d))
    got = decode_measurements(raw(d))
    assert got.message is None and got.rejected[0].positions == ()
    assert "cannot read" in got.rejected[0].reason


def charges_doc(n: int = 3) -> dict[str, Any]:
    m = batch(ids_in_shard(9, n))
    c = Charges(
        id=charges_id(HOUR, "cfapps", 9, m.resource_id, [1] * n), reading_hour=HOUR, meter="cfapps", unit="MB",
        shard=9, priced_at=TAKEN, orgs=m.orgs, spaces=m.spaces, kinds=m.kinds,
        prices=[Price(uuid.UUID(int=7), 1_000_000, 730 * 1024)], resource_id=m.resource_id,
        resource_name=m.resource_name, org=m.org, space=m.space, kind=m.kind, value=m.value, estimated=m.estimated,
        revision=[1] * n, price=[0] * n, amount_numerator=[v * 1_000_000 for v in m.value],
        amount_denominator=[730 * 1024] * n,
    )
    out = doc(c)
    ChargesComputed.model_validate(out)
    return out


CHARGE_DEFECTS: list[tuple[str, str, Any, str]] = [
    ("revision 0", "revision", 0, "revision must be an integer from 1 to 2**31-1"),
    ("revision beyond 2**31-1", "revision", 2**31, "revision must be an integer from 1 to 2**31-1"),
    ("price out of range", "price", 1, "price 1 is not -1 or a position in prices"),
    ("price -2", "price", -2, "price -2 is not -1 or a position in prices"),
    ("numerator beyond 2**62", "amount_numerator", 2**62 + 1, "amount_numerator must be an integer from 0 to 2**62"),
    ("denominator 0", "amount_denominator", 0, "amount_denominator must be an integer from 1 to 2**62"),
]


@pytest.mark.parametrize(
    ("column", "bad", "words"), [c[1:] for c in CHARGE_DEFECTS], ids=[c[0] for c in CHARGE_DEFECTS]
)
def test_a_bad_charge_item_is_split_off_with_its_reason(column: str, bad: Any, words: str) -> None:
    d = charges_doc()
    good = decode_charges(raw(d))
    assert good.rejected == [] and good.message is not None
    assert encode_charges(good.message) == encode_charges(read_as_written(raw(d), Charges))
    d[column][2] = bad
    got = decode_charges(raw(d))
    assert got.message is not None and got.message.resource_id == good.message.resource_id[:2]
    assert [item_facts(got.message, i) for i in range(2)] == [item_facts(good.message, i) for i in range(2)]
    (rej,) = got.rejected
    assert rej.positions == (2,) and rej.reason == f"item 2: {words}" and rej.value is not None
    alone = read_as_written(rej.value, Charges)
    assert envelope(alone) == envelope(good.message) and alone.resource_id == [good.message.resource_id[2]]
    assert getattr(alone, column) == [bad]


def test_an_unpriced_charge_with_an_amount_is_refused() -> None:
    d = charges_doc()
    d["price"][0] = -1
    got = decode_charges(raw(d))
    assert [(r.positions, r.reason) for r in got.rejected] == [((0,), "item 0: unpriced with a non-zero amount")]
    d["amount_numerator"][0] = 0
    assert decode_charges(raw(d)).rejected == []


def test_encoding_is_deterministic_and_round_trips() -> None:
    b = batch(ids_in_shard(4, 5), kinds=["", "a", "b", "a", ""])
    once = encode_measurements(b)
    again = encode_measurements(read_as_written(once, Measurements))
    assert once == again
    assert b'"reading_hour":"2026-03-08T06:00:00Z"' in once
    d = charges_doc()
    c = decode_charges(raw(d)).message
    assert c is not None
    again_c = decode_charges(encode_charges(c)).message
    assert again_c is not None and encode_charges(again_c) == encode_charges(c)
