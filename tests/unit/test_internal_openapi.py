"""The collector's, pricer's and ledger's OpenAPI documents (generated from their route declarations) name
exactly the routes each app serves, with their path parameters; every reference resolves; every /internal
route asks for a token and documents the refusals that come with one."""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.routing import Route

from services.collector.app import create_app as collector_app
from services.collector.settings import CollectorSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings

APPS: dict[str, Any] = {
    "collector": lambda: collector_app(CollectorSettings(port=1)),
    "pricer": lambda: pricer_app(PricerSettings(port=1)),
    "ledger": lambda: ledger_app(LedgerSettings(port=1)),
}
SERVICES: dict[str, tuple[Any, Any]] = {
    name: (make, lambda make=make: make().state.runtime.openapi_document()) for name, make in APPS.items()
}


def _template(path: str) -> str:
    """Starlette's ``{name:converter}`` as OpenAPI's ``{name}``."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", path)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_the_document_names_exactly_the_served_routes_and_methods(service):
    make_app, make_doc = SERVICES[service]
    served = {
        (_template(r.path), m.lower())
        for r in make_app().routes
        if isinstance(r, Route)
        for m in (r.methods or set())
        if m != "HEAD"
    }
    documented = {(p, m) for p, ops in make_doc()["paths"].items() for m in ops}
    assert served == documented


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_path_parameters_are_declared_and_references_resolve(service):
    doc = SERVICES[service][1]()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (path, method)
            assert op["responses"], (path, method)
            if "requestBody" in op:
                assert "413" in op["responses"], (path, method)
    for ref in set(re.findall(r"#/components/schemas/(\w+)", str(doc))):
        assert ref in doc["components"]["schemas"], ref


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_internal_route_needs_a_token_and_documents_its_refusals(service):
    doc = SERVICES[service][1]()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path.startswith("/internal/"):
                assert op["security"] == [{"bearer": ["usage.admin"]}], (path, method)
                assert {"401", "403", "422"} <= set(op["responses"]), (path, method)
            else:
                assert op["security"] == [] and "Open without a token" in op["description"], (path, method)
