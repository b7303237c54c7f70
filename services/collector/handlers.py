"""Routes and background tasks of the collector: thin; the logic lives in service.py. The internal routes
are declared in schemas.py and bound here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from starlette.responses import Response

from services.collector import completeness, schemas
from services.collector.cf_client import CFClient
from services.collector.schemas import (
    MAX_READINGS_RANGE,
    ReadingList,
    ReadingOut,
    ReadingOutcomeOut,
    ReadingRequest,
    ReadingsQuery,
)
from services.collector.service import Collector
from services.collector.settings import CollectorSettings
from shared.audit import list_audit
from shared.clock import hour_floor, utcnow
from shared.completeness import RangeQuery, check_range
from shared.edge import INVALID_PARAMETER, Call, Operation, ProblemError, answer
from shared.runtime import Runtime
from shared.topics import READINGS

log = logging.getLogger(__name__)

__all__ = ["OPERATIONS", "start", "stop"]


def _collector(call: Call) -> Collector:
    collector: Collector = call.request.app.state.runtime.state["collector"]
    return collector


async def post_reading(call: Call) -> Response:
    body = call.body_as(ReadingRequest)
    outcome = await _collector(call).take_reading(body.hour, kind=body.kind)
    return answer(ReadingOutcomeOut.model_validate(outcome.as_json()), 201 if outcome.status == "taken" else 200)


async def list_readings(call: Call) -> Response:
    q = call.query_as(ReadingsQuery)
    now = utcnow()
    since = q.since or now - timedelta(days=2)
    until = q.until or now + timedelta(hours=1)
    if until <= since or until - since > MAX_READINGS_RANGE:
        detail = f"to: must be after from, at most {MAX_READINGS_RANGE.days} days after it"
        raise ProblemError(INVALID_PARAMETER, detail, parameter="to")
    items = await _collector(call).readings(since, until)
    return answer(ReadingList(items=[ReadingOut.model_validate(i) for i in items]))


async def completeness_counts(call: Call) -> Response:
    since, until = check_range(call.query_as(RangeQuery))
    runtime = call.request.app.state.runtime
    settings = runtime.settings
    assert isinstance(settings, CollectorSettings)
    return answer(await completeness.facts(runtime.state["collector"], settings.expected_since, since, until))


OPERATIONS: tuple[Operation, ...] = (
    schemas.TAKE_READING.bind(post_reading),
    schemas.LIST_READINGS.bind(list_readings),
    schemas.COMPLETENESS.bind(completeness_counts),
    schemas.AUDIT.bind(list_audit),
)


async def start(runtime: Runtime) -> None:
    s = runtime.settings
    assert isinstance(s, CollectorSettings)
    cf = CFClient(
        s.cf_api_url, s.uaa_url, s.client_id, s.client_secret.get_secret_value(),
        timeout=s.request_timeout_seconds, attempts=s.retry_attempts,
        refresh_margin=s.token_refresh_margin_seconds, per_page=s.per_page,
    )
    collector = Collector(
        # The service's Stream publishes like a Publisher (the parameter's annotation is the narrower one).
        runtime.pool, cf, runtime.publisher, s.topic(READINGS),  # type: ignore[arg-type]
        gap_policy=s.gap_policy, max_gap_hours=s.max_gap_hours, sim_time=s.sim_time_header,
        publish_chunk=s.publish_chunk,
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
