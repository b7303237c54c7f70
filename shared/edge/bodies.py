"""Request bodies, strictly: ``application/json`` only (415 otherwise), one JSON document without duplicate
keys (``{"a": 1, "a": 2}`` is refused, never "last wins") and without NUL characters in any string
(PostgreSQL text cannot hold them), then the route's model in pydantic's strict mode: ``"5"`` or ``5.0``
is not the integer 5, a time is a string, an unknown field is refused. Any of these is 422
``invalid-body``. The size limit is ``shared.http.BodySizeLimit`` (413 ``content-too-large``)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from shared.edge.params import describe
from shared.edge.problems import INVALID_BODY, UNSUPPORTED_MEDIA_TYPE, ProblemError

__all__ = ["is_json", "read_body", "strict_json"]

M = TypeVar("M", bound=BaseModel)


class _Duplicate(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"the key {key[:64]!r} appears more than once in an object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _has_nul(doc: Any) -> bool:
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def strict_json(raw: bytes) -> Any:
    """``raw`` as one JSON document; ValueError on duplicate keys, NUL in text, NaN/Infinity or bad JSON."""
    try:
        doc = json.loads(raw, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise ValueError(str(exc)) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not a JSON document ({type(exc).__name__})") from None
    if _has_nul(doc):
        raise ValueError("text values cannot contain the NUL character (\\u0000)")
    return doc


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, model: type[M], *, required: bool = True) -> M | None:
    """The request body validated by ``model`` (None when it is optional and empty); 415/422 problem on
    anything else."""
    raw = await request.body()
    if not raw and not required:
        return None
    if not is_json(request.headers.get("content-type")):
        raise ProblemError(UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
    try:
        strict_json(raw)
        return model.model_validate_json(raw, strict=True)
    except ValueError as exc:  # ValidationError is a ValueError
        detail = describe(exc) if isinstance(exc, ValidationError) else str(exc)
        raise ProblemError(INVALID_BODY, detail) from None
