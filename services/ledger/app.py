"""Wiring of the ledger: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.ledger import handlers
from services.ledger.settings import LedgerSettings
from shared.health import ReadinessPolicy
from shared.runtime import Runtime, serve
from shared.settings import load_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: LedgerSettings | None = None) -> Starlette:
    settings = settings or LedgerSettings()
    runtime = Runtime("ledger", settings, MIGRATIONS, description="Posts charges to customers' credit pools.")
    # Ready when its charges consumer needs the broker and its database.
    runtime.readiness = ReadinessPolicy(required=frozenset({"database", "kafka", "consumers"}))
    handlers.declare(runtime)
    return runtime.app(
        handlers.OPERATIONS,
        on_start=handlers.start,
        on_stop=handlers.stop,
        title="Ledger (internal)",
        description="Customers, tiers, agreements, org assignments, the double-entry ledger and statements; "
        "integer microcredits. Internal routes: the api forwards its /admin ledger commands here with its "
        "caller's token; every route needs a bearer token with usage.admin.",
    )


def main() -> None:
    settings = load_settings(LedgerSettings, "ledger")
    serve("ledger", create_app(settings), settings)
