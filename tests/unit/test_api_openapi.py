"""The OpenAPI document names exactly the routes the app serves, with their path parameters, and is
internally consistent; and ``violations`` (tests/support/openapi_checks.py), with which the integration
tests hold real answers against the document, can fail."""

from __future__ import annotations

import re
import uuid

import pytest
from starlette.routing import Route

from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.support.openapi_checks import DOC, violations


def test_the_document_names_exactly_the_served_routes_and_methods() -> None:
    app = create_app(ApiSettings(port=0))
    served = {
        (r.path, m.lower())
        for r in app.routes
        if isinstance(r, Route)
        for m in (r.methods or set())
        if m != "HEAD" and not r.path.startswith("/dashboard")  # the HTML dashboard is not in the document
    }
    documented = {(p, m) for p, ops in DOC["paths"].items() for m in ops}
    assert served == documented


def test_every_path_parameter_is_declared_and_every_declared_one_is_in_the_path() -> None:
    for path, ops in DOC["paths"].items():
        in_path = set(re.findall(r"{(\w+)}", path))
        for method, op in ops.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == in_path, (path, method)
            for p in op.get("parameters", []):
                # path parameters are required; query parameters and the Idempotency-Key header may be left out
                assert p["required"] is True or p["in"] in ("query", "header"), (path, method, p["name"])


def test_every_reference_resolves_and_every_operation_documents_its_errors() -> None:
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


def test_the_checker_catches_what_it_should() -> None:
    """``violations`` must be able to fail, or the integration tests that lean on it prove nothing."""
    page = {"customer_id": str(uuid.uuid4()), "items": [], "next_cursor": None}
    assert violations(page, {"$ref": "#/components/schemas/TransactionPage"}) == []
    assert violations(page | {"extra": 1}, {"$ref": "#/components/schemas/TransactionPage"})
    assert violations(page | {"customer_id": "nope"}, {"$ref": "#/components/schemas/TransactionPage"})
    assert violations({"items": []}, {"$ref": "#/components/schemas/TransactionPage"})
    bad_item = {"customer_id": str(uuid.uuid4()), "items": [{"id": 1}], "next_cursor": None}
    assert violations(bad_item, {"$ref": "#/components/schemas/TransactionPage"})


@pytest.mark.parametrize("name", sorted(DOC["components"]["schemas"]))
def test_every_object_schema_lists_only_properties_it_requires_or_describes(name: str) -> None:
    s = DOC["components"]["schemas"][name]
    if s.get("type") == "object":
        assert set(s.get("required", [])) <= set(s.get("properties", {})), name
