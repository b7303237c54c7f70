"""Strict parsing of path and query parameters: anything unexpected is a 4xx problem, never a guess.

Times must be ISO 8601 with a zone (``2026-10-01T04:00:00Z`` or ``...-04:00``); months ``YYYY-MM``;
ids UUIDs; enums exactly one of their values; ``limit`` 1..500; cursors opaque tokens this api issued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any
from uuid import UUID

import orjson

from shared.clock import as_utc
from shared.http import ProblemError

__all__ = [
    "MAX_LIMIT",
    "DEFAULT_LIMIT",
    "invalid",
    "parse_uuid",
    "parse_month",
    "parse_time",
    "parse_enum",
    "parse_limit",
    "only_known",
    "Cursor",
]

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# RFC 3339 date-time: the zone is mandatory.
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")

def invalid(name: str, detail: str) -> ProblemError:
    return ProblemError(422, "Invalid parameter", f"{name}: {detail}", parameter=name)


def parse_uuid(name: str, text: str) -> UUID:
    if not _UUID.match(text):
        raise invalid(name, "must be a UUID")
    return UUID(text)


def parse_month(name: str, text: str) -> date:
    m = _MONTH.match(text)
    if not m or not 1970 <= int(m.group(1)) <= 9998:
        raise invalid(name, "must be a month YYYY-MM")
    return date(int(m.group(1)), int(m.group(2)), 1)


def parse_time(name: str, text: str) -> datetime:
    """An RFC 3339 time with its zone, as UTC."""
    if not _TIME.match(text):
        raise invalid(name, "must be an ISO 8601 time with a zone, e.g. 2026-10-01T04:00:00Z (encode + as %2B)")
    normal = text.upper().replace(" ", "T")
    frac = re.search(r"\.(\d+)", normal)
    if frac and len(frac.group(1)) > 6:  # Python keeps microseconds: refuse finer times rather than round
        if set(frac.group(1)[6:]) != {"0"}:
            raise invalid(name, "times are accepted to the microsecond")
        normal = normal.replace(frac.group(0), "." + frac.group(1)[:6])
    try:
        moment = as_utc(datetime.fromisoformat(normal))
    except (ValueError, OverflowError):
        raise invalid(name, "is not a valid time") from None
    if not 1970 <= moment.year <= 9998:
        raise invalid(name, "must be between 1970 and 9998")
    return moment


def parse_enum(name: str, text: str, allowed: tuple[str, ...]) -> str:
    if text not in allowed:
        raise invalid(name, f"must be one of {', '.join(allowed)}")
    return text


def parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.isdigit() or len(text) > 4 or not 1 <= int(text) <= MAX_LIMIT:
        raise invalid("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


def only_known(query: Mapping[str, str], known: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, refusing unknown and repeated ones."""
    params: dict[str, str] = {}
    items = query.multi_items() if hasattr(query, "multi_items") else list(query.items())
    for key, value in items:
        if key not in known:
            raise invalid(key, f"unknown parameter; this route takes {', '.join(known) or 'none'}")
        if key in params:
            raise invalid(key, "given more than once")
        params[key] = value
    return params


class Cursor:
    """Opaque keyset-pagination cursors: base64url JSON of the last row's sort key, bound to the query
    that produced it (a digest of its parameters), so a cursor cannot be replayed against another query."""

    @staticmethod
    def scope_of(*parts: object) -> str:
        return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]

    @staticmethod
    def encode(scope: str, position: list[Any]) -> str:
        raw = orjson.dumps({"s": scope, "p": position})
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @staticmethod
    def decode(text: str | None, scope: str, shape: tuple[type, ...]) -> list[Any] | None:
        if text is None:
            return None
        bad = ProblemError(400, "Invalid cursor", "cursor: not a cursor of this query; start again without it", parameter="cursor")
        if len(text) > 2048 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            raise bad
        try:
            data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, ValueError):
            raise bad from None
        if not isinstance(data, dict) or data.get("s") != scope or not isinstance(data.get("p"), list):
            raise bad
        position = data["p"]
        if len(position) != len(shape) or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(position, shape, strict=True)):
            raise bad
        if any(isinstance(v, str) and (len(v) > 512 or "\x00" in v) for v in position):
            raise bad  # PostgreSQL text cannot hold NUL; nothing we issue is that long
        return position
