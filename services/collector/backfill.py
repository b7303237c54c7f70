"""``billing backfill``: take the readings of simulated hours [from, to) against the simulator, one per
hour, in order, with a progress bar. Hours that already have a reading are left as they are."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from services.collector.app import MIGRATIONS
from services.collector.cf_client import CFClient
from services.collector.service import Collector
from services.collector.settings import CollectorSettings
from shared.clock import as_utc, hour_floor
from shared.db import create_pool, migrate
from shared.kafka import Publisher
from shared.topics import READINGS

__all__ = ["backfill"]


async def backfill(
    start: datetime, end: datetime, settings: CollectorSettings | None = None, console: Console | None = None
) -> dict[str, int]:
    s = settings or CollectorSettings()
    console = console or Console(stderr=True)
    start, end = hour_floor(as_utc(start)), as_utc(end)
    hours = []
    h = start
    while h < end:
        hours.append(h)
        h += timedelta(hours=1)
    pool = await create_pool(s.database_url.get_secret_value(), s.schema_name or "collector", max_size=4)
    publisher = Publisher(s.kafka_bootstrap_servers, client_id="collector-backfill")
    cf = CFClient(s.cf_api_url, s.uaa_url, s.client_id, s.client_secret.get_secret_value(),
                  timeout=s.request_timeout_seconds, attempts=s.retry_attempts, per_page=s.per_page)
    totals = {
        "hours": 0,
        "taken": 0,
        "existing": 0,
        "measurements": 0,
        "estimated": 0,
        "published": 0,
        "with_errors": 0,
    }
    try:
        async with pool.acquire() as conn:
            await migrate(conn, s.schema_name or "collector", MIGRATIONS)
        await publisher.start()
        collector = Collector(pool, cf, publisher, s.topic(READINGS), gap_policy=s.gap_policy,
                              max_gap_hours=s.max_gap_hours, sim_time=True, publish_chunk=s.publish_chunk)
        started = time.perf_counter()
        with Progress(
            TextColumn("[bold]backfill"), BarColumn(), MofNCompleteColumn(), TextColumn("hours"),
            TextColumn("{task.fields[rate]:>9,.0f} measurements/s"), TimeRemainingColumn(), console=console,
        ) as progress:
            task = progress.add_task("hours", total=len(hours), rate=0.0)
            for hour in hours:
                outcome = await collector.take_reading(hour, kind="periodic")
                totals["hours"] += 1
                totals["taken" if outcome.status == "taken" else "existing"] += 1
                totals["measurements"] += outcome.measurements
                totals["estimated"] += outcome.estimated
                totals["published"] += outcome.published
                totals["with_errors"] += bool(outcome.errors)
                elapsed = max(time.perf_counter() - started, 1e-6)
                progress.update(task, advance=1, rate=(totals["measurements"] + totals["estimated"]) / elapsed)
    finally:
        await cf.close()
        await publisher.stop()
        await pool.close()
    return totals


def run(start: datetime, end: datetime) -> dict[str, int]:
    return asyncio.run(backfill(start, end))
