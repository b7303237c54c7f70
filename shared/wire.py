"""Fast decoding of the two busiest topics, ``usage.readings.v1`` and ``usage.charges.v1``.

The pydantic models in ``shared.contracts`` stay the contract: they define the topics, generate the
AsyncAPI document and word every dead-letter reason. Validating a message with them costs about
10 µs, which is most of what a consumer spends per message. So each busy contract has a mirror here as
a msgspec Struct (same field names, types, limits and defaults), decoded in about 1 µs, and consumers
take a decoded message through ``decode``:

- the fast decoder accepts ⇒ the Struct, whose values equal what the pydantic model would hold;
- anything else (invalid, or merely written in a form only pydantic reads, such as a time with more
  than six fractional digits or an offset-less minute) goes through the pydantic model, which either
  rejects it with its reason or accepts it, and then the Struct is built from the model's values.

So the fast path may be stricter than the contract but never laxer, and never reads a value
differently: tests/unit/test_wire.py checks the mirrors field by field against the models and, over
generated documents, that whatever the fast path accepts the model accepts with equal values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import msgspec
from pydantic import BaseModel

from shared.contracts import ChargeComputed, MeasurementTaken

__all__ = ["MIRRORS", "Charge", "Measurement", "decoder_for"]

_MAX = 2**62

_Str64 = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Str32 = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
_Opt64 = Annotated[str, msgspec.Meta(max_length=64)]
_Kind = Annotated[str, msgspec.Meta(max_length=128)]
_Name = Annotated[str, msgspec.Meta(max_length=512)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX)]
_Time = Annotated[datetime, msgspec.Meta(tz=True)]  # aware only; converted to UTC after decoding


class Measurement(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Mirror of ``shared.contracts.MeasurementTaken``."""

    id: UUID
    reading_id: UUID
    reading_hour: _Time
    meter: _Str64
    resource_id: _Str64
    value: _Count
    unit: _Str32
    taken_at: _Time
    schema_name: Literal["usage.measurement"] = "usage.measurement"
    schema_version: Literal[1] = 1
    resource_kind: _Kind = ""
    resource_name: _Name = ""
    org_id: _Opt64 = ""
    org_name: _Name = ""
    space_id: _Opt64 = ""
    space_name: _Name = ""
    estimated: bool = False


class Charge(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Mirror of ``shared.contracts.ChargeComputed``."""

    id: UUID
    measurement_id: UUID
    revision: Annotated[int, msgspec.Meta(ge=1)]
    reading_hour: _Time
    meter: _Str64
    resource_id: _Str64
    value: _Count
    unit: _Str32
    status: Literal["priced", "unpriced"]
    amount_numerator: _Count
    display_amount: str
    priced_at: _Time
    schema_name: Literal["usage.charge"] = "usage.charge"
    schema_version: Literal[1] = 1
    resource_kind: _Kind = ""
    resource_name: _Name = ""
    org_id: _Opt64 = ""
    org_name: _Name = ""
    space_id: _Opt64 = ""
    space_name: _Name = ""
    estimated: bool = False
    price_id: UUID | None = None
    amount_denominator: Annotated[int, msgspec.Meta(ge=1, le=_MAX)] = 1


# The contract model each mirror stands for, and the mirror's time fields.
MIRRORS: dict[type[BaseModel], type[msgspec.Struct]] = {MeasurementTaken: Measurement, ChargeComputed: Charge}
_TIMES: dict[type[msgspec.Struct], tuple[str, ...]] = {
    Measurement: ("reading_hour", "taken_at"),
    Charge: ("reading_hour", "priced_at"),
}

# pydantic truncates fractional seconds beyond the sixth digit, msgspec rounds them: such a message takes
# the pydantic path, and so does one with a JSON escape, which may hide such a digit (\u0039 is a 9). (The
# pattern may also match inside a text field; that only costs the slow path.)
_LONG_FRACTION = re.compile(rb"\.\d{7}")

S = TypeVar("S", bound=msgspec.Struct)


def _fast(struct: type[S]) -> Callable[[bytes], S | None]:
    decoder = msgspec.json.Decoder(struct)
    times = _TIMES[struct]
    long_fraction = _LONG_FRACTION.search

    def decode(raw: bytes) -> S | None:
        if long_fraction(raw) is not None or b"\\u" in raw:
            return None
        try:
            msg = decoder.decode(raw)
        except msgspec.DecodeError:
            return None
        moved: dict[str, datetime] = {}
        for name in times:
            moment: datetime = getattr(msg, name)
            if moment.tzinfo is not UTC:
                try:
                    moved[name] = moment.astimezone(UTC)
                except OverflowError:  # before the first UTC datetime: the contract refuses it
                    return None
        return msgspec.structs.replace(msg, **moved) if moved else msg

    return decode


def decoder_for(model: type[BaseModel]) -> Callable[[bytes], Any]:
    """``raw -> message`` for a consumer of ``model``: the mirror when ``model`` has one, else the model.
    Raises pydantic.ValidationError (with the contract's reason) for an invalid message."""
    struct = MIRRORS.get(model)
    if struct is None:
        return model.model_validate_json
    fast = _fast(struct)
    validate = model.model_validate_json

    def decode(raw: bytes) -> Any:
        msg = fast(raw)
        if msg is None:
            msg = struct(**dict(validate(raw)))
        return msg

    return decode
