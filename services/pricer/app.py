"""Wiring of the pricer: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.pricer import handlers
from services.pricer.openapi import openapi_document
from services.pricer.settings import PricerSettings
from shared.openapi import openapi_route
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: PricerSettings | None = None) -> Starlette:
    settings = settings or PricerSettings()
    runtime = Runtime("pricer", settings, MIGRATIONS, description="Prices readings into exact charges.")
    handlers.declare(runtime)
    routes = [*handlers.routes(), openapi_route(openapi_document)]
    return runtime.app(routes=routes, on_start=handlers.start, on_stop=handlers.stop)


def main() -> None:
    settings = PricerSettings()
    serve("pricer", create_app(settings), settings)
