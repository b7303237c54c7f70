"""The batched topics, ``usage.readings.v2`` and ``usage.charges.v3`` (and ``.v2``, still read): shards,
message ids, encoding, and the fast decoding every consumer uses, with checks item by item.

A batch message carries many measurements (charges) of one reading hour and meter for one shard of
resources, as columns (``shared.contracts.MeasurementsTaken``, ``ChargesComputed``). The pydantic models
there are the contract: they generate the AsyncAPI document and word the reason of a message refused as
a whole. Validating a few hundred items with them would cost what the batch saves, so consumers decode
with the msgspec mirrors below (the columns typed loosely) and then check every item with a handful of
whole-column operations (min, max, set); only when one of those fails are the items looked at one by
one, and the bad ones are split off with their reason (``Decoded.rejected``) while the good ones go on.
A message the mirror cannot read at all is refused as a whole with the contract's reason, and so is a
charges batch naming a price whose model and bands are invalid (``shared.price_models``). An item of a
graduated or volume price must have amount 0/1 (the ledger prices the month's total of the price).

Items are also refused when they belong to another shard than the message says, and when a resource
appears twice in one message with other facts (the same facts twice count once).

Identity and content. A measurement's identity is (reading hour, meter, resource id); its *content* is
what it says about usage and who used it: its batch's unit, the org id, the space id, the kind, the value
and ``estimated`` (``content``). Names (of the resource, org and space) are labels that Cloud Foundry lets
users change, and the envelope (message id, reading id, ``taken_at`` / ``priced_at``, positions in the
tables) is not content either. A measurement must always say the same: a consumer that holds a copy
treats one with the same content as a redelivery (its stored copy, labels included, stays), and refuses
one with other content to its topic's DLQ with a reason starting ``conflict:`` (``CONFLICT``) that names
the stored copy, never replacing what it stored. For a charge, the content of a revision is its
measurement's content plus its price and exact amount; each consumer of ``usage.charges.v3`` compares,
for an item of the revision it holds, the part of that it keeps (see the services' READMEs).
"""

from __future__ import annotations

import hashlib
import re
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

import msgspec
from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.contracts import MAX_ITEMS, SHARDS, ChargesComputed, ChargesComputedV2, MeasurementsTaken, UtcDatetime
from shared.ids import NAMESPACE
from shared.price_models import InvalidPriceModelError, from_document

__all__ = [
    "CONFLICT",
    "MAX_INT",
    "MAX_ITEMS",
    "SHARDS",
    "Band",
    "BatchRejected",
    "Charges",
    "Correction",
    "Decoded",
    "Item",
    "Measurements",
    "Price",
    "Ref",
    "ShardKey",
    "charges_id",
    "content",
    "content_differences",
    "decode_charges",
    "decode_measurements",
    "describe_error",
    "encode_charges",
    "encode_measurements",
    "hour_text",
    "measurement_batches",
    "measurements_id",
    "read_as_written",
    "shard_key",
    "shard_of",
    "subset",
]

MAX_INT = 2**62
_MAX_REVISION = 2**31 - 1


class ShardKey(NamedTuple):
    """What consumers keep their state by: the measurements of one reading hour and meter in one shard."""

    reading_hour: datetime
    meter: str
    shard: int


def shard_of(resource_id: str) -> int:
    """The shard of a resource: crc32 of its id (UTF-8) modulo ``SHARDS`` (the contract's rule)."""
    return zlib.crc32(resource_id.encode()) % SHARDS


def shard_key(shard: int) -> bytes:
    """The Kafka key of a batch of ``shard``: ``shared.kafka``'s partitioner sends it to partition
    ``shard mod partitions``, so the shards spread evenly and one shard keeps one partition (its
    revisions stay in order)."""
    return b"shard-%d" % shard


# Resources come back every hour: their shards are remembered (a dict lookup instead of a crc32 each).
_SHARD_CACHE: dict[str, int] = {}
_shard_cache_get = _SHARD_CACHE.get


def _learn_shards(resource_ids: Sequence[str]) -> None:
    if len(_SHARD_CACHE) > 2_000_000:
        _SHARD_CACHE.clear()
    for r in resource_ids:
        if r not in _SHARD_CACHE:
            _SHARD_CACHE[r] = shard_of(r)


def hour_text(hour: datetime) -> str:
    """The reading hour as ids spell it."""
    return hour.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00Z")


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def measurements_id(hour: datetime, meter: str, shard: int, resource_ids: Sequence[str]) -> uuid.UUID:
    """The id of a readings batch: uuid5 of its hour, meter, shard and the resource ids it carries, so
    re-publishing the same measurements yields the same message."""
    return uuid.uuid5(NAMESPACE, f"measurements|{hour_text(hour)}|{meter}|{shard}|{_digest(resource_ids)}")


def charges_id(
    hour: datetime, meter: str, shard: int, resource_ids: Sequence[str], revisions: Sequence[int]
) -> uuid.UUID:
    """The id of a charges batch: uuid5 of its hour, meter, shard and the (resource, revision) pairs (the
    resources' digest and the one revision, when they all have the same)."""
    first = revisions[0] if revisions else 1
    if revisions.count(first) == len(revisions):
        content = f"{_digest(resource_ids)}#{first}"
    else:
        content = _digest([f"{r}#{v}" for r, v in zip(resource_ids, revisions, strict=True)])
    return uuid.uuid5(NAMESPACE, f"charges|{hour_text(hour)}|{meter}|{shard}|{content}")


# ------------------------------------------------------------------------------------------ mirrors

_Time = Annotated[datetime, msgspec.Meta(tz=True)]
_Str64 = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Str32 = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
_Shard = Annotated[int, msgspec.Meta(ge=0, lt=SHARDS)]
_Table = msgspec.Meta(max_length=MAX_ITEMS)  # the contract's limit on the orgs, spaces, kinds and prices


class Ref(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """An org or a space of a batch's dictionary."""

    id: Annotated[str, msgspec.Meta(max_length=64)]
    name: Annotated[str, msgspec.Meta(max_length=512)] = ""


class Band(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    """A band of a graduated or volume price (shared.price_models.Band's JSON form)."""

    up_to: Annotated[str, msgspec.Meta(max_length=64)] | None
    microcredits_per_unit: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
    flat_fee: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)] = 0


class Price(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    """A price of a charges batch's dictionary."""

    id: uuid.UUID
    microcredits_per_unit: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
    unit: Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]
    model: Literal["flat", "graduated", "volume"] = "flat"
    bands: Annotated[list[Band], msgspec.Meta(max_length=32)] | None = None


# Item columns: what can be checked per element without looking at the rest of the batch is checked by
# msgspec while it parses (a batch that passes needs no Python pass over those columns); positions in the
# batch's tables are checked against their lengths by ``_columns_ok``.
_Rid = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Name = Annotated[str, msgspec.Meta(max_length=512)]
_Position = Annotated[int, msgspec.Meta(ge=0)]
_Value = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
_Revision = Annotated[int, msgspec.Meta(ge=1, le=_MAX_REVISION)]
_PricePosition = Annotated[int, msgspec.Meta(ge=-1)]
_Denominator = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]


class Measurements(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Mirror of ``shared.contracts.MeasurementsTaken``; item columns checked by ``decode_measurements``
    (a batch with a bad item is read again loosely and its bad items refused one by one)."""

    id: uuid.UUID
    reading_id: uuid.UUID
    reading_hour: _Time
    meter: _Str64
    unit: _Str32
    shard: _Shard
    taken_at: _Time
    orgs: Annotated[list[Ref], _Table]
    spaces: Annotated[list[Ref], _Table]
    kinds: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]], _Table]
    resource_id: list[_Rid]
    resource_name: list[_Name]
    org: list[_Position]
    space: list[_Position]
    kind: list[_Position]
    value: list[_Value]
    estimated: list[bool]
    schema_name: Literal["usage.measurements"] = "usage.measurements"
    schema_version: Literal[2] = 2


class Correction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """The re-rating a batch of revisions comes from (``POST /admin/rerate``): its job id and reason."""

    id: uuid.UUID
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class Charges(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Mirror of ``shared.contracts.ChargesComputed``; item columns checked by ``decode_charges``."""

    id: uuid.UUID
    reading_hour: _Time
    meter: _Str64
    unit: _Str32
    shard: _Shard
    priced_at: _Time
    orgs: Annotated[list[Ref], _Table]
    spaces: Annotated[list[Ref], _Table]
    kinds: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]], _Table]
    prices: Annotated[list[Price], _Table]
    resource_id: list[_Rid]
    resource_name: list[_Name]
    org: list[_Position]
    space: list[_Position]
    kind: list[_Position]
    value: list[_Value]
    estimated: list[bool]
    revision: list[_Revision]
    price: list[_PricePosition]
    amount_numerator: list[_Value]
    amount_denominator: list[_Denominator]
    schema_name: Literal["usage.charges"] = "usage.charges"
    # 3 (usage.charges.v3) is what is written; 2 is read too: a v2 body (a batch stored before v3, published
    # again byte for byte on a redelivery, or one drained from usage.charges.v2) is a v3 batch of flat prices.
    schema_version: Literal[2, 3] = 3
    # A re-rating's revisions carry its job and reason (ordinary batches: null). Last, so v2 bodies decode.
    correction: Correction | None = None


def _loose(struct: type[msgspec.Struct], name: str) -> type[msgspec.Struct]:
    """``struct`` with its item columns of plain ints and strings: what a batch with a bad item is read as,
    so that its bad items can be found and refused one by one."""
    plain = {"resource_id": list[str], "resource_name": list[str], "estimated": list[bool]}
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(struct):
        kind = plain.get(f.name, list[int]) if f.name in _CHARGE_COLUMNS else f.type
        fields.append((f.name, kind) if f.default is msgspec.NODEFAULT else (f.name, kind, f.default))
    return msgspec.defstruct(name, fields, frozen=True, forbid_unknown_fields=True, gc=False)


_MEASUREMENT_COLUMNS = ("resource_id", "resource_name", "org", "space", "kind", "value", "estimated")
_CHARGE_COLUMNS = (*_MEASUREMENT_COLUMNS, "revision", "price", "amount_numerator", "amount_denominator")
# The facts of an item: two items of one resource in one message must agree on them (its positions in the
# tables, so the org's and the space's names too: stricter than ``content``, which compares across messages).
_MEASUREMENT_FACTS = ("org", "space", "kind", "value", "estimated")
_CHARGE_FACTS = (*_MEASUREMENT_FACTS, "revision", "price", "amount_numerator", "amount_denominator")
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    Measurements: msgspec.json.Decoder(Measurements),
    Charges: msgspec.json.Decoder(Charges),
}
_LOOSE_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    Measurements: msgspec.json.Decoder(_loose(Measurements, "LooseMeasurements")),
    Charges: msgspec.json.Decoder(_loose(Charges, "LooseCharges")),
}

B = TypeVar("B", Measurements, Charges)


@dataclass(frozen=True, slots=True)
class BatchRejected:
    """Items of a batch the consumer refuses: ``positions`` in the message (empty: the whole message),
    why, and the bytes the dead-letter topic gets (the refused items as a batch of their own)."""

    reason: str
    positions: tuple[int, ...] = ()
    value: bytes | None = None


@dataclass(slots=True)
class Decoded(Generic[B]):
    """A decoded batch: its good items (``message``, None when nothing is left) and what was refused."""

    message: B | None
    rejected: list[BatchRejected] = field(default_factory=list)


CONFLICT = "conflict:"
"""The start of the DLQ reason of an item refused because its measurement (or charge revision) is stored
with other content; the completeness report counts these apart from other dead letters."""


def content(msg: Measurements | Charges, i: int) -> tuple[object, ...]:
    """What item ``i`` of ``msg`` says about its measurement, comparable across messages: (unit, org id,
    space id, kind, value, estimated)."""
    return (
        msg.unit,
        msg.orgs[msg.org[i]].id,
        msg.spaces[msg.space[i]].id,
        msg.kinds[msg.kind[i]],
        msg.value[i],
        msg.estimated[i],
    )


_CONTENT_NAMES = ("unit", "org", "space", "kind", "value", "estimated")


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def content_differences(new: tuple[object, ...], stored: tuple[object, ...]) -> str:
    """The facts that differ between two ``content`` tuples, as "value 7 (stored: 5), ..."."""
    return ", ".join(
        f"{name} {_shown(a)} (stored: {_shown(b)})"
        for name, a, b in zip(_CONTENT_NAMES, new, stored, strict=True)
        if a != b
    )


def describe_error(exc: ValidationError) -> str:
    """A short, readable reason from a pydantic validation error."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "message"
        parts.append(f"{loc}: {err.get('msg')}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


_TIME_NAMES = ("reading_hour", "taken_at", "priced_at")
# pydantic truncates fractional seconds beyond the sixth digit, msgspec rounds them (05:59:59.9999999 would
# be the hour 06:00): such times, and any a JSON escape may hide (\u0039 is a 9), are read as the contract
# reads them.
_LONG_FRACTION = re.compile(rb"\.\d{7}")
_LONG_FRACTION_TEXT = re.compile(r"\.\d{7}")
_contract_time = TypeAdapter(UtcDatetime)


class _TimeTexts(msgspec.Struct):
    reading_hour: str | None = None
    taken_at: str | None = None
    priced_at: str | None = None


def _utc(struct: B, raw: bytes) -> B | None:
    moved: dict[str, datetime] = {}
    texts = None
    # (a lone backslash is found at memchr's speed; most batches have none, so the escape search is skipped)
    if _LONG_FRACTION.search(raw) is not None or (b"\\" in raw and b"\\u" in raw):
        texts = msgspec.json.decode(raw, type=_TimeTexts)
    for name in _TIME_NAMES:
        moment = getattr(struct, name, None)
        if moment is None:
            continue
        text = getattr(texts, name, None)
        if text is not None and _LONG_FRACTION_TEXT.search(text) is not None:
            try:
                moved[name] = _contract_time.validate_json(msgspec.json.encode(text))
            except ValidationError:
                return None
        elif moment.tzinfo is not UTC:
            try:
                moved[name] = moment.astimezone(UTC)
            except OverflowError:
                return None
    return msgspec.structs.replace(struct, **moved) if moved else struct


def _whole_reason(raw: bytes, model: type[BaseModel]) -> str:
    if model is ChargesComputed and re.search(rb'"schema_version"\s*:\s*2\b', raw):
        model = ChargesComputedV2  # a v2 body, read as the contract it claims
    try:
        model.model_validate_json(raw)
    except ValidationError as exc:
        return f"invalid {model.__name__}: {describe_error(exc)}"
    return f"{model.__name__} that this consumer cannot read (a time out of range, or a number beyond 64 bits)"


def _in_range(column: list[int], low: int, high: int) -> bool:
    return not column or (min(column) >= low and max(column) <= high)


def _item_reason(msg: Measurements | Charges, i: int, charges: bool) -> str | None:
    """Why item ``i`` is refused, or None (the slow path: only after a whole-column check failed)."""
    rid, name = msg.resource_id[i], msg.resource_name[i]
    if not isinstance(rid, str) or not 1 <= len(rid) <= 64:
        return f"item {i}: resource_id must be 1 to 64 characters"
    if not isinstance(name, str) or len(name) > 512:
        return f"item {i}: resource_name must be at most 512 characters"
    for column, table in (("org", msg.orgs), ("space", msg.spaces), ("kind", msg.kinds)):
        if not 0 <= getattr(msg, column)[i] < len(table):
            return f"item {i}: {column} {getattr(msg, column)[i]} is not a position in {column}s"
    if not 0 <= msg.value[i] <= MAX_INT:
        return f"item {i}: value must be an integer from 0 to 2**62"
    if shard_of(rid) != msg.shard:
        return f"item {i}: resource {rid} belongs to shard {shard_of(rid)}, not {msg.shard}"
    if charges:
        assert isinstance(msg, Charges)
        if not 1 <= msg.revision[i] <= _MAX_REVISION:
            return f"item {i}: revision must be an integer from 1 to 2**31-1"
        if not -1 <= msg.price[i] < len(msg.prices):
            return f"item {i}: price {msg.price[i]} is not -1 or a position in prices"
        if not 0 <= msg.amount_numerator[i] <= MAX_INT:
            return f"item {i}: amount_numerator must be an integer from 0 to 2**62"
        if not 1 <= msg.amount_denominator[i] <= MAX_INT:
            return f"item {i}: amount_denominator must be an integer from 1 to 2**62"
        if msg.price[i] < 0 and msg.amount_numerator[i] != 0:
            return f"item {i}: unpriced with a non-zero amount"
        if msg.price[i] >= 0 and msg.prices[msg.price[i]].model != "flat" and (
            msg.amount_numerator[i] != 0 or msg.amount_denominator[i] != 1
        ):
            return (
                f"item {i}: an item of a {msg.prices[msg.price[i]].model} price must have amount 0/1 "
                f"(the ledger prices it), not {msg.amount_numerator[i]}/{msg.amount_denominator[i]}"
            )
    return None


def _price_reason(prices: Sequence[Price]) -> str | None:
    """Why the prices of a charges batch make the whole message unreadable (None: they are valid): a flat
    price with bands, or a graduated or volume price whose bands ``shared.price_models`` refuses. Per price,
    and a batch names few."""
    for p, price in enumerate(prices):
        if price.model == "flat":
            if price.bands is not None:
                return f"prices[{p}]: a flat price has no bands"
            continue
        if price.bands is None:
            return f"prices[{p}]: a {price.model} price needs bands"
        try:
            from_document({"model": price.model, "bands": [msgspec.structs.asdict(b) for b in price.bands]})
        except InvalidPriceModelError as exc:
            return f"prices[{p}]: {exc}"
    return None


def _not_flat(prices: Sequence[Price]) -> set[int]:
    """The positions of the graduated and volume prices of a batch."""
    return {p for p, price in enumerate(prices) if price.model != "flat"}


def _below(column: list[int], size: int) -> bool:
    return not column or max(column) < size


def _columns_ok(msg: Measurements | Charges, charges: bool, parsed_strictly: bool = False) -> bool:
    """The whole-column checks: true when every item is valid (the fast path). ``parsed_strictly``: msgspec
    already checked each element on its own (lengths, ranges), so only the positions in the tables and the
    rules across columns are left."""
    ids = msg.resource_id
    if not parsed_strictly:
        lengths = list(map(len, ids))
        if ids and (min(lengths) < 1 or max(lengths) > 64):
            return False
        if msg.resource_name and max(map(len, msg.resource_name)) > 512:
            return False
        if not (
            _in_range(msg.org, 0, len(msg.orgs) - 1)
            and _in_range(msg.space, 0, len(msg.spaces) - 1)
            and _in_range(msg.kind, 0, len(msg.kinds) - 1)
            and _in_range(msg.value, 0, MAX_INT)
        ):
            return False
    elif not (
        _below(msg.org, len(msg.orgs)) and _below(msg.space, len(msg.spaces)) and _below(msg.kind, len(msg.kinds))
    ):
        return False
    if set(map(_shard_cache_get, ids)) != {msg.shard}:
        if None not in set(map(_shard_cache_get, ids)):
            return False
        _learn_shards(ids)
        if set(map(_shard_cache_get, ids)) != {msg.shard}:
            return False
    if charges:
        assert isinstance(msg, Charges)
        if not parsed_strictly:
            if not (
                _in_range(msg.revision, 1, _MAX_REVISION)
                and _in_range(msg.price, -1, len(msg.prices) - 1)
                and _in_range(msg.amount_numerator, 0, MAX_INT)
                and _in_range(msg.amount_denominator, 1, MAX_INT)
            ):
                return False
        elif not _below(msg.price, len(msg.prices)):
            return False
        if -1 in msg.price and any(p < 0 and n for p, n in zip(msg.price, msg.amount_numerator, strict=True)):
            return False
        not_flat = _not_flat(msg.prices)
        # An item of a graduated or volume price has amount 0/1: the prices of the items whose numerator is not
        # 0 or whose denominator is not 1 (found in C: compress over map) must all be flat.
        if not_flat and not (
            not_flat.isdisjoint(compress(msg.price, map(bool, msg.amount_numerator)))
            and not_flat.isdisjoint(compress(msg.price, map((1).__ne__, msg.amount_denominator)))
        ):
            return False
    return True


def read_as_written(raw: bytes, struct: type[B]) -> B:
    """A batch as written, its items unchecked: for tools and tests that look at what a DLQ holds (a
    refused item does not pass ``struct``'s own decoder). Raises msgspec's errors on anything else."""
    return _LOOSE_DECODERS[struct].decode(raw)  # type: ignore[no-any-return]  # attribute-compatible with struct


def subset(msg: B, positions: Sequence[int]) -> B:
    """The batch ``msg`` with only the items at ``positions`` (tables kept whole)."""
    columns = _CHARGE_COLUMNS if isinstance(msg, Charges) else _MEASUREMENT_COLUMNS
    changes = {name: [getattr(msg, name)[i] for i in positions] for name in columns}
    return msgspec.structs.replace(msg, **changes)


def _decode(raw: bytes, struct: type[B], model: type[BaseModel], encode: Callable[[B], bytes]) -> Decoded[B]:
    charges = struct is Charges
    strictly = True
    try:
        msg = _DECODERS[struct].decode(raw)
    except msgspec.ValidationError:
        # An element out of its bounds (or a whole-message mistake): read loosely, then item by item.
        strictly = False
        try:
            loose = _LOOSE_DECODERS[struct].decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return Decoded(None, [BatchRejected(_whole_reason(raw, model))])
        msg = struct(**msgspec.structs.asdict(loose))
    except msgspec.DecodeError:
        return Decoded(None, [BatchRejected(_whole_reason(raw, model))])
    utc = _utc(msg, raw)
    if utc is None:
        return Decoded(None, [BatchRejected(_whole_reason(raw, model))])
    msg = utc
    if charges:
        assert isinstance(msg, Charges)
        why = _price_reason(msg.prices)
        if why is not None:
            return Decoded(None, [BatchRejected(f"invalid {model.__name__}: {why}")])
    columns = _CHARGE_COLUMNS if charges else _MEASUREMENT_COLUMNS
    n = len(msg.resource_id)
    if n > MAX_ITEMS or any(len(getattr(msg, c)) != n for c in columns):
        return Decoded(None, [BatchRejected(_whole_reason(raw, model))])
    unique = len(set(msg.resource_id)) == n
    if _columns_ok(msg, charges, strictly) and unique:
        return Decoded(msg)
    # The slow path: find the bad items and the repeated resources.
    facts = _CHARGE_FACTS if charges else _MEASUREMENT_FACTS
    keep: list[int] = []
    bad: dict[str, list[int]] = {}
    first: dict[str, int] = {}
    for i in range(n):
        why = _item_reason(msg, i, charges)
        if why is None:
            rid = msg.resource_id[i]
            j = first.get(rid)
            if j is None:
                first[rid] = i
                keep.append(i)
                continue
            if all(getattr(msg, f)[i] == getattr(msg, f)[j] for f in facts):
                continue  # the same measurement twice: it counts once
            why = f"item {i}: resource {rid} appears again with other facts than item {j}"
        bad.setdefault(why, []).append(i)
    rejected = [BatchRejected(why, tuple(pos), encode(subset(msg, pos))) for why, pos in bad.items()]
    return Decoded(subset(msg, keep) if keep else None, rejected)


def decode_measurements(raw: bytes) -> Decoded[Measurements]:
    """A ``usage.readings.v2`` message, its good items and its refused ones."""
    return _decode(raw, Measurements, MeasurementsTaken, encode_measurements)


def decode_charges(raw: bytes) -> Decoded[Charges]:
    """A ``usage.charges.v3`` message (or a ``usage.charges.v2`` one: a batch of flat prices), its good items
    and its refused ones."""
    return _decode(raw, Charges, ChargesComputed, encode_charges)


# ------------------------------------------------------------------------------------------ encoding


_encoder = msgspec.json.Encoder()


def encode_measurements(m: Measurements) -> bytes:
    """The JSON of a readings batch (msgspec writes the struct's fields in their declared order, times as
    ``...Z``, so the same batch always gives the same bytes)."""
    return _encoder.encode(m)


_NO_CORRECTION = b',"correction":null}'


def encode_charges(c: Charges) -> bytes:
    """The JSON of a charges batch. ``correction`` is written only when set (a re-rating's revisions): an
    ordinary batch's bytes are those it had before the field existed, so a v2 batch (stored by the pricer,
    or drained from usage.charges.v2 and split to a DLQ) is written back as the v2 contract reads it."""
    raw = _encoder.encode(c)
    if c.correction is None:  # the last field, so msgspec wrote it last
        assert raw.endswith(_NO_CORRECTION)
        raw = raw[: -len(_NO_CORRECTION)] + b"}"
    return raw


class Item(NamedTuple):
    """One measurement as a producer has it, before it is dealt to its shard's batch."""

    resource_id: str
    resource_name: str
    org_id: str
    org_name: str
    space_id: str
    space_name: str
    kind: str
    value: int
    estimated: bool = False


def measurement_batches(
    reading_hour: datetime,
    meter: str,
    unit: str,
    items: Sequence[Item],
    *,
    reading_id: uuid.UUID,
    taken_at: datetime,
    max_items: int = MAX_ITEMS,
) -> list[Measurements]:
    """``items`` of one hour and meter as batches: one per shard (several parts when a shard holds more
    than ``max_items``), items in resource-id order, tables in order of first use. The same items always
    make the same batches, byte for byte."""
    by_shard: dict[int, list[Item]] = {}
    for it in items:
        by_shard.setdefault(shard_of(it.resource_id), []).append(it)
    out: list[Measurements] = []
    for shard in sorted(by_shard):
        ordered = sorted(by_shard[shard], key=lambda it: it.resource_id)
        for start in range(0, len(ordered), max_items):
            part = ordered[start : start + max_items]
            orgs: dict[Ref, int] = {}
            spaces: dict[Ref, int] = {}
            kinds: dict[str, int] = {}
            rids = [it.resource_id for it in part]
            org = [orgs.setdefault(Ref(it.org_id, it.org_name), len(orgs)) for it in part]
            space = [spaces.setdefault(Ref(it.space_id, it.space_name), len(spaces)) for it in part]
            kind = [kinds.setdefault(it.kind, len(kinds)) for it in part]
            out.append(
                Measurements(
                    id=measurements_id(reading_hour, meter, shard, rids),
                    reading_id=reading_id,
                    reading_hour=reading_hour,
                    meter=meter,
                    unit=unit,
                    shard=shard,
                    taken_at=taken_at,
                    orgs=list(orgs),
                    spaces=list(spaces),
                    kinds=list(kinds),
                    resource_id=rids,
                    resource_name=[it.resource_name for it in part],
                    org=org,
                    space=space,
                    kind=kind,
                    value=[it.value for it in part],
                    estimated=[it.estimated for it in part],
                )
            )
    return out
