"""``billing``: start each part of the system, and the tools around it.

Each service subcommand runs one service in the foreground until SIGTERM/SIGINT; configuration comes
from the environment (see README, "Configuration").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from cli.completeness import register as register_completeness
from cli.report import register as register_report
from simulator.cli import run_sim, token

app = typer.Typer(help="Usage billing for a Cloud Foundry platform.", no_args_is_help=True, add_completion=False)
app.command("sim")(run_sim)
app.command("token")(token)
register_report(app)
register_completeness(app)


@app.command()
def collector() -> None:
    """Run the collector (reads Cloud Foundry usage hourly; port 8081)."""
    from services.collector.app import main

    main()


@app.command()
def pricer() -> None:
    """Run the pricer (readings -> exact charges; port 8082)."""
    from services.pricer.app import main

    main()


@app.command()
def ledger() -> None:
    """Run the ledger (charges -> double-entry postings, statements; port 8083)."""
    from services.ledger.app import main

    main()


@app.command()
def api() -> None:
    """Run the public API (port 8080)."""
    from services.api.app import main

    main()


def _utc(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no time zone; add Z for UTC")
    return value.astimezone(UTC)


@app.command()
def backfill(
    start: Annotated[str, typer.Option("--from", help="First hour, ISO-8601 with zone, e.g. 2026-10-01T00:00Z.")],
    end: Annotated[str, typer.Option("--to", help="End (exclusive), ISO-8601 with zone.")],
) -> None:
    """Take the readings of simulated hours [--from, --to) against the simulator (COLLECTOR_* settings)."""
    from services.collector.backfill import run

    t1, t2 = _utc(start), _utc(end)
    if t2 <= t1:
        raise typer.BadParameter("--to must be after --from")
    totals = run(t1, t2)
    typer.echo(" ".join(f"{k}={v}" for k, v in totals.items()))


@app.command()
def demo(
    scenario: Annotated[str, typer.Option(help="Built-in scenario: demo (3 customers, 12 orgs, a month) or small.")] = "demo",
    api_url: Annotated[str, typer.Option(help="The api's base URL.")] = "http://127.0.0.1:8080",
    sim_url: Annotated[str, typer.Option(help="The simulator's base URL.")] = "http://127.0.0.1:8090",
) -> None:
    """Run the main job on a built-in scenario against the running stack (`make demo` does it all)."""
    import asyncio

    from cli.demo import SCENARIOS, DemoError, run_demo

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    try:
        ok = asyncio.run(run_demo(scenario, api_url, sim_url))
    except DemoError as exc:
        typer.echo(f"demo stopped: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(0 if ok else 1)


@app.command()
def chaos(
    plan: Annotated[str, typer.Option(help="small (4 days of the small world, for CI) or full (the demo's month).")] = "small",
    keep: Annotated[bool, typer.Option(help="Keep the run's database and topics for a look afterwards.")] = False,
) -> None:
    """Kill services, restart Kafka and PostgreSQL, scale consumers and fail the simulator while a seeded
    foundation's hours go through the pipeline; then check the books against the seed (exit 1 on a difference)."""
    import asyncio

    from cli.chaos import PLANS, ChaosError, run_chaos

    if plan not in PLANS:
        raise typer.BadParameter(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    try:
        code = asyncio.run(run_chaos(plan, keep))
    except ChaosError as exc:
        typer.echo(f"chaos stopped: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command()
def topics(
    check: Annotated[
        bool, typer.Option("--check", help="Change nothing: report every topic's settings; exit 1 on a difference.")
    ] = False,
) -> None:
    """Create the topics of the design (and their DLQs) on KAFKA_BOOTSTRAP_SERVERS with the configured
    partitions, replication, min.insync.replicas and retention, and set those of existing topics; a topic
    whose partitions or replicas differ is reported (exit 1), never silently kept."""
    from shared.topics import TopicsError, run

    try:
        code = run(check=check)
    except TopicsError as exc:
        typer.echo(f"billing topics: {exc}", err=True)
        code = 1
    raise typer.Exit(code)


@app.command("settings-doc")
def settings_doc(
    write: Annotated[
        bool, typer.Option("--write", help="Replace the table in README.md instead of printing it.")
    ] = False,
) -> None:
    """Print the configuration table generated from the settings classes (README, "Configuration")."""
    from cli import settings_doc as doc

    if write:
        typer.echo("README.md: table " + ("rewritten" if doc.write() else "already up to date"))
    else:
        typer.echo(doc.table(), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
