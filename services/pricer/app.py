"""Wiring of the pricer: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.pricer import handlers
from services.pricer.settings import PricerSettings
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
    return runtime.app(
        handlers.OPERATIONS,
        on_start=handlers.start,
        on_stop=handlers.stop,
        title="Pricer (internal)",
        description="The price catalog (time-ranged prices, exact fractions) and the charges it computes from "
        "the readings. Internal routes: the api forwards /admin/prices and /admin/unpriced here with its "
        "caller's token; every route needs a bearer token with usage.admin.",
    )


def main() -> None:
    settings = load_settings(PricerSettings, "pricer")
    serve("pricer", create_app(settings), settings)
