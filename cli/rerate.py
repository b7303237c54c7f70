"""``billing rerate``: correct a price over a range of reading hours and re-price its charges (issue 18, item 3).

    billing rerate --meter M [--kind K] --from T1 --to T2 --reason TEXT
                   (--rate N --unit U --unit-of-measure X | --price-json JSON) [--no-wait] [--api-url URL] [--token T]
    billing rerate --job ID          (follow a job already started)

Sends ``POST /admin/rerate`` to the api (forwarded to the pricer, which records it as a command; an
``Idempotency-Key`` goes along so that a retry does not start a second job), then polls
``GET /admin/rerates/{id}`` and shows a progress bar (measurements looked at / measurements of the meter in
the range) until the job is done or failed. The token comes from ``--token`` or ``BILLING_TOKEN`` (scope
usage.admin); the API from ``--api-url`` or ``BILLING_API_URL``.
Exit status: 0 done (or started, with ``--no-wait``), 1 the job failed (its reason is printed), 2 bad
arguments, 3 the API refused the request or could not be reached.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import httpx
import orjson

from cli.report import ADMIN_HINTS, DEFAULT_API_URL, explain

if TYPE_CHECKING:
    import typer

__all__ = ["EXIT_API", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "register", "rerate"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_API = 0, 1, 2, 3


class _ApiError(Exception):
    pass


def _time(name: str, text: str) -> str:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise ValueError(f"{name}: {text!r} has no time zone; add Z for UTC")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _terms(rate: int | None, unit: int | None, unit_of_measure: str | None, price_json: str | None) -> dict[str, Any]:
    if price_json is not None:
        if rate is not None or unit is not None:
            raise ValueError("give either --price-json or --rate/--unit, not both")
        try:
            terms = orjson.loads(price_json)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"--price-json: not JSON ({exc})") from None
        if not isinstance(terms, dict):
            raise ValueError("--price-json: must be a JSON object (the terms of POST /admin/prices)")
        if unit_of_measure is not None:
            terms.setdefault("unit_of_measure", unit_of_measure)
        return terms
    if rate is None or unit is None or unit_of_measure is None:
        raise ValueError("the corrected terms: --rate, --unit and --unit-of-measure (flat), or --price-json")
    return {"unit_of_measure": unit_of_measure, "microcredits_per_unit": rate, "unit": unit}


def _answer(resp: httpx.Response, expected: int) -> dict[str, Any]:
    if resp.status_code != expected:
        raise _ApiError(explain(resp, ADMIN_HINTS, text_limit=300))
    job: dict[str, Any] = resp.json()
    return job


def _get(client: httpx.Client, job_id: str) -> dict[str, Any]:
    try:
        return _answer(client.get(f"/admin/rerates/{job_id}"), 200)
    except httpx.HTTPError as exc:
        raise _ApiError(f"cannot reach the API at {client.base_url}: {exc}") from None


def _follow(client: httpx.Client, job: dict[str, Any], out: IO[str], poll: float,
            sleep: Callable[[float], None]) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=out)
    columns = (TextColumn("[bold]re-rating[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("measurements"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"{job['meter']}/{job['resource_kind'] or '-'}", total=max(job["total"], 1))
        while True:
            bar.update(task, completed=job["done"], total=max(job["total"], job["done"], 1))
            if job["state"] != "running":
                return job
            sleep(poll)
            job = _get(client, job["id"])


def rerate(
    *,
    meter: str | None,
    kind: str,
    start: str | None,
    end: str | None,
    reason: str | None,
    rate: int | None,
    unit: int | None,
    unit_of_measure: str | None,
    price_json: str | None,
    job_id: str | None,
    wait: bool,
    api_url: str,
    token: str,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    transport: httpx.BaseTransport | None = None,
    poll: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Start a re-rating (or follow ``job_id``) and, unless ``wait`` is False, follow it; the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    body: dict[str, Any] | None = None
    try:
        if job_id is not None:
            if any(v is not None for v in (meter, start, end, reason, rate, unit, price_json)):
                raise ValueError("--job follows a job already started: give it alone")
            job_id = str(uuid.UUID(job_id))
        else:
            missing = [n for n, v in (("--meter", meter), ("--from", start), ("--to", end), ("--reason", reason))
                       if v is None]
            if missing:
                raise ValueError(f"missing {', '.join(missing)} (or --job ID to follow a job)")
            assert start is not None and end is not None
            body = {"meter": meter, "resource_kind": kind, "from": _time("--from", start), "to": _time("--to", end),
                    "reason": reason, "price": _terms(rate, unit, unit_of_measure, price_json)}
            if body["to"] <= body["from"]:
                raise ValueError("--to must be after --from")
    except ValueError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    if not token:
        print("error: a token is needed: --token or BILLING_TOKEN (scope usage.admin)", file=err)
        return EXIT_USAGE
    headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
    try:
        with httpx.Client(base_url=api_url, headers=headers, timeout=60, transport=transport) as client:
            if body is not None:
                key = {"idempotency-key": f"billing-rerate-{uuid.uuid4()}"}
                try:
                    job = _answer(client.post("/admin/rerate", json=body, headers=key), 202)
                except httpx.HTTPError as exc:
                    raise _ApiError(f"cannot reach the API at {client.base_url}: {exc}") from None
                print(f"re-rating job {job['id']} started: {job['meter']}/{job['resource_kind'] or '-'} "
                      f"[{job['from']}, {job['to']}), correction price {job['price']['id']}", file=out)
            else:
                assert job_id is not None
                job = _get(client, job_id)
            if not wait:
                print(f"follow it with: billing rerate --job {job['id']}", file=out)
                return EXIT_OK
            job = _follow(client, job, out, poll, sleep)
    except _ApiError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_API
    if job["state"] == "failed":
        print(f"error: re-rating job {job['id']} failed: {job['failure']}", file=err)
        return EXIT_FAILED
    print(f"done: {job['repriced']:,} charges re-priced of {job['total']:,} measurements in the range"
          + (f", {job['refused']:,} refused (amount beyond 2**62)" if job["refused"] else ""), file=out)
    return EXIT_OK


def register(app: typer.Typer) -> None:
    """Add the ``rerate`` command to a ``typer.Typer`` app."""
    import typer

    @app.command("rerate")
    def rerate_command(
        meter: str | None = typer.Option(None, "--meter", help="The meter whose price is corrected, e.g. cfapps."),
        kind: str = typer.Option("", "--kind", help="The resource kind (default: the empty kind)."),
        start: str | None = typer.Option(
            None, "--from", help="First reading hour corrected, ISO-8601 with zone, a whole hour (2026-10-01T04:00Z)."
        ),
        end: str | None = typer.Option(None, "--to", help="End of the range (exclusive), a whole hour with zone."),
        reason: str | None = typer.Option(
            None, "--reason", help="Why (1 to 500 characters): it goes with the revisions to the ledger's correction."
        ),
        rate: int | None = typer.Option(None, "--rate", help="Flat corrected price: microcredits per --unit."),
        unit: int | None = typer.Option(None, "--unit", help="How many units of the measured quantity --rate is for."),
        unit_of_measure: str | None = typer.Option(
            None, "--unit-of-measure", help="What --unit counts, e.g. MB-hour (informational)."
        ),
        price_json: str | None = typer.Option(
            None, "--price-json",
            help='The corrected terms as JSON, for graduated or volume prices: {"model": "graduated", "bands": [...], '
            '"unit": 1024, "unit_of_measure": "MB-hour"} (whole billing months only).',
        ),
        job_id: str | None = typer.Option(None, "--job", help="Follow this job (already started) instead."),
        wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job with a progress bar until it ends."),
        api_url: str = typer.Option(DEFAULT_API_URL, "--api-url", envvar="BILLING_API_URL", help="The billing API."),
        token: str = typer.Option("", "--token", envvar="BILLING_TOKEN", help="A bearer token (usage.admin)."),
    ) -> None:
        """Correct the price of a meter and kind over [--from, --to) and re-price its charges: the pricer stores
        the corrected terms as a price correction and gives every charge of the range whose price or amount changes
        a new revision (for a closed month the ledger posts it as a correction and amends the statement). Shows a
        progress bar until the job ends; exit 1 if it failed, 3 if the API refused it."""
        raise typer.Exit(rerate(
            meter=meter, kind=kind, start=start, end=end, reason=reason, rate=rate, unit=unit,
            unit_of_measure=unit_of_measure, price_json=price_json, job_id=job_id, wait=wait, api_url=api_url,
            token=token,
        ))
