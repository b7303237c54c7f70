"""Wiring of the pricer: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.pricer import handlers
from services.pricer.openapi import openapi_document
from services.pricer.settings import PricerSettings
from shared.openapi import openapi_route
from shared.health import ReadinessPolicy
from shared.runtime import Runtime, serve
from shared.settings import load_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: PricerSettings | None = None) -> Starlette:
    settings = settings or PricerSettings()
    runtime = Runtime("pricer", settings, MIGRATIONS, description="Prices readings into exact charges.")
    # Ready when its readings consumer needs the broker and its database.
    runtime.readiness = ReadinessPolicy(required=frozenset({"database", "kafka", "consumers"}))
    handlers.declare(runtime)
    routes = [*handlers.routes(), openapi_route(openapi_document)]
    return runtime.app(routes=routes, on_start=handlers.start, on_stop=handlers.stop)


def main() -> None:
    settings = load_settings(PricerSettings, "pricer")
    serve("pricer", create_app(settings), settings)
