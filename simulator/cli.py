"""CLI commands ``sim`` (run the simulator) and ``token`` (print a signed JWT for the billing API).

The main CLI can mount them either with ``main_app.add_typer(simulator.cli.app)`` or by
registering the plain functions: ``main_app.command("sim")(run_sim)``,
``main_app.command("token")(token)``.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from simulator.clock import parse_time
from simulator.config import SimConfig
from simulator.faults import FaultConfig
from simulator.oidc import DEFAULT_AUDIENCE, ISSUER_ENV, mint_token

__all__ = ["app", "run_sim", "token"]

app = typer.Typer(help="Cloud Foundry v3 / UAA / OIDC simulator.", no_args_is_help=True)


def _outage_windows(values: list[str]) -> list[tuple[str, str]]:
    windows = []
    for value in values:
        start, sep, end = value.partition("/")
        if not sep:
            raise typer.BadParameter(f"outage window must be FROM/TO, got {value!r}", param_hint="--fault-outage")
        windows.append((start, end))
    return windows


@app.command("sim")
def run_sim(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8090,
    seed: Annotated[int, typer.Option(help="World seed: same seed, same world.")] = 1,
    orgs: Annotated[int, typer.Option(help="Number of orgs.")] = 4,
    spaces_per_org: Annotated[int, typer.Option(help="Spaces in each org.")] = 3,
    apps: Annotated[int, typer.Option(help="Number of app slots (some churn in and out).")] = 200,
    services: Annotated[int, typer.Option(help="Number of service instance slots.")] = 60,
    plans: Annotated[int, typer.Option(help="Number of service plans.")] = 6,
    start: Annotated[str, typer.Option(help="Simulated start time (ISO-8601, UTC).")] = "2026-10-01T00:00:00Z",
    token_ttl: Annotated[int, typer.Option(help="UAA token lifetime, wall-clock seconds.")] = 600,
    client_id: Annotated[str, typer.Option(help="UAA client id.")] = "billing-collector",
    client_secret: Annotated[str, typer.Option(help="UAA client secret.")] = "sim-secret",
    issuer: Annotated[
        str | None, typer.Option(help=f"OIDC issuer URL (default: ${ISSUER_ENV} or http://HOST:PORT).")
    ] = None,
    key_file: Annotated[
        str | None, typer.Option(help="OIDC RSA key PEM (default: $SIM_OIDC_KEY_FILE or .local/sim/oidc-key.pem).")
    ] = None,
    fault_error_rate: Annotated[float, typer.Option(help="Fraction of CF requests answered 502/503.")] = 0.0,
    fault_timeout_rate: Annotated[float, typer.Option(help="Fraction of CF requests that hang.")] = 0.0,
    fault_timeout_seconds: Annotated[float, typer.Option(help="How long a hanging request sleeps.")] = 30.0,
    fault_slow_page_seconds: Annotated[float, typer.Option(help="Delay added to every CF request.")] = 0.0,
    fault_outage: Annotated[
        list[str] | None, typer.Option(help="Simulated-hour outage window FROM/TO ([from, to)); repeatable.")
    ] = None,
    fault_malformed_rate: Annotated[float, typer.Option(help="Fraction of resources missing a field.")] = 0.0,
    fault_seed: Annotated[int, typer.Option(help="Seed of the fault randomness.")] = 0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the CF v3 API + UAA + OIDC simulator over HTTP (uvicorn)."""
    import uvicorn

    from simulator.app import create_app

    try:
        windows = [(parse_time(a), parse_time(b)) for a, b in _outage_windows(fault_outage or [])]
        faults = FaultConfig(
            error_rate=fault_error_rate,
            timeout_rate=fault_timeout_rate,
            timeout_seconds=fault_timeout_seconds,
            slow_page_seconds=fault_slow_page_seconds,
            outage=windows,
            malformed_rate=fault_malformed_rate,
            seed=fault_seed,
        )
        config = SimConfig(
            seed=seed,
            orgs=orgs,
            spaces_per_org=spaces_per_org,
            apps=apps,
            services=services,
            plans=plans,
            start=parse_time(start),
            token_ttl_seconds=token_ttl,
            client_id=client_id,
            client_secret=client_secret,
            issuer=issuer or os.environ.get(ISSUER_ENV) or f"http://{host}:{port}",
            oidc_key_file=key_file,
            faults=faults,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level)


@app.command("token")
def token(
    scope: Annotated[list[str], typer.Option("--scope", help="Scope to grant (usage.read, usage.admin); repeatable.")],
    customer: Annotated[
        list[str] | None, typer.Option("--customer", help="Customer id the caller may see; repeatable.")
    ] = None,
    subject: Annotated[str, typer.Option(help="The token's sub claim.")] = "dev-user",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
    audience: Annotated[str, typer.Option(help="The token's aud claim.")] = DEFAULT_AUDIENCE,
    issuer: Annotated[
        str | None, typer.Option(help=f"The token's iss claim (default: ${ISSUER_ENV} or http://127.0.0.1:8090).")
    ] = None,
    key_file: Annotated[
        str | None, typer.Option(help="RSA key PEM (default: $SIM_OIDC_KEY_FILE or .local/sim/oidc-key.pem).")
    ] = None,
) -> str:
    """Print a JWT signed with the simulator's OIDC key (RS256, kid in the header)."""
    jwt = mint_token(
        scope, customer or [], subject=subject, audience=audience, ttl=ttl, issuer=issuer, key_file=key_file
    )
    typer.echo(jwt)
    return jwt
