"""What the services' OpenAPI 3.1 documents share: the problem+json schema, the ops routes every service
serves, request bodies derived from the pydantic models that validate them, and the ``/openapi.json``
route. Each service writes its own paths as data in ``services/<name>/openapi.py``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = [
    "INT",
    "JSON",
    "NULLABLE_TIME",
    "NULLABLE_UUID",
    "PROBLEM",
    "STR",
    "TIME_SCHEMA",
    "UUID_SCHEMA",
    "body_errors",
    "body_of",
    "document",
    "ok",
    "openapi_route",
    "page_of",
    "param",
    "problem",
]

JSON = "application/json"
PROBLEM = "application/problem+json"
STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
UUID_SCHEMA: dict[str, Any] = {"type": "string", "format": "uuid"}
TIME_SCHEMA: dict[str, Any] = {"type": "string", "format": "date-time"}
NULLABLE_TIME: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
NULLABLE_UUID: dict[str, Any] = {"type": ["string", "null"], "format": "uuid"}
MONTH_SCHEMA: dict[str, Any] = {"type": "string", "pattern": r"^\d{4}-(0[1-9]|1[0-2])$"}

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "properties": {"type": STR, "title": STR, "status": INT, "detail": STR},
    "required": ["type", "title", "status"],
}


def problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema, "description": description}


def body_of(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """The request body ``model`` validates, its JSON Schema as pydantic writes it (so the document
    cannot drift from the validation)."""
    schema = model.model_json_schema()
    if "$defs" in schema:
        raise ValueError(f"{model.__name__}: nested models are not supported here")
    return {"required": required, "content": {JSON: {"schema": schema}}}


def body_errors() -> dict[str, Any]:
    """The refusals of every route that reads a JSON body (shared.http.read_json, BodySizeLimit)."""
    return {
        "413": problem("The body is larger than the service's limit (<SVC>_MAX_BODY_BYTES)."),
        "415": problem("The body is not sent as application/json."),
        "422": problem("The body does not validate."),
    }


def page_of(item: dict[str, Any]) -> dict[str, Any]:
    """A cursor page: ``items`` and the ``next_cursor`` to pass back (null on the last page)."""
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": item}, "next_cursor": {"type": ["string", "null"]}},
        "required": ["items", "next_cursor"],
        "additionalProperties": False,
    }


def _ops_paths() -> dict[str, Any]:
    status = {"type": "object", "properties": {"status": STR}, "required": ["status"]}
    ready = {
        "type": "object",
        "properties": {"status": STR, "checks": {"type": "object", "additionalProperties": STR}},
        "required": ["status", "checks"],
    }
    return {
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": ok({"type": "object"}, "OpenAPI 3.1")}}
        },
        "/healthz": {"get": {"summary": "The process answers", "responses": {"200": ok(status)}}},
        "/readyz": {
            "get": {
                "summary": "Every dependency answers (database, Kafka, consumers)",
                "responses": {
                    "200": ok(ready, "Ready"),
                    "503": {"description": "Not ready", "content": {JSON: {"schema": ready}}},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": STR}}}},
            }
        },
    }


def document(title: str, description: str, paths: Mapping[str, Any], schemas: Mapping[str, Any]) -> dict[str, Any]:
    """A service's whole document: its own ``paths`` plus the ops routes; every operation may also
    answer 404/405 (no such route or method) as problem+json, and none needs credentials (internal
    routes listen on the cluster network only)."""
    all_paths = copy.deepcopy({**paths, **_ops_paths()})
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1.0.0", "description": description},
        "servers": [{"url": "/"}],
        "paths": all_paths,
        "components": {"schemas": {"Problem": _PROBLEM_SCHEMA, **schemas}},
    }


def openapi_route(build: Callable[[], dict[str, Any]]) -> Route:
    """``GET /openapi.json`` answering ``build()``'s document (built once, on the first request)."""
    cached: list[bytes] = []

    async def openapi(request: Request) -> Response:
        if not cached:
            cached.append(orjson.dumps(build()))
        return Response(cached[0], media_type=JSON)

    return Route("/openapi.json", openapi, methods=["GET"])
