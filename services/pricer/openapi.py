"""The pricer's OpenAPI 3.1 document (served at ``/openapi.json``): its internal routes, written as data;
request bodies come from the models that validate them (``tests/unit/test_internal_openapi.py`` checks
it names exactly the app's routes)."""

from __future__ import annotations

from typing import Any

from services.pricer.schemas import PriceEndIn, PriceIn
from shared.audit import audit_openapi
from shared.commands import with_commands
from shared.completeness import PricerCompleteness, openapi_path
from shared.openapi import (
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

_PRICE_PROPS: dict[str, Any] = {
    "id": UUID_SCHEMA,
    "meter": STR,
    "resource_kind": STR,
    "unit_of_measure": STR,
    "microcredits_per_unit": {"type": "integer", "minimum": 0},
    "unit": {"type": "integer", "minimum": 1},
    "valid_from": TIME_SCHEMA,
    "valid_until": NULLABLE_TIME,
    "created_at": TIME_SCHEMA,
}

_PRICE = {"type": "object", "properties": _PRICE_PROPS, "required": list(_PRICE_PROPS), "additionalProperties": False}

_PRICE_CREATED = {
    "type": "object",
    "properties": {**_PRICE_PROPS, "repriced_charges": {"type": "integer", "minimum": 0}},
    "required": [*_PRICE_PROPS, "repriced_charges"],
    "additionalProperties": False,
}

PRICE_ID = param("price_id", "path", UUID_SCHEMA, "A price id.")
LIMIT_ERROR = problem("A parameter is invalid (limit, cursor, at).")
BUSY = problem("The price catalog is busy (batches hold its lock); retry.")


def _paths() -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Price"}
    return {
        "/internal/prices": {
            "post": {
                "summary": "Add a price (re-sending an identical one answers it with 200)",
                "requestBody": body_of(PriceIn),
                "responses": {
                    "201": ok({"$ref": "#/components/schemas/PriceCreated"}, "Added; unpriced charges it covers re-priced"),
                    "200": ok({"$ref": "#/components/schemas/PriceCreated"}, "The same price existed"),
                    "409": problem("Another price of the meter and kind overlaps the range."),
                    "503": BUSY,
                    **body_errors(),
                },
            },
            "get": {
                "summary": "Prices, filtered",
                "parameters": [
                    param("meter", "query", STR, "Only this meter."),
                    param("resource_kind", "query", STR, "Only this kind (the empty kind is a kind)."),
                    param("at", "query", TIME_SCHEMA, "Only prices valid at this time."),
                    param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 1000}, "At most this many."),
                ],
                "responses": {
                    "200": ok({"type": "object", "properties": {"items": {"type": "array", "items": ref}}, "required": ["items"],
                               "additionalProperties": False}),
                    "422": LIMIT_ERROR,
                },
            },
        },
        "/internal/prices/{price_id}": {
            "get": {
                "summary": "One price",
                "parameters": [PRICE_ID],
                "responses": {"200": ok(ref), "404": problem("No such price (or not a UUID).")},
            }
        },
        "/internal/prices/{price_id}/end": {
            "post": {
                "summary": "End a price at a time (exclusive)",
                "parameters": [PRICE_ID],
                "requestBody": body_of(PriceEndIn),
                "responses": {
                    "200": ok(ref, "Ended"),
                    "404": problem("No such price (or not a UUID)."),
                    "409": problem("The price has priced charges after that time, or cannot end then."),
                    "503": BUSY,
                    **body_errors(),
                },
            }
        },
        "/internal/charges/unpriced": {
            "get": {
                "summary": "The latest revision of each charge that has no price",
                "parameters": [
                    param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Page size."),
                    param("cursor", "query", STR, "`next_cursor` of the previous page."),
                ],
                "responses": {
                    "200": ok({
                        "type": "object",
                        "properties": {"items": {"type": "array", "items": {"type": "object"}}, "next_cursor": {"type": ["string", "null"]}},
                        "required": ["items", "next_cursor"],
                        "additionalProperties": False,
                    }),
                    "422": LIMIT_ERROR,
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    return document(
        "Pricer (internal)",
        "The price catalog (time-ranged prices, exact fractions) and the charges it computes from "
        "usage.readings.v1. Internal routes: the api forwards /admin/prices and /admin/unpriced here. "
        "Errors are application/problem+json.",
        {**with_commands(_paths()), **openapi_path(PricerCompleteness, "pricer"), **audit_openapi()[0]},
        {"Price": _PRICE, "PriceCreated": _PRICE_CREATED, **audit_openapi()[1]},
    )
