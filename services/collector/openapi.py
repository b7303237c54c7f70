"""The collector's OpenAPI 3.1 document (served at ``/openapi.json``): its internal routes, written as
data; request bodies come from the models that validate them (``tests/unit/test_internal_openapi.py``
checks it names exactly the app's routes)."""

from __future__ import annotations

from typing import Any

from services.collector.schemas import ReadingRequest
from shared.audit import audit_openapi
from shared.commands import with_commands
from shared.completeness import CollectorCompleteness, openapi_path
from shared.openapi import (
    INT,
    NULLABLE_TIME,
    STR,
    TIME_SCHEMA,
    UUID_SCHEMA,
    body_errors,
    body_of,
    document,
    ok,
    param,
    problem,
)

__all__ = ["openapi_document"]

_ERRORS = {"type": "array", "description": "What went wrong while reading (a meter that failed, bad CF input).", "items": {}}

_OUTCOME = {
    "type": "object",
    "properties": {
        "hour": TIME_SCHEMA,
        "status": {"enum": ["taken", "exists"]},
        "kind": {"enum": ["periodic", "manual", "estimated"], "description": "Of the hour's reading (exists: the one it had)."},
        "measurements": {"type": "integer", "minimum": 0},
        "estimated": {"type": "integer", "minimum": 0},
        "errors": _ERRORS,
        "published": {"type": "integer", "minimum": 0},
        "seconds": {"type": "object", "additionalProperties": {"type": "number"}},
        "detail": STR,
    },
    "required": ["hour", "status", "kind", "measurements", "estimated", "errors", "published", "seconds"],
    "additionalProperties": False,
}

_READING = {
    "type": "object",
    "properties": {
        "id": UUID_SCHEMA,
        "hour": TIME_SCHEMA,
        "kind": {"enum": ["periodic", "manual", "estimated"], "description": "estimated: the hours of a gap, filled."},
        "taken_at": TIME_SCHEMA,
        "measurements": INT,
        "estimated": INT,
        "errors": _ERRORS,
        "published_at": NULLABLE_TIME,
    },
    "required": ["id", "hour", "kind", "taken_at", "measurements", "estimated", "errors", "published_at"],
    "additionalProperties": False,
}


def _paths() -> dict[str, Any]:
    bad_time = problem("`from` or `to` is not an ISO-8601 time with a zone.")
    return {
        "/internal/readings": {
            "post": {
                "summary": "Take a reading of an hour now (a no-op if the hour has one)",
                "requestBody": body_of(ReadingRequest),
                "responses": {
                    "201": ok({"$ref": "#/components/schemas/ReadingOutcome"}, "Taken"),
                    "200": ok({"$ref": "#/components/schemas/ReadingOutcome"}, "The hour had a reading; nothing done"),
                    **body_errors(),
                },
            },
            "get": {
                "summary": "Readings whose hour is in [from, to)",
                "parameters": [
                    param("from", "query", TIME_SCHEMA, "From this hour (default: two days ago)."),
                    param("to", "query", TIME_SCHEMA, "Until this hour, exclusive (default: the next hour)."),
                ],
                "responses": {
                    "200": ok({"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Reading"}}},
                               "required": ["items"], "additionalProperties": False}),
                    "400": bad_time,
                },
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    return document(
        "Collector (internal)",
        "Readings of the Cloud Foundry v3 API, stored and published to usage.readings.v1. Internal routes: "
        "the api forwards /admin/readings here. Errors are application/problem+json.",
        {**with_commands(_paths()), **openapi_path(CollectorCompleteness, "collector"), **audit_openapi()[0]},
        {"ReadingOutcome": _OUTCOME, "Reading": _READING, **audit_openapi()[1]},
    )
