"""Opaque keyset-pagination cursors, the same in every service: base64url JSON of the last item's sort key,
bound to the query that produced it (a digest of its route and filters), so that a cursor cannot be replayed
against another query. Reading one checks every position against its declared type (times inside the
edge's window, UUIDs in their one form, text without NUL); anything else is 422 ``invalid-cursor``."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

from shared.edge.params import parse_time, parse_uuid
from shared.edge.problems import INVALID_CURSOR, ProblemError

__all__ = ["Cursor", "Position"]

Position = str | int | UUID | datetime
_TEXT = re.compile(r"[A-Za-z0-9_-]{1,2048}")
MAX_TEXT = 512


def _bad() -> ProblemError:
    return ProblemError(
        INVALID_CURSOR, "cursor: not a cursor of this query; start again without it", parameter="cursor"
    )


def _plain(value: Position) -> str | int:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, UUID):
        return str(value)
    return value


def _typed(value: Any, kind: type) -> Position:
    if kind is int:
        if type(value) is not int:
            raise ValueError("not an int")
        return value
    if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value:
        raise ValueError("not a text position")
    if kind is datetime:
        return parse_time(value)
    if kind is UUID:
        return parse_uuid(value)
    return value


class Cursor:
    """``scope_of(route, *filters)`` names a query; ``encode`` and ``decode`` turn a position (a tuple of
    str, int, UUID and datetime) into text and back."""

    @staticmethod
    def scope_of(*parts: object) -> str:
        return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]

    @staticmethod
    def encode(scope: str, position: Sequence[Position]) -> str:
        raw = orjson.dumps({"s": scope, "p": [_plain(v) for v in position]})
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @staticmethod
    def decode(text: str | None, scope: str, shape: Sequence[type]) -> list[Any] | None:
        """The position ``text`` holds, each value of the type ``shape`` names; None without a cursor."""
        if text is None:
            return None
        if not _TEXT.fullmatch(text):
            raise _bad()
        try:
            data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, ValueError):
            raise _bad() from None
        if not isinstance(data, dict) or data.get("s") != scope or not isinstance(data.get("p"), list):
            raise _bad()
        if len(data["p"]) != len(shape):
            raise _bad()
        try:
            return [_typed(v, kind) for v, kind in zip(data["p"], shape, strict=True)]
        except ValueError:
            raise _bad() from None
