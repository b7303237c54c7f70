"""``billing``: start each part of the system, and the tools around it.

Each service subcommand runs one service in the foreground until SIGTERM/SIGINT; configuration comes
from the environment (see README, "Configuration").
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Usage billing for a Cloud Foundry platform.", no_args_is_help=True, add_completion=False)


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


@app.command()
def topics() -> None:
    """Create the topics of the design (and their DLQs) on KAFKA_BOOTSTRAP_SERVERS."""
    from shared.topics import main

    main()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
