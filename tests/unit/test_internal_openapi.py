"""The collector's, pricer's and ledger's OpenAPI documents name exactly the routes each app serves, with
their path parameters, and every reference resolves."""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.routing import Route

from services.collector.app import create_app as collector_app
from services.collector.openapi import openapi_document as collector_doc
from services.collector.settings import CollectorSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.openapi import openapi_document as ledger_doc
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.openapi import openapi_document as pricer_doc
from services.pricer.settings import PricerSettings

SERVICES: dict[str, tuple[Any, Any]] = {
    "collector": (lambda: collector_app(CollectorSettings(port=1)), collector_doc),
    "pricer": (lambda: pricer_app(PricerSettings(port=1)), pricer_doc),
    "ledger": (lambda: ledger_app(LedgerSettings(port=1)), ledger_doc),
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
