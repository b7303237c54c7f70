"""The collector's logic: take a reading (every meter, the hierarchy, estimates for missed hours),
persist it in one transaction as the batches it publishes (``shared.batches``: one per reading hour,
meter and shard of resources), and relay them to ``usage.readings.v2``.

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
from typing import Any, Literal, cast

import asyncpg
import orjson
from prometheus_client import Counter, Histogram

from services.collector.cf_client import CFClient
from services.collector.meters import DEFAULT_METERS, Hierarchy, Meter, MeterResult, RawMeasurement, read_hierarchy
from services.collector.repository import Repository, row_scope
from shared import ids
from shared.batches import Item, Measurements, encode_measurements, measurement_batches, read_as_written, shard_key
from shared.blobs import Frames
from shared.clock import as_utc, hour_floor, utcnow
from shared.db import Conn
from shared.kafka import Outgoing, Publisher

__all__ = ["Collector", "GapPolicy", "ReadingOutcome", "estimate"]

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
    resource_name: str = ""
    org_name: str = ""
    space_name: str = ""


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
        publish_chunk: int = 500,
    ) -> None:
        self.pool, self.cf, self.publisher, self.topic = pool, cf, publisher, topic
        self.meters = list(meters)
        self.gap_policy, self.max_gap = gap_policy, max_gap_hours
        self.sim_time = sim_time
        self.publish_chunk = publish_chunk
        self.repo = Repository(Frames())  # batches compressed against frames (shared/blobs.py), per database
        self._reading_lock = asyncio.Lock()
        self._relay_lock = asyncio.Lock()

    async def take_reading(
        self, hour: datetime | None = None, kind: Literal["periodic", "manual"] = "periodic"
    ) -> ReadingOutcome:
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
        results = await asyncio.gather(
            read_hierarchy(self.cf, at), *(m.measure(self.cf, at) for m in self.meters), return_exceptions=True
        )
        hierarchy_or_exc, meter_results = results[0], results[1:]
        if isinstance(hierarchy_or_exc, BaseException):
            if not isinstance(hierarchy_or_exc, Exception):
                raise hierarchy_or_exc
            errors.append(f"hierarchy: {hierarchy_or_exc}")
            hierarchy = Hierarchy()
        else:
            # gather types its results as one union (the hierarchy's and the meters'): the first is read_hierarchy's
            hierarchy = cast(Hierarchy, hierarchy_or_exc)

        reading_id = ids.reading_id(hour)
        taken_at = utcnow()
        runs: list[tuple[str, bool, str | None]] = []
        items: dict[tuple[str, str], list[Item]] = {}  # (meter, unit) -> items
        resources: list[tuple[str, str, str, str, str]] = []
        problems: dict[str, int] = {}
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
            for m in res.measurements:
                item, problem = self._item(m, hierarchy)
                items.setdefault((m.meter, m.unit), []).append(item)
                resources.append((m.meter, m.resource_id, m.resource_name, m.resource_kind, m.space_id))
                if problem:
                    problems[problem] = problems.get(problem, 0) + 1
        # Bad input from CF that affected measurements (kept, with what could not be resolved left empty).
        errors.extend(f"{n} measurement(s): {p}" for p, n in sorted(problems.items())[:50])
        rows = [
            _batch_row(b, part)
            for (meter, unit), its in items.items()
            for b, part in _parts(measurement_batches(hour, meter, unit, its, reading_id=reading_id, taken_at=taken_at))
        ]
        count = sum(len(its) for its in items.values())

        t_store = time.perf_counter()
        # a shard's first batch of a month is its frame (shared/blobs.py)
        await self.repo.frames.ensure_first(self.pool, rows, row_scope, lambda r: r[7])
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if not await self.repo.insert_reading(conn, reading_id, hour, kind, taken_at, count, errors):
                    existing = await self.repo.reading_at(conn, hour)
                    return ReadingOutcome(hour, "exists", existing["kind"] if existing else kind)
                await self.repo.insert_meter_runs(conn, reading_id, hour, runs)
                await self.repo.copy_batches(conn, rows)
                await self.repo.upsert_hierarchy(conn, taken_at, hierarchy.orgs, hierarchy.spaces, resources)
                estimated = await self._fill_gaps(conn, hour, runs, items, errors, taken_at)
                if errors:
                    await conn.execute(
                        "UPDATE readings SET errors = $2::jsonb WHERE id = $1", reading_id, _json_list(errors)
                    )
        for (meter_name, _), its in items.items():
            MEASUREMENTS.labels(meter_name, "false").inc(len(its))
        seconds = {"read": round(t_store - t_read, 3), "store": round(time.perf_counter() - t_store, 3)}
        return ReadingOutcome(hour, "taken", kind, count, estimated, errors, seconds=seconds)

    @staticmethod
    def _item(m: RawMeasurement, h: Hierarchy) -> tuple[Item, str | None]:
        """The measurement as a batch item, with its org and names from the hierarchy; and what could not be
        resolved (the space or the org unknown), if anything."""
        problem = m.errors
        org = ""
        space_name = ""
        if m.space_id:
            space = h.spaces.get(m.space_id)
            if space is None:
                problem = "; ".join(filter(None, [problem, "space unknown"]))
            else:
                org, space_name = space
                if org and org not in h.orgs:
                    problem = "; ".join(filter(None, [problem, "org unknown"]))
        item = Item(
            m.resource_id, m.resource_name, org, h.orgs.get(org, ""), m.space_id, space_name, m.resource_kind, m.value
        )
        return item, problem

    async def _fill_gaps(
        self, conn: Conn, hour: datetime, runs: list[tuple[str, bool, str | None]],
        items: dict[tuple[str, str], list[Item]], errors: list[str], taken_at: datetime,
    ) -> int:
        rows: list[tuple[Any, ...]] = []
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
                msg = (
                    f"{meter_name}: gap of {gap} hours since {last.isoformat()} exceeds the maximum of {self.max_gap}; "
                    "not estimated"
                )
                log.warning(msg)
                errors.append(msg)
                continue
            missing = [last + HOUR * k for k in range(1, gap + 1)]
            before: dict[str, Previous] = {}
            units: dict[str, str] = {}
            for raw in await self.repo.batches_at(conn, meter_name, last):
                b = _decode_stored(raw)
                for i, rid in enumerate(b.resource_id):
                    org, space = b.orgs[b.org[i]], b.spaces[b.space[i]]
                    before[rid] = Previous(b.kinds[b.kind[i]], org.id, space.id, b.value[i], b.unit,
                                           b.resource_name[i], org.name, space.name)
                    units[rid] = b.unit
            after = {it.resource_id: it.value for (m, _), its in items.items() if m == meter_name for it in its}
            estimates: dict[tuple[datetime, str], list[Item]] = {}
            for h, resource, prev, value in estimate(before, after, missing, self.gap_policy):
                estimates.setdefault((h, prev.unit), []).append(
                    Item(resource, prev.resource_name, prev.org_id, prev.org_name, prev.space_id, prev.space_name,
                         prev.resource_kind, value, estimated=True)
                )
            for (h, unit), its in sorted(estimates.items()):
                batches = measurement_batches(h, meter_name, unit, its, reading_id=ids.reading_id(h), taken_at=taken_at)
                rows.extend(_batch_row(b, part) for b, part in _parts(batches))
        inserted = await self.repo.insert_estimates(conn, rows, taken_at)
        if inserted:
            MEASUREMENTS.labels("all", "true").inc(inserted)
        return inserted

    async def relay(self) -> int:
        """Publish every batch not yet published (the outbox), oldest hour first; returns messages sent."""
        sent = 0
        async with self._relay_lock:
            while True:
                async with self.pool.acquire() as conn:
                    async with conn.transaction():
                        pending = await self.repo.lock_unpublished(conn, self.publish_chunk)
                        if not pending:
                            return sent
                        sent += await self.publisher.publish(
                            self.topic, [Outgoing(shard_key(r["shard"]), message) for r, message in pending]
                        )
                        await self.repo.mark_published(
                            conn, [(r["hour"], r["meter"], r["shard"], r["part"]) for r, _ in pending], utcnow()
                        )

    async def readings(self, since: datetime, until: datetime) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await self.repo.readings(conn, as_utc(since), as_utc(until))
        return [
            {
                "id": str(r["id"]),
                "hour": r["hour"].isoformat(),
                "kind": r["kind"],
                "taken_at": r["taken_at"].isoformat(),
                "measurements": r["measurements"],
                "estimated": r["estimated"],
                "errors": _parse_json(r["errors"]),
                "published_at": r["published_at"].isoformat() if r["published_at"] else None,
            }
            for r in rows
        ]


def _parts(batches: list[Measurements]) -> list[tuple[Measurements, int]]:
    """Each batch with its part number within its shard (0 unless a shard is split)."""
    out: list[tuple[Measurements, int]] = []
    part, last = 0, -1
    for b in batches:
        part = part + 1 if b.shard == last else 0
        last = b.shard
        out.append((b, part))
    return out


def _batch_row(b: Measurements, part: int) -> tuple[Any, ...]:
    """A batch as a row of reading_batches (repository.BATCH_COLUMNS; the key first)."""
    return (b.reading_hour, b.meter, b.shard, part, b.reading_id, len(b.resource_id), sum(b.estimated),
            encode_measurements(b))


def _decode_stored(raw: bytes) -> Measurements:
    """A stored batch, read as written (it was built from Cloud Foundry's answers: no item is refused here)."""
    return read_as_written(raw, Measurements)


def _json_list(items: list[str]) -> str:
    return orjson.dumps(items).decode()


def _parse_json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value
