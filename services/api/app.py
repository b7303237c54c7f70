"""Wiring of the api: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.api import handlers
from services.api.settings import ApiSettings
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: ApiSettings | None = None) -> Starlette:
    settings = settings or ApiSettings()
    runtime = Runtime("api", settings, MIGRATIONS)
    return runtime.app(routes=handlers.routes(), on_start=handlers.start)


def main() -> None:
    settings = ApiSettings()
    serve("api", create_app(settings), settings)
