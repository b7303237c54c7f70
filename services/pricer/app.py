"""Wiring of the pricer: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.pricer import handlers
from services.pricer.settings import PricerSettings
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: PricerSettings | None = None) -> Starlette:
    settings = settings or PricerSettings()
    runtime = Runtime("pricer", settings, MIGRATIONS)
    return runtime.app(routes=handlers.routes(), on_start=handlers.start, on_stop=handlers.stop)


def main() -> None:
    settings = PricerSettings()
    serve("pricer", create_app(settings), settings)
