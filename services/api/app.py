"""Wiring of the api: settings, runtime (pool, migrations, producer, consumers), token verifier,
admin forwarder and routes, built in this order by the lifespan."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from services.api.dashboard import Dashboard
from services.api.handlers import Api
from services.api.settings import ApiSettings
from shared.health import ReadinessPolicy
from shared.runtime import Runtime, serve
from shared.settings import load_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: ApiSettings | None = None) -> Starlette:
    settings = settings or ApiSettings()
    runtime = Runtime("api", settings, MIGRATIONS)
    api = Api(settings, runtime)
    # Reads are answered from the read model: Kafka away makes it staler (said in /readyz and the
    # Read-Model-Age header), not unable to answer; the database and the consumers' loops are needed.
    runtime.readiness = ReadinessPolicy(
        required=frozenset({"database", "consumers"}), details=api.freshness.details
    )
    # The HTML dashboard is one Mount at /dashboard, apart from the JSON routes of /openapi.json.
    routes = [*api.routes(), *Dashboard(api).routes()]
    app = runtime.app(routes=routes, on_start=api.start, on_stop=api.stop)
    app.state.api = api
    return app


def main() -> None:
    settings = load_settings(ApiSettings, "api")
    serve("api", create_app(settings), settings)
