"""``billing completeness``: did anything fall through the cracks? The api's completeness report
(``GET /admin/completeness``) per reading hour and meter: measurements read, estimated, published, priced,
unpriced, dead-lettered, posted and held, and every row where they do not reconcile or a reading is missing
(the rules: ``services/api/completeness.py``).

    billing completeness --from T1 --to T2 [--json] [--all] [--api-url URL] [--token T]

T1 and T2 are ISO-8601 times with a zone; the report covers the whole UTC hours in [T1, T2), at most 31
days. The table lists the flagged rows (``--all``: every row), then the totals and the dead-letter topics;
``--json`` prints the api's answer as it came. The token comes from ``--token`` or ``BILLING_TOKEN`` (scope
usage.admin); the API from ``--api-url`` or ``BILLING_API_URL``.
Exit status: 0 everything reconciles, 1 something does not, 2 bad arguments, 3 the API refused or could
not be reached.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import httpx
import orjson

from cli.report import ADMIN_HINTS, DEFAULT_API_URL, explain

if TYPE_CHECKING:
    import typer

__all__ = ["EXIT_API", "EXIT_FLAGGED", "EXIT_OK", "EXIT_USAGE", "completeness", "register"]

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_API = 0, 1, 2, 3

COLUMNS = (
    ("read", "Read"),
    ("estimated", "Est."),
    ("published", "Published"),
    ("priced", "Priced"),
    ("unpriced", "Unpriced"),
    ("dead_lettered_at_pricer", "DLQ pricer"),
    ("posted", "Posted"),
    ("held", "Held"),
    ("dead_lettered_at_ledger", "DLQ ledger"),
)


def _time(name: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise ValueError(f"{name}: {text!r} has no time zone; add Z for UTC")
    return value.astimezone(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def fetch(client: httpx.Client, start: datetime, end: datetime) -> dict[str, Any]:
    try:
        resp = client.get("/admin/completeness", params={"from": _iso(start), "to": _iso(end)})
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot reach the API at {client.base_url}: {exc}") from None
    if resp.status_code != 200:
        raise ConnectionError(explain(resp, ADMIN_HINTS))
    report: dict[str, Any] = resp.json()
    return report


def _status(row: dict[str, Any]) -> str:
    if row["reconciles"]:
        return "[green]ok[/green]"
    return "[red]" + ", ".join(p["rule"] for p in row["problems"]) + "[/red]"


def render_table(report: dict[str, Any], out: IO[str], every_row: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=max(140, Console(file=out).width))
    shown = [r for r in report["rows"] if every_row or not r["reconciles"]]
    meters = ", ".join(report["meters"]) or "none"
    title = f"Completeness {report['from']} – {report['to']} ({report['hours']} hours, meters: {meters})"
    table = Table(title=title)
    table.add_column("Hour (UTC)")
    table.add_column("Meter")
    table.add_column("Reading")
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    table.add_column("Status")
    for r in shown:
        table.add_row(r["hour"], r["meter"], r["reading"], *(f"{r[k]:,}" for k, _ in COLUMNS), _status(r))
    table.add_section()
    totals = report["totals"]
    table.add_row("[bold]Total[/bold]", "", "", *(f"[bold]{totals[k]:,}[/bold]" for k, _ in COLUMNS), "")
    console.print(table)
    if not every_row:
        console.print(f"{len(report['rows']) - len(shown)} reconciling rows not shown (--all shows them).")
    for r in shown:
        for p in r["problems"]:
            console.print(f"[red]{r['hour']} {r['meter']}[/red] {p['rule']}: {p['detail']}", highlight=False)
    for d in report["dead_letters"]:
        state = "" if d["complete"] else " [red](not read completely)[/red]"
        console.print(
            f"{d['topic']} ({', '.join(d['consumer_groups'])}): {d['counted']:,} dead-lettered, "
            f"{d['unattributed']:,} without an hour and meter{state}",
            highlight=False,
        )
    for problem in report["problems"]:
        console.print(f"[red]{problem}[/red]", highlight=False)
    verdict = (
        "[green]Every hour reconciles.[/green]"
        if report["reconciles"]
        else f"[red]{report['flagged']:,} row(s) do not reconcile "
        f"({report['missing_readings']:,} missing readings).[/red]"
    )
    console.print(verdict)


def completeness(
    start_text: str,
    end_text: str,
    api_url: str,
    token: str,
    *,
    as_json: bool = False,
    every_row: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Print the report of [start, end); returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        start, end = _time("--from", start_text), _time("--to", end_text)
    except ValueError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    if end <= start:
        print("error: --to must be after --from", file=err)
        return EXIT_USAGE
    if not token:
        print("error: a token is needed: --token or BILLING_TOKEN (scope usage.admin)", file=err)
        return EXIT_USAGE
    headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
    try:
        with httpx.Client(base_url=api_url, headers=headers, timeout=120, transport=transport) as client:
            report = fetch(client, start, end)
    except ConnectionError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_API
    if as_json:
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_table(report, out, every_row)
    return EXIT_OK if report["reconciles"] else EXIT_FLAGGED


def register(app: typer.Typer) -> None:
    """Add the ``completeness`` command to a ``typer.Typer`` app."""
    import typer

    @app.command("completeness")
    def completeness_command(
        start: str = typer.Option(..., "--from", help="Start (inclusive), ISO-8601 with zone, e.g. 2026-10-01T04:00Z."),
        end: str = typer.Option(..., "--to", help="End (exclusive), ISO-8601 with zone; at most 31 days after --from."),
        as_json: bool = typer.Option(False, "--json", help="Print the API's JSON answer instead of a table."),
        every_row: bool = typer.Option(False, "--all", help="List every row, not only those that do not reconcile."),
        api_url: str = typer.Option(DEFAULT_API_URL, "--api-url", envvar="BILLING_API_URL", help="The billing API."),
        token: str = typer.Option("", "--token", envvar="BILLING_TOKEN", help="A bearer token (usage.admin)."),
    ) -> None:
        """Per hour and meter: read, estimated, published, priced, unpriced, posted, held, dead-lettered;
        exit 1 if any hour does not reconcile."""
        raise typer.Exit(completeness(start, end, api_url, token, as_json=as_json, every_row=every_row))
