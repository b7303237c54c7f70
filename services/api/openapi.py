"""The api's OpenAPI 3.1 document, written as data: every route, parameter and answer the api serves
(``tests/unit/test_api_openapi.py`` checks it names exactly the app's routes)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import orjson

from services.api import audit
from services.api.completeness import MAX_HOURS, RULES, TOTALS
from services.api.forward import ADMIN_ROUTES, FORWARDED_QUERY
from services.api.params import DEFAULT_LIMIT, MAX_LIMIT
from services.api.schemas import SUBJECT_PATTERN
from services.api.service import GRANULARITIES, GROUP_BYS, MAX_PERIODS, TRANSACTION_TYPES
from shared.commands import IDEMPOTENCY_KEY_PARAMETER
from shared.openapi import INT, JSON, MONTH_SCHEMA, PROBLEM, STR, TIME_SCHEMA, UUID_SCHEMA, ok, param, problem

__all__ = ["openapi_bytes", "openapi_document"]

_problem, _param = problem, param


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(name: str, description: str = "OK") -> dict[str, Any]:
    return ok(_ref(name), description)


READ_MODEL_AGE = {
    "description": "Whole seconds since the read model last applied a batch of charges or transactions (absent "
    "before its first batch since the api started). Reads are answered while Kafka is away; this says how old "
    "they may be.",
    "schema": {"type": "integer", "minimum": 0},
}


def _read_ok(name: str) -> dict[str, Any]:
    """A 200 answered from the read model: the body and how fresh it is."""
    return {**_ok(name), "headers": {"Read-Model-Age": READ_MODEL_AGE}}


CUSTOMER_ID = _param("customer_id", "path", UUID_SCHEMA, "The customer's id.")
LIMIT = _param(
    "limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}, "Page size."
)
CURSOR = _param(
    "cursor",
    "query",
    {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "maxLength": 2048},
    "Opaque cursor from `next_cursor` of the previous page of the same query.",
)

AUTH_ERRORS = {
    "401": _problem("No token, or a token that does not verify (WWW-Authenticate says why)."),
    "403": _problem("The token lacks the scope this route needs."),
    "503": _problem("The token issuer's keys cannot be fetched right now."),
}
BAD_INPUT = {
    "400": _problem("A cursor that does not belong to this query."),
    "422": _problem("A parameter is missing, unknown or invalid."),
}
NOT_FOUND = {"404": _problem("No such customer, or one the caller may not see (the same answer).")}


def _schemas() -> dict[str, Any]:
    credits = {
        "type": "object",
        "description": "The same figures in credits, 6 decimals, for people only.",
        "properties": {k: STR for k in ("funded", "used", "expired", "remaining", "overage")},
        "required": ["funded", "used", "expired", "remaining", "overage"],
        "additionalProperties": False,
    }
    group_props = {
        k: STR
        for k in ("org_id", "org_name", "space_id", "space_name", "resource_id", "resource_name", "meter", "resource_kind")
    }
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details.",
            "properties": {
                "type": STR,
                "title": STR,
                "status": INT,
                "detail": STR,
                "parameter": {"type": "string", "description": "The parameter at fault, when there is one."},
            },
            "required": ["type", "title", "status"],
        },
        "Balance": {
            "type": "object",
            "description": "Integer microcredits. remaining = funded - used - expired; overage = max(0, -remaining).",
            "properties": {
                "customer_id": UUID_SCHEMA,
                "as_of": TIME_SCHEMA,
                "funded": INT,
                "used": INT,
                "expired": INT,
                "remaining": INT,
                "overage": {"type": "integer", "minimum": 0},
                "credits": credits,
            },
            "required": ["customer_id", "as_of", "funded", "used", "expired", "remaining", "overage", "credits"],
            "additionalProperties": False,
        },
        "Quantity": {
            "type": "object",
            "description": "Sum over the period's hours of the measured value, in `unit` (MB of memory, instances).",
            "properties": {"unit": STR, "value": INT},
            "required": ["unit", "value"],
            "additionalProperties": False,
        },
        "UsageGroup": {
            "type": "object",
            "description": "The group's key and display names: org_id/org_name for org; space_id, space_name, "
            "org_id, org_name for space; resource_id, resource_name, meter, resource_kind, space and org for "
            "resource; meter for meter; meter and resource_kind for kind.",
            "properties": group_props,
            "additionalProperties": False,
        },
        "UsageItem": {
            "type": "object",
            "properties": {
                "period": {"type": "string", "description": "YYYY-MM, YYYY-MM-DD (America/New_York) or the UTC hour."},
                "period_start": TIME_SCHEMA,
                "period_end": TIME_SCHEMA,
                "group": _ref("UsageGroup"),
                "quantities": {"type": "array", "items": _ref("Quantity")},
                "microcredits": {"type": "integer", "description": "Floor of the exact sum."},
                "microcredits_exact": {
                    "type": "string",
                    "pattern": r"^-?\d+/\d+$",
                    "description": "The exact sum as a reduced fraction numerator/denominator.",
                },
                "credits": {"type": "string", "description": "Credits, 6 decimals, for people only (never sum it)."},
            },
            "required": ["period", "period_start", "period_end", "group", "quantities", "microcredits", "microcredits_exact", "credits"],
            "additionalProperties": False,
        },
        "UsagePage": {
            "type": "object",
            "properties": {
                "customer_id": UUID_SCHEMA,
                "from": TIME_SCHEMA,
                "to": TIME_SCHEMA,
                "granularity": {"enum": list(GRANULARITIES)},
                "group_by": {"enum": list(GROUP_BYS)},
                "time_zone": {"const": "America/New_York"},
                "items": {"type": "array", "items": _ref("UsageItem")},
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["customer_id", "from", "to", "granularity", "group_by", "time_zone", "items", "next_cursor"],
            "additionalProperties": False,
        },
        "Entry": {
            "type": "object",
            "properties": {"account": STR, "side": {"enum": ["debit", "credit"]}, "amount": {"type": "integer", "minimum": 1}},
            "required": ["account", "side", "amount"],
        },
        "UsageLine": {
            "type": "object",
            "properties": {
                "org_id": STR,
                "meter": STR,
                "resource_kind": STR,
                "price_id": {"type": ["string", "null"], "format": "uuid"},
                "microcredits": INT,
            },
            "required": ["org_id", "meter", "microcredits"],
        },
        "Transaction": {
            "type": "object",
            "properties": {
                "id": UUID_SCHEMA,
                "type": {"enum": list(TRANSACTION_TYPES)},
                "occurred_at": TIME_SCHEMA,
                "posted_at": TIME_SCHEMA,
                "reading_hour": {"type": ["string", "null"], "format": "date-time"},
                "description": STR,
                "amount": {"type": "integer", "minimum": 0, "description": "Microcredits moved (its debit total)."},
                "effect": {
                    "type": "object",
                    "description": "What it does to the balance: +/- microcredits to funded, used or expired.",
                    "properties": {"bucket": {"enum": ["funded", "used", "expired", "none"]}, "microcredits": INT},
                    "required": ["bucket", "microcredits"],
                    "additionalProperties": False,
                },
                "reverses": {"type": ["string", "null"], "format": "uuid"},
                "entries": {"type": "array", "items": _ref("Entry")},
                "usage": {"type": "array", "items": _ref("UsageLine")},
            },
            "required": ["id", "type", "occurred_at", "posted_at", "reading_hour", "description", "amount", "effect", "reverses", "entries", "usage"],
            "additionalProperties": False,
        },
        "TransactionPage": {
            "type": "object",
            "properties": {
                "customer_id": UUID_SCHEMA,
                "items": {"type": "array", "items": _ref("Transaction")},
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["customer_id", "items", "next_cursor"],
            "additionalProperties": False,
        },
        "Statement": {
            "type": "object",
            "description": "A closed month (America/New_York), integer microcredits.",
            "properties": {
                "customer_id": UUID_SCHEMA,
                "month": MONTH_SCHEMA,
                "statement_id": UUID_SCHEMA,
                "opening_balance": INT,
                "funded": INT,
                "used": INT,
                "expired": INT,
                "closing_balance": INT,
                "used_by_kind": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"meter": STR, "resource_kind": STR, "microcredits": INT},
                        "required": ["meter", "microcredits"],
                    },
                },
                "issued_at": TIME_SCHEMA,
            },
            "required": ["customer_id", "month", "statement_id", "opening_balance", "funded", "used", "expired", "closing_balance", "used_by_kind", "issued_at"],
            "additionalProperties": False,
        },
        "CustomerPage": {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"customer_id": UUID_SCHEMA, "first_seen_at": TIME_SCHEMA},
                        "required": ["customer_id", "first_seen_at"],
                        "additionalProperties": False,
                    },
                },
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["items", "next_cursor"],
            "additionalProperties": False,
        },
        "EntitlementIn": {
            "type": "object",
            "properties": {
                "subject": {"type": "string", "pattern": SUBJECT_PATTERN, "description": "The tokens' `sub`."},
                "customer_id": UUID_SCHEMA,
            },
            "required": ["subject", "customer_id"],
            "additionalProperties": False,
        },
        "Entitlement": {
            "type": "object",
            "properties": {"subject": STR, "customer_id": UUID_SCHEMA, "granted_by": STR, "granted_at": TIME_SCHEMA},
            "required": ["subject", "customer_id", "granted_by", "granted_at"],
            "additionalProperties": False,
        },
        "EntitlementPage": {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": _ref("Entitlement")},
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["items", "next_cursor"],
            "additionalProperties": False,
        },
    }


def _customer_routes() -> dict[str, Any]:
    read = [{"bearer": ["usage.read"]}, {"bearer": ["usage.admin"]}]
    return {
        "/v1/customers": {
            "get": {
                "summary": "The customers the caller may see",
                "description": "All known customers for a usage.admin token; otherwise those named by the token's "
                "`customers` claim and those an admin entitled the token's subject to.",
                "security": read,
                "parameters": [LIMIT, CURSOR],
                "responses": {"200": _read_ok("CustomerPage"), **BAD_INPUT, **AUTH_ERRORS},
            }
        },
        "/v1/customers/{customer_id}/balance": {
            "get": {
                "summary": "Funded, used, expired, remaining and overage microcredits, now or as of a time",
                "security": read,
                "parameters": [
                    CUSTOMER_ID,
                    _param("as_of", "query", TIME_SCHEMA, "Count transactions that occurred at or before this time (default: now)."),
                ],
                "responses": {"200": _read_ok("Balance"), **BAD_INPUT, **NOT_FOUND, **AUTH_ERRORS},
            }
        },
        "/v1/customers/{customer_id}/usage": {
            "get": {
                "summary": "Usage value and microcredits per group and period",
                "description": "Periods are UTC hours, or days and months in America/New_York; `from` and `to` must "
                "be period boundaries, at most "
                + ", ".join(f"{n} {g}s" for g, n in MAX_PERIODS.items())
                + " apart. `microcredits` is the floor of the exact sum, `microcredits_exact` the exact sum.",
                "security": read,
                "parameters": [
                    CUSTOMER_ID,
                    _param("from", "query", TIME_SCHEMA, "Start (inclusive), with its zone.", required=True),
                    _param("to", "query", TIME_SCHEMA, "End (exclusive), with its zone.", required=True),
                    _param("granularity", "query", {"enum": list(GRANULARITIES), "default": "day"}, "Period length."),
                    _param("group_by", "query", {"enum": list(GROUP_BYS), "default": "org"}, "Grouping dimension."),
                    LIMIT,
                    CURSOR,
                ],
                "responses": {"200": _read_ok("UsagePage"), **BAD_INPUT, **NOT_FOUND, **AUTH_ERRORS},
            }
        },
        "/v1/customers/{customer_id}/transactions": {
            "get": {
                "summary": "The customer's ledger transactions, newest first",
                "security": read,
                "parameters": [
                    CUSTOMER_ID,
                    LIMIT,
                    CURSOR,
                    _param("type", "query", {"enum": list(TRANSACTION_TYPES)}, "Only this type."),
                    _param("from", "query", TIME_SCHEMA, "Occurred at or after."),
                    _param("to", "query", TIME_SCHEMA, "Occurred before."),
                ],
                "responses": {"200": _read_ok("TransactionPage"), **BAD_INPUT, **NOT_FOUND, **AUTH_ERRORS},
            }
        },
        "/v1/customers/{customer_id}/statements/{month}": {
            "get": {
                "summary": "The statement of a closed month (America/New_York)",
                "security": read,
                "parameters": [CUSTOMER_ID, _param("month", "path", MONTH_SCHEMA, "YYYY-MM")],
                "responses": {
                    "200": _read_ok("Statement"),
                    "404": _problem("No such customer (or not visible), or no statement for that month yet."),
                    "422": BAD_INPUT["422"],
                    **AUTH_ERRORS,
                },
            }
        },
    }


def _admin_routes() -> dict[str, Any]:
    admin = [{"bearer": ["usage.admin"]}]
    any_json = {"schema": {}}
    forwarded = {
        "default": {
            "description": "The owning service's answer, status and body as it gave them.",
            "content": {JSON: any_json, PROBLEM: any_json},
        },
        "422": _problem("A parameter is unknown or invalid (checked before forwarding), or the owner refused the body."),
        "502": _problem("The owning service cannot be reached."),
        "504": _problem("The owning service did not answer in time."),
        **AUTH_ERRORS,
    }
    query_params = [LIMIT, CURSOR] + [
        _param(n, "query", schema, desc)
        for n, schema, desc in (
            ("customer_id", UUID_SCHEMA, "Filter, passed to the owning service."),
            ("org_id", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "Filter, passed to the owning service."),
            ("meter", {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}, "Filter, passed to the owning service."),
            ("resource_kind", {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{0,128}$"}, "Filter, passed to the owning service."),
            ("at", TIME_SCHEMA, "Filter, passed to the owning service."),
            ("from", TIME_SCHEMA, "Filter, passed to the owning service."),
            ("to", TIME_SCHEMA, "Filter, passed to the owning service."),
        )
    ]
    assert {p["name"] for p in query_params} == set(FORWARDED_QUERY)
    path_params = {
        "customer_id": CUSTOMER_ID,
        "transaction_id": _param("transaction_id", "path", UUID_SCHEMA, "A ledger transaction id."),
        "price_id": _param("price_id", "path", UUID_SCHEMA, "A price id."),
        "month": _param("month", "path", MONTH_SCHEMA, "YYYY-MM (America/New_York)."),
    }
    paths: dict[str, Any] = {}
    for r in ADMIN_ROUTES:
        names = [seg[1:-1] for seg in r.path.split("/") if seg.startswith("{")]
        ops: dict[str, Any] = {}
        for method in r.methods:
            op: dict[str, Any] = {
                "summary": f"{r.summary} (forwarded to the {r.service})",
                "security": admin,
                "parameters": [path_params[n] for n in names] + (query_params if method == "GET" else []),
                "responses": forwarded,
            }
            if method == "POST":
                op["parameters"] = [*op["parameters"], IDEMPOTENCY_KEY_PARAMETER]
                op["responses"] = {
                    **forwarded,
                    "400": _problem("The Idempotency-Key is malformed (checked before forwarding)."),
                }
                op["requestBody"] = {
                    "required": False,
                    "description": f"JSON, as the {r.service} takes it for this command.",
                    "content": {JSON: {"schema": {"type": "object"}}},
                }
            ops[method.lower()] = op
        paths[r.path] = ops
    subject_q = _param("subject", "query", {"type": "string", "pattern": SUBJECT_PATTERN}, "A token subject.")
    customer_q = _param("customer_id", "query", UUID_SCHEMA, "A customer id.")
    paths["/admin/entitlements"] = {
        "get": {
            "summary": "Which subjects may read which customers",
            "security": admin,
            "parameters": [subject_q, customer_q, LIMIT, CURSOR],
            "responses": {"200": _ok("EntitlementPage"), **BAD_INPUT, **AUTH_ERRORS},
        },
        "post": {
            "summary": "Entitle a subject to read a customer (idempotent)",
            "security": admin,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("EntitlementIn")}}},
            "responses": {
                "201": _ok("Entitlement", "Created"),
                "200": _ok("Entitlement", "It existed already"),
                "415": _problem("The body is not JSON."),
                "422": _problem("The body or a parameter is invalid."),
                **AUTH_ERRORS,
            },
        },
        "delete": {
            "summary": "Take an entitlement away",
            "security": admin,
            "parameters": [{**subject_q, "required": True}, {**customer_q, "required": True}],
            "responses": {
                "204": {"description": "Removed"},
                "404": _problem("No such entitlement."),
                "422": BAD_INPUT["422"],
                **AUTH_ERRORS,
            },
        },
    }
    return paths


def _completeness_schemas() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    counts = {name: count for name in TOTALS if name != "unpublished"} | {"unpublished": INT}
    return {
        "CompletenessRow": {
            "type": "object",
            "description": "One reading hour and meter: distinct measurements at each stage (charges at their latest "
            "revision), and the rules it breaks.",
            "properties": {
                "hour": TIME_SCHEMA,
                "meter": STR,
                "expected": {
                    "type": "boolean",
                    "description": "The collector should have read this hour for this meter.",
                },
                "reading": {"enum": ["ok", "estimated", "failed", "none"], "description": "How the hour was covered."},
                **counts,
                "revisions_behind": {
                    "type": "integer",
                    "description": "Latest revisions at the pricer minus those the ledger applied.",
                },
                "reconciles": {"type": "boolean"},
                "problems": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"rule": {"enum": list(RULES)}, "detail": STR},
                        "required": ["rule", "detail"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["hour", "meter", "expected", "reading", *TOTALS, "revisions_behind", "reconciles", "problems"],
            "additionalProperties": False,
        },
        "CompletenessReport": {
            "type": "object",
            "properties": {
                "from": TIME_SCHEMA,
                "to": TIME_SCHEMA,
                "generated_at": TIME_SCHEMA,
                "hours": {"type": "integer", "minimum": 1, "maximum": MAX_HOURS},
                "meters": {"type": "array", "items": STR},
                "reconciles": {
                    "type": "boolean",
                    "description": "No row is flagged and every DLQ was read completely.",
                },
                "flagged": count,
                "missing_readings": count,
                "problems": {
                    "type": "array",
                    "items": STR,
                    "description": "Report-level problems (a DLQ not read completely).",
                },
                "totals": {
                    "type": "object",
                    "properties": counts,
                    "required": list(TOTALS),
                    "additionalProperties": False,
                },
                "dead_letters": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "topic": STR,
                            "consumer_groups": {"type": "array", "items": STR},
                            "records": count,
                            "counted": count,
                            "unattributed": {
                                **count,
                                "description": "Over the whole topic: no reading hour or meter in the message.",
                            },
                            "complete": {"type": "boolean"},
                        },
                        "required": ["topic", "consumer_groups", "records", "counted", "unattributed", "complete"],
                        "additionalProperties": False,
                    },
                },
                "rows": {"type": "array", "items": _ref("CompletenessRow")},
            },
            "required": ["from", "to", "generated_at", "hours", "meters", "reconciles", "flagged", "missing_readings",
                         "problems", "totals", "dead_letters", "rows"],
            "additionalProperties": False,
        },
    }


def _completeness_route() -> dict[str, Any]:
    return {
        "/admin/completeness": {
            "get": {
                "summary": "Completeness: per reading hour and meter, measurements read, estimated, published, priced, "
                "unpriced, posted, held and dead-lettered, and where they do not reconcile",
                "description": "Covers the whole UTC hours h with from <= h < to (at least one, at most "
                f"{MAX_HOURS}). Each owning service counts its own data; the api counts the DLQs. Rules: "
                "read + estimated = published; published = priced + unpriced + dead-lettered at the pricer; "
                "priced + unpriced = posted + held + dead-lettered at the ledger; the ledger has the latest revision; "
                "every due hour since the first reading has a reading or an estimate for every meter.",
                "security": [{"bearer": ["usage.admin"]}],
                "parameters": [
                    _param("from", "query", TIME_SCHEMA, "Start (inclusive), RFC 3339 with its zone.", required=True),
                    _param("to", "query", TIME_SCHEMA, "End (exclusive), RFC 3339 with its zone.", required=True),
                ],
                "responses": {
                    "200": _ok("CompletenessReport"),
                    "422": _problem(
                        "from or to missing, unknown parameters, no zone, from >= to, or a range without a whole "
                        "hour or over the limit."
                    ),
                    "502": _problem("An owning service cannot be reached or answered something else."),
                    "504": _problem("An owning service did not answer in time."),
                    **AUTH_ERRORS,
                },
            }
        }
    }


def _ops_routes() -> dict[str, Any]:
    status = {"type": "object", "properties": {"status": STR}, "required": ["status"]}
    when = {"type": ["string", "null"], "format": "date-time"}
    age = {"type": ["number", "null"]}
    freshness = {"type": "object", "properties": {"last_batch_at": when, "age_seconds": age}}
    ready = {
        "type": "object",
        "properties": {
            "status": STR,
            "checks": {"type": "object", "additionalProperties": STR},
            "not_required": {"type": "array", "items": STR, "description": "Checks reported, not required."},
            "read_model": {
                **freshness,
                "properties": {
                    **freshness["properties"],
                    "consumers": {"type": "object", "additionalProperties": freshness},
                },
                "description": "When the read model last applied a batch (latest of its consumers, and each).",
            },
        },
        "required": ["status", "checks"],
    }
    return {
        "/openapi.json": {
            "get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}, "422": BAD_INPUT["422"]}}
        },
        "/asyncapi.json": {
            "get": {
                "summary": "The AsyncAPI 3.0 document of the topics the api reads (generated by FastStream)",
                "security": [],
                "responses": {"200": {"description": "AsyncAPI 3.0", "content": {JSON: {"schema": {"type": "object"}}}}},
            }
        },
        "/healthz": {"get": {"summary": "The process answers", "security": [], "responses": {"200": {"description": "OK", "content": {JSON: {"schema": status}}}}}},
        "/readyz": {
            "get": {
                "summary": "Ready to answer: the database and the consumers' loops (Kafka is reported, not required: "
                "reads are answered from the read model, whose freshness is given)",
                "security": [],
                "responses": {
                    "200": {"description": "Ready", "content": {JSON: {"schema": ready}}},
                    "503": {"description": "Not ready", "content": {JSON: {"schema": ready}}},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": STR}}}},
            }
        },
    }


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Usage billing API",
            "version": "1.0.0",
            "description": "Usage, balances, transactions and statements of Cloud Foundry customers, answered from "
            "the api's read model; admin commands forwarded to the service that owns them. Money is integer "
            "microcredits (1 credit = 1,000,000); exact usage sums are fractions. Bearer JWTs (RS256/ES256) from "
            "the configured OIDC issuer; scope usage.read for /v1 (limited to entitled customers), usage.admin "
            "for /admin.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            **_customer_routes(),
            **_admin_routes(),
            **audit.openapi_paths(_problem, AUTH_ERRORS),
            **_completeness_route(),
            **_ops_routes(),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {**_schemas(), **_completeness_schemas(), **audit.OPENAPI_SCHEMAS},
        },
    }


def openapi_document() -> dict[str, Any]:
    """A copy of the document (callers may not change the cached one)."""
    return copy.deepcopy(_document())


@functools.cache
def openapi_bytes() -> bytes:
    """The document as served at ``/openapi.json``."""
    return orjson.dumps(_document())
