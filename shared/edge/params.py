"""Strict values at the edge: the types of times, ids, months, counts and words that a person gives in a
path, a query or a body, and the parsing of path and query parameters into a declared model.

Rules (README, "Bounds and limits"):
- Whole-string matches (``re.fullmatch``: no ``$`` that matches before a trailing newline), ASCII digits
  only (``٢٠٢٦`` is not 2026).
- ``Time``: RFC 3339 with its zone (``2026-10-01T04:00:00Z`` or ``…-04:00``), at most microseconds,
  answered as UTC, inside the window [``EARLIEST``, now + ``HORIZON``] (2000-01-01 to ten years from now):
  times before, after, or that have no UTC value (year 1 with a positive offset) are refused, never turned
  into an OverflowError or a database infinity.
- ``Month``: ``YYYY-MM`` inside the same window. ``Uuid``: the 8-4-4-4-12 hexadecimal form only.
- Counts (``limit``): ASCII digits, within the route's bounds.
- A query or path model refuses unknown and repeated parameters; the first mistake is answered 422
  ``invalid-parameter`` (``invalid-cursor`` for ``cursor``) naming the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, TypeVar
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, WithJsonSchema

from shared.edge.problems import INVALID_CURSOR, INVALID_PARAMETER, ProblemError

__all__ = [
    "EARLIEST",
    "HORIZON",
    "Count",
    "CursorText",
    "Month",
    "Params",
    "Time",
    "Uuid",
    "count",
    "describe",
    "latest",
    "parameter",
    "parse_month",
    "parse_params",
    "parse_time",
    "parse_uuid",
]

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
HORIZON = timedelta(days=3653)  # ten years

# RFC 3339 date-time: the zone is mandatory; only ASCII digits.
_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.([0-9]{1,9}))?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
_DIGITS = re.compile(r"[0-9]{1,12}")


def latest() -> datetime:
    """The latest time the edge accepts: now + HORIZON."""
    return datetime.now(UTC) + HORIZON


def parse_time(value: object) -> datetime:
    """An RFC 3339 time with its zone inside the window, as UTC; ValueError (saying why) otherwise."""
    if isinstance(value, datetime):
        moment = value
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError("must carry a time zone")
    elif isinstance(value, str):
        m = _TIME.fullmatch(value)
        if m is None:
            raise ValueError("must be an RFC 3339 time with a zone, e.g. 2026-10-01T04:00:00Z (encode + as %2B)")
        frac = m.group(1)
        text = value.upper()
        if frac and len(frac) > 6:  # Python keeps microseconds: refuse finer times rather than round them
            if set(frac[6:]) != {"0"}:
                raise ValueError("times are accepted to the microsecond")
            text = text.replace("." + frac, "." + frac[:6])
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("is not a valid time") from None
    else:
        raise ValueError("must be a string holding an RFC 3339 time")  # noqa: TRY004 - pydantic wants ValueError
    try:
        moment = moment.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"must be between {EARLIEST:%Y-%m-%d} and ten years from now") from None
    if not EARLIEST <= moment <= latest():
        raise ValueError(f"must be between {EARLIEST:%Y-%m-%d} and ten years from now")
    return moment


def parse_uuid(value: object) -> UUID:
    if isinstance(value, UUID):
        return value
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise ValueError("must be a UUID (8-4-4-4-12 hexadecimal digits)")
    return UUID(value)


def parse_month(value: object) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        month = value.replace(day=1)
    else:
        m = _MONTH.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise ValueError("must be a month YYYY-MM")
        month = date(int(m.group(1)), int(m.group(2)), 1)
    last = latest()
    if not (EARLIEST.year, EARLIEST.month) <= (month.year, month.month) <= (last.year, last.month):
        raise ValueError(f"must be a month between {EARLIEST:%Y-%m} and ten years from now")
    return month


def _count(value: object) -> object:
    """ASCII digits (a query parameter) or an int (Python); anything else is left to fail as an int."""
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError("must be a whole number written with the digits 0-9")
        return int(value)
    return value


Time = Annotated[
    datetime, BeforeValidator(parse_time), WithJsonSchema({"type": "string", "format": "date-time"})
]
"""A time a person or a client gives: RFC 3339 with a zone, inside the window, as UTC."""

Uuid = Annotated[UUID, BeforeValidator(parse_uuid), WithJsonSchema({"type": "string", "format": "uuid"})]

Month = Annotated[
    date,
    BeforeValidator(parse_month),
    PlainSerializer(lambda month: f"{month:%Y-%m}", return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$", "description": "YYYY-MM"}),
]

CursorText = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,2048}$")]
"""An opaque cursor as a parameter (``shared.edge.cursor`` reads what it holds)."""


def count(default: int, maximum: int, description: str = "Page size.") -> Any:
    """A ``limit``-like field: 1..``maximum`` written in ASCII digits, ``default`` when absent."""
    return Field(default=default, ge=1, le=maximum, description=description)


Count = Annotated[int, BeforeValidator(_count)]


class Params(BaseModel):
    """Base of the path and query parameter models: unknown names refused, aliases for Python keywords
    (``from``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


P = TypeVar("P", bound=Params)
T = TypeVar("T")


def describe(exc: ValidationError, limit: int = 5) -> str:
    """A short, readable reason: ``field: message; …`` (inputs are never echoed)."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def _names(model: type[Params]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _invalid(name: str, detail: str) -> ProblemError:
    kind = INVALID_CURSOR if name == "cursor" else INVALID_PARAMETER
    return ProblemError(kind, f"{name}: {detail}", parameter=name)


def parameter(name: str, parse: Callable[[object], T], text: str) -> T:
    """One parameter parsed by ``parse`` (``parse_uuid``, ``parse_month``, ``parse_time``); 422 problem
    naming it otherwise."""
    try:
        return parse(text)
    except ValueError as exc:
        raise _invalid(name, str(exc)) from None


def parse_params(model: type[P], items: Iterable[tuple[str, str]]) -> P:
    """``items`` (query or path parameters) as ``model``; 422 problem on an unknown, repeated, missing or
    invalid one."""
    known = _names(model)
    values: dict[str, str] = {}
    for key, value in items:
        if key not in known:
            raise _invalid(key, f"unknown parameter; this route takes {', '.join(known) or 'none'}")
        if key in values:
            raise _invalid(key, "given more than once")
        values[key] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "query"
        if err.get("type") == "missing":
            raise _invalid(name, "is required") from None
        raise _invalid(name, str(err.get("msg", "")).removeprefix("Value error, ")) from None
