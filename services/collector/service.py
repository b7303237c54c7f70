"""The collector's logic: take a reading (every meter, the hierarchy, estimates for missed hours),
persist it in one transaction, and relay it to ``usage.readings.v1``.

Estimation for missed hours: for resources measured on both sides of a gap, policy ``previous`` repeats
the value before the gap, ``linear`` interpolates (rounded half up), ``none`` produces nothing. Gaps longer
than ``max_gap_hours`` are reported on the reading, never filled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg
import orjson
from prometheus_client import Counter, Histogram

from services.collector.cf_client import CFClient
from services.collector.meters import DEFAULT_METERS, Hierarchy, Meter, MeterResult, RawMeasurement, read_hierarchy
from services.collector.repository import Repository
from shared import ids
from shared.clock import as_utc, hour_floor, utcnow
from shared.contracts import MeasurementTaken
from shared.kafka import Outgoing, Publisher, encode

__all__ = ["Collector", "ReadingOutcome", "estimate", "GapPolicy"]

log = logging.getLogger(__name__)

READINGS = Counter("collector_readings_total", "Readings taken", ["kind", "outcome"])
MEASUREMENTS = Counter("collector_measurements_total", "Measurements stored", ["meter", "estimated"])
READING_SECONDS = Histogram("collector_reading_seconds", "Time to read, persist and publish one reading",
                            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 60, 120))

GapPolicy = Literal["previous", "linear", "none"]
HOUR = timedelta(hours=1)


@dataclass
class ReadingOutcome:
    hour: datetime
    status: Literal["taken", "exists"]
    kind: str
    measurements: int = 0
    estimated: int = 0
    errors: list[str] = field(default_factory=list)
    published: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "hour": self.hour.isoformat(), "status": self.status, "kind": self.kind,
            "measurements": self.measurements, "estimated": self.estimated,
            "errors": self.errors, "published": self.published, "seconds": self.seconds,
            **({"detail": "this hour already has a reading; nothing was done"} if self.status == "exists" else {}),
        }


@dataclass(frozen=True, slots=True)
class Previous:
    resource_kind: str
    org_id: str
    space_id: str
    value: int
    unit: str


def _interpolate(a: int, b: int, k: int, n: int) -> int:
    """Value k of n missing hours between a and b, rounded half up, exactly (integers only)."""
    num = a * (n + 1) + (b - a) * k
    return (2 * num + (n + 1)) // (2 * (n + 1))


def estimate(
    before: dict[str, Previous], after: dict[str, int], missing: Sequence[datetime], policy: GapPolicy
) -> list[tuple[datetime, str, Previous, int]]:
    """(hour, resource, attributes, value) for every missing hour and every resource present on both sides."""
    if policy == "none":
        return []
    out = []
    n = len(missing)
    for resource, prev in before.items():
        if resource not in after:
            continue
        for k, hour in enumerate(missing, start=1):
            value = prev.value if policy == "previous" else _interpolate(prev.value, after[resource], k, n)
            out.append((hour, resource, prev, value))
    return out


class Collector:
    def __init__(
        self,
        pool: asyncpg.Pool,
        cf: CFClient,
        publisher: Publisher,
        topic: str,
        *,
        meters: Sequence[Meter] = DEFAULT_METERS,
        gap_policy: GapPolicy = "previous",
        max_gap_hours: int = 72,
        sim_time: bool = False,
        publish_chunk: int = 20_000,
    ) -> None:
        self.pool, self.cf, self.publisher, self.topic = pool, cf, publisher, topic
        self.meters = list(meters)
        self.gap_policy, self.max_gap = gap_policy, max_gap_hours
        self.sim_time = sim_time
        self.publish_chunk = publish_chunk
        self.repo = Repository()
        self._reading_lock = asyncio.Lock()
        self._relay_lock = asyncio.Lock()

    async def take_reading(self, hour: datetime | None = None, kind: Literal["periodic", "manual"] = "periodic") -> ReadingOutcome:
        """Read every meter for ``hour`` (default: now), persist, publish. One reading per hour: a second
        one for the same hour is a no-op that says so."""
        started = time.perf_counter()
        hour = hour_floor(hour or utcnow())
        async with self._reading_lock:
            async with self.pool.acquire() as conn:
                existing = await self.repo.reading_at(conn, hour)
            if existing is not None:
                READINGS.labels(kind, "exists").inc()
                return ReadingOutcome(hour, "exists", existing["kind"], existing["measurements"], existing["estimated"])
            outcome = await self._read_and_store(hour, kind)
        t = time.perf_counter()
        outcome.published = await self.relay()
        outcome.seconds["publish"] = round(time.perf_counter() - t, 3)
        READINGS.labels(kind, outcome.status).inc()
        READING_SECONDS.observe(time.perf_counter() - started)
        return outcome

    async def _read_and_store(self, hour: datetime, kind: str) -> ReadingOutcome:
        at = hour if self.sim_time else None
        errors: list[str] = []
        t_read = time.perf_counter()
        results = await asyncio.gather(read_hierarchy(self.cf, at), *(m.measure(self.cf, at) for m in self.meters), return_exceptions=True)
        hierarchy_or_exc, meter_results = results[0], results[1:]
        if isinstance(hierarchy_or_exc, BaseException):
            if not isinstance(hierarchy_or_exc, Exception):
                raise hierarchy_or_exc
            errors.append(f"hierarchy: {hierarchy_or_exc}")
            hierarchy = Hierarchy()
        else:
            hierarchy = hierarchy_or_exc

        reading_id = ids.reading_id(hour)
        taken_at = utcnow()
        runs: list[tuple[str, bool, str | None]] = []
        rows: list[tuple[Any, ...]] = []
        resources: list[tuple[str, str, str, str, str]] = []
        for meter, res in zip(self.meters, meter_results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, Exception):
                    raise res
                log.warning("meter failed", extra={"meter": meter.name, "hour": hour.isoformat(), "error": str(res)})
                errors.append(f"{meter.name}: {res}")
                runs.append((meter.name, False, str(res)[:2000]))
                continue
            assert isinstance(res, MeterResult)
            runs.append((meter.name, True, None))
            for sg, val in res.spaces.items():
                hierarchy.spaces.setdefault(sg, val)
            make_id = ids.measurement_ids(hour, meter.name)
            for m in res.measurements:
                rows.append(self._row(reading_id, hour, make_id(m.resource_id), m, hierarchy))
                resources.append((m.meter, m.resource_id, m.resource_name, m.resource_kind, m.space_id))

        t_store = time.perf_counter()
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if not await self.repo.insert_reading(conn, reading_id, hour, kind, taken_at, len(rows), errors):
                    existing = await self.repo.reading_at(conn, hour)
                    return ReadingOutcome(hour, "exists", existing["kind"] if existing else kind)
                await self.repo.insert_meter_runs(conn, reading_id, hour, runs)
                await self.repo.copy_measurements(conn, rows)
                await self.repo.upsert_hierarchy(conn, taken_at, hierarchy.orgs, hierarchy.spaces, resources)
                estimated = await self._fill_gaps(conn, hour, runs, rows, errors, taken_at)
                if errors:
                    await conn.execute("UPDATE readings SET errors = $2::jsonb WHERE id = $1", reading_id, _json_list(errors))
        for meter_name, ok, _ in runs:
            if ok:
                MEASUREMENTS.labels(meter_name, "false").inc(sum(1 for r in rows if r[3] == meter_name))
        seconds = {"read": round(t_store - t_read, 3), "store": round(time.perf_counter() - t_store, 3)}
        return ReadingOutcome(hour, "taken", kind, len(rows), estimated, errors, seconds=seconds)

    @staticmethod
    def _row(reading_id: Any, hour: datetime, measurement_id: Any, m: RawMeasurement, h: Hierarchy) -> tuple[Any, ...]:
        errors = m.errors
        org = ""
        if m.space_id:
            space = h.spaces.get(m.space_id)
            if space is None:
                errors = "; ".join(filter(None, [errors, f"space {m.space_id} unknown"]))
            else:
                org = space[0]
                if org and org not in h.orgs:
                    errors = "; ".join(filter(None, [errors, f"org {org} unknown"]))
        return (measurement_id, reading_id, hour, m.meter, m.resource_id,
                m.resource_kind, org, m.space_id, m.value, m.unit, False, errors)

    async def _fill_gaps(
        self, conn: asyncpg.Connection, hour: datetime, runs: list[tuple[str, bool, str | None]],
        rows: list[tuple[Any, ...]], errors: list[str], taken_at: datetime,
    ) -> int:
        estimated_rows: list[tuple[Any, ...]] = []
        for meter_name, ok, _ in runs:
            if not ok:
                continue
            last = await self.repo.last_ok_hour(conn, meter_name, hour)
            if last is None:
                continue
            gap = int((hour - last) / HOUR) - 1
            if gap <= 0:
                continue
            if gap > self.max_gap:
                msg = f"{meter_name}: gap of {gap} hours since {last.isoformat()} exceeds the maximum of {self.max_gap}; not estimated"
                log.warning(msg)
                errors.append(msg)
                continue
            missing = [last + HOUR * k for k in range(1, gap + 1)]
            before = {
                r["resource_id"]: Previous(r["resource_kind"], r["org_id"], r["space_id"], r["value"], r["unit"])
                for r in await self.repo.measurements_at(conn, meter_name, last)
            }
            after = {r[4]: r[8] for r in rows if r[3] == meter_name}
            for h, resource, prev, value in estimate(before, after, missing, self.gap_policy):
                estimated_rows.append((ids.measurement_id(h, meter_name, resource), ids.reading_id(h), h, meter_name,
                                       resource, prev.resource_kind, prev.org_id, prev.space_id, value, prev.unit, True, None))
        inserted = await self.repo.insert_estimates(conn, estimated_rows, taken_at)
        if inserted:
            MEASUREMENTS.labels("all", "true").inc(inserted)
        return inserted

    async def relay(self) -> int:
        """Publish every reading not yet published (the outbox), oldest first; returns messages sent."""
        sent = 0
        async with self._relay_lock:
            while True:
                async with self.pool.acquire() as conn:
                    async with conn.transaction():
                        pending = await self.repo.lock_unpublished(conn, 1)
                        if not pending:
                            return sent
                        reading = pending[0]
                        rows = await self.repo.measurements_to_publish(conn, reading["id"])
                        for i in range(0, len(rows), self.publish_chunk):
                            sent += await self.publisher.publish(self.topic, (_message(r) for r in rows[i:i + self.publish_chunk]))
                        await self.repo.mark_published(conn, reading["id"], utcnow())

    async def readings(self, since: datetime, until: datetime) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await self.repo.readings(conn, as_utc(since), as_utc(until))
        return [
            {"id": str(r["id"]), "hour": r["hour"].isoformat(), "kind": r["kind"], "taken_at": r["taken_at"].isoformat(),
             "measurements": r["measurements"], "estimated": r["estimated"], "errors": _parse_json(r["errors"]),
             "published_at": r["published_at"].isoformat() if r["published_at"] else None}
            for r in rows
        ]


def _message(r: asyncpg.Record) -> Outgoing:
    # Built without validation: every field comes typed from our own table (tests check the bytes
    # against the validating model).
    m = MeasurementTaken.model_construct(
        id=r["id"], reading_id=r["reading_id"], reading_hour=r["hour"], meter=r["meter"], resource_id=r["resource_id"],
        resource_kind=r["resource_kind"], resource_name=r["resource_name"], org_id=r["org_id"], org_name=r["org_name"],
        space_id=r["space_id"], space_name=r["space_name"], value=r["value"], unit=r["unit"], estimated=r["estimated"],
        taken_at=r["taken_at"], schema_name="usage.measurement", schema_version=1,
    )
    return Outgoing(key=r["resource_id"].encode(), value=encode(m))


def _json_list(items: list[str]) -> str:
    return orjson.dumps(items).decode()


def _parse_json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value
