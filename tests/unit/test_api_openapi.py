"""The OpenAPI document names exactly the routes the app serves, with their path parameters, and is
internally consistent. Also home of ``violations``, a checker for the JSON Schema subset the document
uses, with which the integration tests hold real answers against the document."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

import pytest
from starlette.routing import Route

from services.api.app import create_app
from services.api.openapi import openapi_document
from services.api.settings import ApiSettings

DOC = openapi_document()


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = doc["components"]["schemas"][name]
    return schema


def _type_ok(value: Any, t: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[t]


def violations(value: Any, schema: dict[str, Any], doc: dict[str, Any] = DOC, at: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (type, enum, const, pattern, format uuid/date-time, minimum,
    minLength/maxLength, required, properties, additionalProperties, items)."""
    s = _resolve(schema, doc)
    out: list[str] = []
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_type_ok(value, t) for t in types):
            return [f"{at}: {value!r} is not {types}"]
    if "enum" in s and value not in s["enum"]:
        out.append(f"{at}: {value!r} not in {s['enum']}")
    if "const" in s and value != s["const"]:
        out.append(f"{at}: {value!r} != {s['const']!r}")
    if isinstance(value, str):
        if "pattern" in s and not re.search(s["pattern"], value):
            out.append(f"{at}: {value!r} does not match {s['pattern']}")
        if s.get("format") == "uuid":
            try:
                uuid.UUID(value)
            except ValueError:
                out.append(f"{at}: {value!r} is not a uuid")
        if s.get("format") == "date-time":
            try:
                if datetime.fromisoformat(value).tzinfo is None:
                    out.append(f"{at}: {value!r} has no zone")
            except ValueError:
                out.append(f"{at}: {value!r} is not a date-time")
        if len(value) < s.get("minLength", 0) or len(value) > s.get("maxLength", 10**9):
            out.append(f"{at}: length {len(value)} out of bounds")
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in s and value < s["minimum"]:
            out.append(f"{at}: {value} < {s['minimum']}")
        if "maximum" in s and value > s["maximum"]:
            out.append(f"{at}: {value} > {s['maximum']}")
    if isinstance(value, dict):
        props = s.get("properties", {})
        for name in s.get("required", []):
            if name not in value:
                out.append(f"{at}: missing {name}")
        for name, v in value.items():
            if name in props:
                out.extend(violations(v, props[name], doc, f"{at}.{name}"))
            elif s.get("additionalProperties") is False:
                out.append(f"{at}: unexpected property {name}")
            elif isinstance(s.get("additionalProperties"), dict):
                out.extend(violations(v, s["additionalProperties"], doc, f"{at}.{name}"))
    if isinstance(value, list) and "items" in s:
        for i, v in enumerate(value):
            out.extend(violations(v, s["items"], doc, f"{at}[{i}]"))
    return out


def response_schema(path: str, method: str, status: int, media: str = "application/json") -> dict[str, Any]:
    op = DOC["paths"][path][method.lower()]
    resp = op["responses"].get(str(status)) or op["responses"]["default"]
    return resp["content"][media]["schema"]


def test_the_document_names_exactly_the_served_routes_and_methods():
    app = create_app(ApiSettings(port=0))
    served = {
        (r.path, m.lower())
        for r in app.routes
        if isinstance(r, Route)
        for m in (r.methods or set())
        if m != "HEAD"
    }
    documented = {(p, m) for p, ops in DOC["paths"].items() for m in ops}
    assert served == documented


def test_every_path_parameter_is_declared_and_every_declared_one_is_in_the_path():
    for path, ops in DOC["paths"].items():
        in_path = set(re.findall(r"{(\w+)}", path))
        for method, op in ops.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == in_path, (path, method)
            for p in op.get("parameters", []):
                assert p["required"] is True or p["in"] == "query", (path, method, p["name"])


def test_every_reference_resolves_and_every_operation_documents_its_errors():
    text = str(DOC)
    for ref in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert ref in DOC["components"]["schemas"], ref
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (path, method)
            if path.startswith(("/v1/", "/admin/")):
                assert {"401", "403"} <= set(op["responses"]), (path, method)
                assert op["security"], (path, method)
            if path.startswith("/v1/customers/{customer_id}"):
                assert "404" in op["responses"]


def test_the_checker_catches_what_it_should():
    """``violations`` must be able to fail, or the integration tests that lean on it prove nothing."""
    page = {"customer_id": str(uuid.uuid4()), "items": [], "next_cursor": None}
    assert violations(page, {"$ref": "#/components/schemas/TransactionPage"}) == []
    assert violations(page | {"extra": 1}, {"$ref": "#/components/schemas/TransactionPage"})
    assert violations(page | {"customer_id": "nope"}, {"$ref": "#/components/schemas/TransactionPage"})
    assert violations({"items": []}, {"$ref": "#/components/schemas/TransactionPage"})
    assert violations({"customer_id": str(uuid.uuid4()), "items": [{"id": 1}], "next_cursor": None}, {"$ref": "#/components/schemas/TransactionPage"})


@pytest.mark.parametrize("name", sorted(DOC["components"]["schemas"]))
def test_every_object_schema_lists_only_properties_it_requires_or_describes(name):
    s = DOC["components"]["schemas"][name]
    if s.get("type") == "object":
        assert set(s.get("required", [])) <= set(s.get("properties", {})), name
