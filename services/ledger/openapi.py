"""The ledger's OpenAPI 3.1 document (served at ``/openapi.json``): its internal routes (handlers.py
lists them), written as data; request bodies come from the models that validate them
(``tests/unit/test_internal_openapi.py`` checks it names exactly the app's routes)."""

from __future__ import annotations

from typing import Any

from services.ledger.handlers import DEFAULT_LIMIT, MAX_LIMIT
from services.ledger.schemas import AgreementIn, AssignmentIn, CustomerIn, ReverseIn, TierIn
from shared.audit import audit_openapi
from shared.commands import with_commands
from shared.completeness import LedgerCompleteness, openapi_path
from shared.openapi import (
    INT,
    MONTH_SCHEMA,
    NULLABLE_TIME,
    NULLABLE_UUID,
    STR,
    TIME_SCHEMA,
    UUID_SCHEMA,
    body_errors,
    body_of,
    document,
    ok,
    page_of,
    param,
    problem,
)

__all__ = ["openapi_document"]


def _obj(props: dict[str, Any], required: list[str] | None = None, closed: bool = True) -> dict[str, Any]:
    out = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if closed:
        out["additionalProperties"] = False
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_AGREEMENT = {
    "id": UUID_SCHEMA,
    "customer_id": UUID_SCHEMA,
    "starts_at": TIME_SCHEMA,
    "ends_at": TIME_SCHEMA,
    "credits": INT,
    "remaining": INT,
    "created_at": TIME_SCHEMA,
    "expired_at": NULLABLE_TIME,
    "expiry_transaction_id": NULLABLE_UUID,
}
_ASSIGNMENT = {"org_id": STR, "customer_id": UUID_SCHEMA, "starts_at": TIME_SCHEMA, "created_at": TIME_SCHEMA}

SCHEMAS: dict[str, Any] = {
    "Tier": _obj({"name": STR, "credits_per_period": INT, "created_at": TIME_SCHEMA}),
    "Customer": _obj({"id": UUID_SCHEMA, "name": STR, "tier": STR, "created_at": TIME_SCHEMA}),
    "Assignment": _obj(_ASSIGNMENT),
    "AssignmentCreated": _obj({**_ASSIGNMENT, "held_charges_posted": {"type": "integer", "minimum": 0}}),
    "Agreement": _obj(_AGREEMENT),
    "AgreementCreated": _obj({**_AGREEMENT, "funding_transaction_id": UUID_SCHEMA}),
    "Balance": _obj(
        {
            "customer_id": UUID_SCHEMA,
            "as_of": TIME_SCHEMA,
            "funded": INT,
            "used": INT,
            "expired": INT,
            "remaining": INT,
            "agreements": {
                "type": "array",
                "items": _obj({k: _AGREEMENT[k] for k in ("id", "starts_at", "ends_at", "credits", "remaining", "expired_at")}),
            },
        }
    ),
    "Statement": _obj(
        {
            "customer_id": UUID_SCHEMA,
            "month": MONTH_SCHEMA,
            "id": UUID_SCHEMA,
            "opening_balance": INT,
            "funded": INT,
            "used": INT,
            "expired": INT,
            "closing_balance": INT,
            "used_by_kind": {"type": "array", "items": {"type": "object"}},
            "issued_at": TIME_SCHEMA,
        }
    ),
    "MonthClosed": _obj({"month": MONTH_SCHEMA, "closed_at": TIME_SCHEMA, "statements": INT, "already_closed": {"type": "boolean"}}),
    "Transaction": _obj(
        {
            "id": UUID_SCHEMA,
            "customer_id": UUID_SCHEMA,
            "type": STR,
            "occurred_at": TIME_SCHEMA,
            "posted_at": TIME_SCHEMA,
            "reading_hour": NULLABLE_TIME,
            "description": STR,
            "reverses": NULLABLE_UUID,
            "entries": {
                "type": "array",
                "items": _obj({"account": STR, "side": {"enum": ["debit", "credit"]}, "amount": {"type": "integer", "minimum": 1}}),
            },
            "usage": {"type": "array", "items": {"type": "object"}},
        },
        required=["id", "customer_id", "type", "occurred_at", "posted_at", "entries", "usage"],
        closed=False,
    ),
    "Held": _obj(
        {
            "measurement_id": UUID_SCHEMA,
            "revision": INT,
            "reading_hour": TIME_SCHEMA,
            "org_id": STR,
            "meter": STR,
            "resource_kind": STR,
            "resource_id": STR,
            "price_id": NULLABLE_UUID,
            "amount_numerator": INT,
            "amount_denominator": {"type": "integer", "minimum": 1},
            "held_at": TIME_SCHEMA,
        }
    ),
}

LIMIT = param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}, "Page size.")
CURSOR = param("cursor", "query", STR, "`next_cursor` of the previous page.")
CUSTOMER_ID = param("customer_id", "path", UUID_SCHEMA, "A customer id.")
MONTH = param("month", "path", MONTH_SCHEMA, "YYYY-MM (America/New_York).")
BAD_QUERY = problem("A parameter is invalid (limit, cursor, a UUID, a time, a month).")
NO_CUSTOMER = problem("No such customer (or not a UUID).")


def _list(summary: str, item: str, *extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [*extra, LIMIT, CURSOR],
        "responses": {"200": ok(page_of(_ref(item))), "422": BAD_QUERY},
    }


def _create(summary: str, model: Any, out: str, **errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": body_of(model),
        "responses": {"201": ok(_ref(out), "Created"), **errors, **body_errors()},
    }


def _paths() -> dict[str, Any]:
    return {
        "/internal/tiers": {
            "post": _create("Create a tier", TierIn, "Tier", **{"409": problem("A tier of that name exists.")}),
            "get": _list("Tiers, by name", "Tier"),
        },
        "/internal/customers": {
            "post": _create("Create a customer on a tier", CustomerIn, "Customer", **{"404": problem("No such tier.")}),
            "get": _list("Customers", "Customer"),
        },
        "/internal/customers/{customer_id}": {
            "get": {"summary": "One customer", "parameters": [CUSTOMER_ID], "responses": {"200": ok(_ref("Customer")), "404": NO_CUSTOMER}}
        },
        "/internal/customers/{customer_id}/balance": {
            "get": {
                "summary": "Funded, used, expired and remaining microcredits as of a time",
                "parameters": [CUSTOMER_ID, param("as_of", "query", TIME_SCHEMA, "Default: now.")],
                "responses": {"200": ok(_ref("Balance")), "404": NO_CUSTOMER, "422": BAD_QUERY},
            }
        },
        "/internal/customers/{customer_id}/statements/{month}": {
            "get": {
                "summary": "A closed month's statement",
                "parameters": [CUSTOMER_ID, MONTH],
                "responses": {
                    "200": ok(_ref("Statement")),
                    "404": problem("No such customer, or the month is not closed."),
                    "422": BAD_QUERY,
                },
            }
        },
        "/internal/org-assignments": {
            "post": _create(
                "Assign an org to a customer from a time (held charges of the org are posted)",
                AssignmentIn,
                "AssignmentCreated",
                **{"404": NO_CUSTOMER, "409": problem("The org is assigned at that time already.")},
            ),
            "get": _list(
                "Org assignments",
                "Assignment",
                param("org_id", "query", STR, "Only this org."),
                param("customer_id", "query", UUID_SCHEMA, "Only this customer."),
            ),
        },
        "/internal/agreements": {
            "post": _create(
                "Fund a customer's credit pool for a period of performance",
                AgreementIn,
                "AgreementCreated",
                **{"404": NO_CUSTOMER, "409": problem("The agreement starts in a closed month.")},
            ),
            "get": _list("Agreements", "Agreement", param("customer_id", "query", UUID_SCHEMA, "Only this customer.")),
        },
        "/internal/months/{month}/close": {
            "post": {
                "summary": "Close a month (America/New_York): a statement per customer",
                "parameters": [MONTH],
                "responses": {
                    "201": ok(_ref("MonthClosed"), "Closed now"),
                    "200": ok(_ref("MonthClosed"), "It was closed already"),
                    "409": problem("The month has not ended."),
                    "422": BAD_QUERY,
                    "413": body_errors()["413"],
                },
            }
        },
        "/internal/transactions/{transaction_id}/reverse": {
            "post": {
                "summary": "Post the mirror image of a transaction (once)",
                "parameters": [param("transaction_id", "path", UUID_SCHEMA, "A ledger transaction id.")],
                "requestBody": body_of(ReverseIn, required=False),
                "responses": {
                    "201": ok(_ref("Transaction"), "Reversed now"),
                    "200": ok(_ref("Transaction"), "It was reversed already"),
                    "404": problem("No such transaction (or not a UUID)."),
                    "409": problem("A reversal cannot be reversed."),
                    **body_errors(),
                },
            }
        },
        "/internal/expire-agreements": {
            "post": {
                "summary": "Expire the unused credits of agreements that have ended",
                "responses": {
                    "200": ok(_obj({"expired": {"type": "integer", "minimum": 0}})),
                    "413": body_errors()["413"],
                },
            }
        },
        "/internal/held": {"get": _list("Charges held because their org has no customer", "Held")},
    }


def openapi_document() -> dict[str, Any]:
    return document(
        "Ledger (internal)",
        "Customers, tiers, agreements, org assignments, the double-entry ledger and statements; integer "
        "microcredits. Internal routes: the api forwards its /admin ledger commands here. Errors are "
        "application/problem+json.",
        {**with_commands(_paths()), **openapi_path(LedgerCompleteness, "ledger"), **audit_openapi()[0]},
        {**SCHEMAS, **audit_openapi()[1]},
    )
