"""Routes and background tasks of the collector: thin; the logic lives in service.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.collector import completeness
from services.collector.cf_client import CFClient
from services.collector.schemas import ReadingRequest
from services.collector.service import Collector
from services.collector.settings import CollectorSettings
from shared.audit import audit_route
from shared.clock import as_utc, hour_floor, utcnow
from shared.commands import command
from shared.http import ORJSONResponse, ProblemError, read_json
from shared.runtime import Runtime
from shared.topics import READINGS

log = logging.getLogger(__name__)


def _collector(request: Request) -> Collector:
    collector: Collector = request.app.state.runtime.state["collector"]
    return collector


async def post_reading(request: Request) -> Response:
    body: ReadingRequest = await read_json(request, ReadingRequest)
    if body.hour is not None and body.hour > utcnow() + timedelta(minutes=5):
        raise ProblemError(422, "Invalid request body", "hour: cannot read an hour in the future")
    outcome = await _collector(request).take_reading(body.hour, kind=body.kind)
    return ORJSONResponse(outcome.as_json(), status_code=201 if outcome.status == "taken" else 200)


def _time_param(request: Request, name: str, default: datetime) -> datetime:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ProblemError(400, "Invalid query parameter", f"{name}: not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise ProblemError(400, "Invalid query parameter", f"{name}: give a time zone (e.g. Z)")
    try:
        return as_utc(value)
    except ValueError as exc:  # e.g. year 1 with a positive offset: before the first UTC datetime
        raise ProblemError(400, "Invalid query parameter", f"{name}: {exc}") from None


async def list_readings(request: Request) -> Response:
    now = utcnow()
    since = _time_param(request, "from", now - timedelta(days=2))
    until = _time_param(request, "to", now + timedelta(hours=1))
    return ORJSONResponse({"items": await _collector(request).readings(since, until)})


def routes() -> list[BaseRoute]:
    return [
        # A command (shared/commands.py): audited, idempotent under an Idempotency-Key.
        Route("/internal/readings", command("collector.reading.take")(post_reading), methods=["POST"]),
        Route("/internal/readings", list_readings, methods=["GET"]),
        Route("/internal/completeness", completeness.completeness, methods=["GET"]),
        audit_route(),
    ]


async def start(runtime: Runtime) -> None:
    s = runtime.settings
    assert isinstance(s, CollectorSettings)
    cf = CFClient(
        s.cf_api_url, s.uaa_url, s.client_id, s.client_secret.get_secret_value(),
        timeout=s.request_timeout_seconds, attempts=s.retry_attempts,
        refresh_margin=s.token_refresh_margin_seconds, per_page=s.per_page,
    )
    collector = Collector(
        runtime.pool, cf, runtime.publisher, s.topic(READINGS),
        gap_policy=s.gap_policy, max_gap_hours=s.max_gap_hours, sim_time=s.sim_time_header, publish_chunk=s.publish_chunk,
    )
    runtime.state["collector"] = collector
    tasks = [asyncio.create_task(_relay_loop(collector), name="relay")]
    if s.schedule_enabled:
        tasks.append(asyncio.create_task(_schedule(collector, s.schedule_minute), name="schedule"))
    runtime.state["tasks"] = tasks


async def stop(runtime: Runtime) -> None:
    for task in runtime.state.get("tasks", []):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    collector = runtime.state.get("collector")
    if collector is not None:
        await collector.cf.close()


async def _relay_loop(collector: Collector, every: float = 15.0) -> None:
    """Publish what a crash (or a broker outage) left unpublished: at start, then every few seconds."""
    while True:
        try:
            sent = await collector.relay()
            if sent:
                log.info("relay published pending measurements", extra={"messages": sent})
        except Exception:
            log.exception("relay failed; will retry")
        await asyncio.sleep(every)


async def _schedule(collector: Collector, minute: int) -> None:
    """A periodic reading every hour at ``minute``; at start, the current hour if its time has come."""
    while True:
        now = utcnow()
        due = hour_floor(now) + timedelta(minutes=minute)
        if now < due:
            await asyncio.sleep((due - now).total_seconds())
        try:
            outcome = await collector.take_reading(hour_floor(utcnow()), kind="periodic")
            log.info("periodic reading", extra=outcome.as_json())
        except Exception:
            log.exception("periodic reading failed; the next one fills the gap")
        nxt = hour_floor(utcnow()) + timedelta(hours=1, minutes=minute)
        await asyncio.sleep(max(1.0, (nxt - utcnow()).total_seconds()))
