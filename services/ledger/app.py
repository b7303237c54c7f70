"""Wiring of the ledger: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.ledger import handlers
from services.ledger.openapi import openapi_document
from services.ledger.settings import LedgerSettings
from shared.health import ReadinessPolicy
from shared.openapi import openapi_route
from shared.runtime import Runtime, serve
from shared.settings import load_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: LedgerSettings | None = None) -> Starlette:
    settings = settings or LedgerSettings()
    runtime = Runtime("ledger", settings, MIGRATIONS, description="Posts charges to customers' credit pools.")
    # Ready when its charges consumer needs the broker and its database.
    runtime.readiness = ReadinessPolicy(required=frozenset({"database", "kafka", "consumers"}))
    handlers.declare(runtime)
    routes = [*handlers.routes(), openapi_route(openapi_document)]
    return runtime.app(routes=routes, on_start=handlers.start, on_stop=handlers.stop)


def main() -> None:
    settings = load_settings(LedgerSettings, "ledger")
    serve("ledger", create_app(settings), settings)
