"""JSON responses (orjson) and the CF v3 error shape."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from simulator.faults import cf_error_body

__all__ = ["cf_error", "json_response"]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def cf_error(status: int, code: int, title: str, detail: str) -> Response:
    """``{"errors": [{"code", "title", "detail"}]}`` as the Cloud Controller answers errors."""
    return Response(cf_error_body(code, title, detail), status_code=status, media_type="application/json")
