"""The ``Idempotency-Key`` of a command, as the edge reads and documents it: one header of 1 to 255 printable
ASCII characters, not beginning or ending with a space (400 ``invalid-idempotency-key`` otherwise), and what
every route declared as a command says about it in its OpenAPI document — the header, the refusals that come
with it (400, 409, 422) and the ``Idempotent-Replayed`` header of an answer given again. What a key does (the
answer stored, a retry answered from it) is ``shared.commands``; the api checks a key here before forwarding
it to its owner."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from starlette.datastructures import Headers

from shared.edge.problems import INVALID_IDEMPOTENCY_KEY, ProblemError

__all__ = ["KEY_HEADER", "KEY_PARAMETER", "KEY_REFUSALS", "REPLAYED_HEADER", "REPLAYED_HEADERS", "idempotency_key"]

KEY_HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
# Not beginning or ending with a space: HTTP trims a field value's outer whitespace (and h11 refuses to send
# it), so such a key could not reach the service that owns the command unchanged.
_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")
_KEY_RULE = "1 to 255 printable ASCII characters, not beginning or ending with a space"


def idempotency_key(headers: Headers) -> str | None:
    """The request's Idempotency-Key, None without one; 400 problem when it is malformed or repeated."""
    values = headers.getlist(KEY_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise ProblemError(INVALID_IDEMPOTENCY_KEY, "send one Idempotency-Key header, not several")
    if not _KEY.fullmatch(values[0]):
        raise ProblemError(INVALID_IDEMPOTENCY_KEY, f"an Idempotency-Key is {_KEY_RULE}")
    return values[0]


KEY_PARAMETER: Mapping[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"},
    "description": f"{_KEY_RULE}. A retry with the same key and the same request (method, path, query and JSON "
    "body) is answered the first answer (status and body, with `Idempotent-Replayed: true`) without running "
    "the command again; keys are per token subject and kept 24 hours.",
}
KEY_REFUSALS: Mapping[int, str] = {
    400: "The Idempotency-Key is malformed or sent twice (invalid-idempotency-key).",
    409: "A request with this Idempotency-Key has not answered yet: it is running, or stopped before it answered "
    "(request-in-progress; Retry-After).",
    422: "This Idempotency-Key was sent before with another request (idempotency-key-reused).",
}
REPLAYED_HEADERS: Mapping[str, Mapping[str, Any]] = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer of an earlier request with the same Idempotency-Key "
        "(absent otherwise).",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
