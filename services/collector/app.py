"""Wiring of the collector: settings, runtime (pool, migrations, producer, consumers) and routes."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.collector import handlers
from services.collector.settings import CollectorSettings
from shared.contracts import MeasurementsTaken
from shared.health import ReadinessPolicy
from shared.runtime import Runtime, serve
from shared.settings import load_settings
from shared.topics import READINGS

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: CollectorSettings | None = None) -> Starlette:
    settings = settings or CollectorSettings()
    runtime = Runtime("collector", settings, MIGRATIONS, description="Reads Cloud Foundry usage every hour.")
    runtime.publishes(
        READINGS, MeasurementsTaken,
        "Every reading's measurements in batches (one reading hour, meter and shard of resources each), keyed "
        "shard-<n>, estimated ones flagged; published from the collector's outbox after they are stored.",
    )
    # Ready when its readings are published to the broker from its database (the outbox).
    runtime.readiness = ReadinessPolicy(required=frozenset({"database", "kafka"}))
    return runtime.app(
        handlers.OPERATIONS,
        on_start=handlers.start,
        on_stop=handlers.stop,
        title="Collector (internal)",
        description="Readings of the Cloud Foundry v3 API, stored and published to the readings topic. Internal "
        "routes: the api forwards /admin/readings here with its caller's token; every route needs a bearer "
        "token with usage.admin.",
    )


def main() -> None:
    settings = load_settings(CollectorSettings, "collector")
    serve("collector", create_app(settings), settings)
