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
DESCRIPTION = (
    "Usage, balances, transactions and statements of Cloud Foundry customers, answered from the api's read model; "
    "admin commands forwarded to the service that owns them, with the caller's token. Money is integer "
    "microcredits (1 credit = 1,000,000); exact usage sums are fractions. Bearer JWTs (RS256/ES256) from the "
    "configured OIDC issuer; scope usage.read for /v1 (limited to entitled customers), usage.admin for /admin."
)


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
    app = runtime.app(
        api.operations(),
        routes=Dashboard(api).routes(),
        on_start=api.start,
        on_stop=api.stop,
        wrap=api.wrap,
        title="Usage billing API",
        description=DESCRIPTION,
        ready_summary="Ready to answer: the database and the consumers' loops (Kafka is reported, not required: "
        "reads are answered from the read model, whose freshness is given)",
    )
    app.state.api = api
    return app


def main() -> None:
    settings = load_settings(ApiSettings, "api")
    serve("api", create_app(settings), settings)
