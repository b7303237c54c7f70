"""Every SQL statement of the collector."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

__all__ = ["MEASUREMENT_COLUMNS", "Repository"]

MEASUREMENT_COLUMNS = (
    "id", "reading_id", "hour", "meter", "resource_id", "resource_kind",
    "org_id", "space_id", "value", "unit", "estimated", "errors",
)

MeasurementRow = tuple[Any, ...]  # in MEASUREMENT_COLUMNS order


class Repository:
    async def reading_at(self, conn: asyncpg.Connection, hour: datetime) -> asyncpg.Record | None:
        return await conn.fetchrow("SELECT id, kind, taken_at, measurements, estimated, errors FROM readings WHERE hour = $1", hour)

    async def insert_reading(
        self, conn: asyncpg.Connection, reading_id: UUID, hour: datetime, kind: str, taken_at: datetime,
        measurements: int, errors: list[str],
    ) -> bool:
        """False when the hour already has a reading (the one-per-hour constraint decided)."""
        row = await conn.fetchval(
            """INSERT INTO readings (id, hour, kind, taken_at, measurements, errors)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb)
               ON CONFLICT DO NOTHING  -- the id is derived from the hour: either key means "hour taken"
               RETURNING 1""",
            reading_id, hour, kind, taken_at, measurements, orjson.dumps(errors).decode(),
        )
        return row is not None

    async def insert_meter_runs(self, conn: asyncpg.Connection, reading_id: UUID, hour: datetime, runs: Sequence[tuple[str, bool, str | None]]) -> None:
        await conn.executemany(
            "INSERT INTO meter_runs (reading_id, meter, hour, ok, error) VALUES ($1, $2, $3, $4, $5)",
            [(reading_id, meter, hour, ok, err) for meter, ok, err in runs],
        )

    async def copy_measurements(self, conn: asyncpg.Connection, rows: Sequence[MeasurementRow]) -> None:
        if rows:
            await conn.copy_records_to_table("measurements", records=rows, columns=MEASUREMENT_COLUMNS)

    async def last_ok_hour(self, conn: asyncpg.Connection, meter: str, before: datetime) -> datetime | None:
        return await conn.fetchval("SELECT max(hour) FROM meter_runs WHERE meter = $1 AND ok AND hour < $2", meter, before)

    async def measurements_at(self, conn: asyncpg.Connection, meter: str, hour: datetime) -> list[asyncpg.Record]:
        return await conn.fetch(
            """SELECT resource_id, resource_kind, org_id, space_id, value, unit
               FROM measurements WHERE meter = $1 AND hour = $2""",
            meter, hour,
        )

    async def insert_estimates(self, conn: asyncpg.Connection, rows: Sequence[MeasurementRow], taken_at: datetime) -> int:
        """Estimated measurements for missed hours: their readings are created (kind 'estimated') or, when a
        failed reading holds the hour, put back in the relay's queue. Idempotent by measurement id."""
        if not rows:
            return 0
        await conn.executemany(
            """INSERT INTO readings (id, hour, kind, taken_at) VALUES ($1, $2, 'estimated', $3)
               ON CONFLICT DO NOTHING""",
            [(rid, h, taken_at) for rid, h in {(r[1], r[2]) for r in rows}],
        )
        await conn.execute("CREATE TEMP TABLE IF NOT EXISTS estimates_in (LIKE measurements) ON COMMIT DELETE ROWS")
        await conn.copy_records_to_table("estimates_in", records=rows, columns=MEASUREMENT_COLUMNS)
        counts = await conn.fetch(
            """WITH ins AS (
                   INSERT INTO measurements SELECT * FROM estimates_in ON CONFLICT (id) DO NOTHING RETURNING hour)
               SELECT hour, count(*) AS n FROM ins GROUP BY hour"""
        )
        await conn.executemany(
            "UPDATE readings SET estimated = estimated + $2, published_at = NULL WHERE hour = $1",
            [(r["hour"], r["n"]) for r in counts],
        )
        return sum(r["n"] for r in counts)

    async def upsert_hierarchy(
        self, conn: asyncpg.Connection, seen_at: datetime,
        orgs: dict[str, str], spaces: dict[str, tuple[str, str]], resources: Sequence[tuple[str, str, str, str, str]],
    ) -> None:
        """Latest names of orgs, spaces and resources; rows are written only when something changed."""
        if orgs:
            await conn.executemany(
                """INSERT INTO orgs (guid, name, seen_at) VALUES ($1, $2, $3)
                   ON CONFLICT (guid) DO UPDATE SET name = excluded.name, seen_at = excluded.seen_at
                   WHERE orgs.name IS DISTINCT FROM excluded.name""",
                [(g, n, seen_at) for g, n in orgs.items()],
            )
        if spaces:
            await conn.executemany(
                """INSERT INTO spaces (guid, org_guid, name, seen_at) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (guid) DO UPDATE SET org_guid = excluded.org_guid, name = excluded.name, seen_at = excluded.seen_at
                   WHERE (spaces.org_guid, spaces.name) IS DISTINCT FROM (excluded.org_guid, excluded.name)""",
                [(g, o, n, seen_at) for g, (o, n) in spaces.items()],
            )
        if resources:
            await conn.execute(
                """CREATE TEMP TABLE IF NOT EXISTS resources_in
                   (meter text, guid text, name text, kind text, space_guid text, seen_at timestamptz) ON COMMIT DELETE ROWS"""
            )
            await conn.copy_records_to_table(
                "resources_in", records=[(*r, seen_at) for r in resources],
                columns=("meter", "guid", "name", "kind", "space_guid", "seen_at"),
            )
            await conn.execute(
                """INSERT INTO resources (meter, guid, name, kind, space_guid, seen_at)
                   SELECT DISTINCT ON (meter, guid) meter, guid, name, kind, space_guid, seen_at FROM resources_in
                   ON CONFLICT (meter, guid) DO UPDATE
                     SET name = excluded.name, kind = excluded.kind, space_guid = excluded.space_guid, seen_at = excluded.seen_at
                   WHERE (resources.name, resources.kind, resources.space_guid)
                         IS DISTINCT FROM (excluded.name, excluded.kind, excluded.space_guid)"""
            )

    async def lock_unpublished(self, conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
        """Readings the relay still owes, oldest first, locked so that two relays never send one twice."""
        return await conn.fetch(
            """SELECT id, hour FROM readings WHERE published_at IS NULL
               ORDER BY hour LIMIT $1 FOR UPDATE SKIP LOCKED""",
            limit,
        )

    async def measurements_to_publish(self, conn: asyncpg.Connection, reading_id: UUID) -> list[asyncpg.Record]:
        return await conn.fetch(
            """SELECT m.id, m.reading_id, m.hour, m.meter, m.resource_id, m.resource_kind,
                      coalesce(r.name, '') AS resource_name, m.org_id, coalesce(o.name, '') AS org_name,
                      m.space_id, coalesce(s.name, '') AS space_name, m.value, m.unit, m.estimated, rd.taken_at
               FROM measurements m
               JOIN readings rd ON rd.id = m.reading_id
               LEFT JOIN resources r ON r.meter = m.meter AND r.guid = m.resource_id
               LEFT JOIN spaces s ON s.guid = m.space_id
               LEFT JOIN orgs o ON o.guid = m.org_id
               WHERE m.reading_id = $1""",
            reading_id,
        )

    async def mark_published(self, conn: asyncpg.Connection, reading_id: UUID, at: datetime) -> None:
        await conn.execute("UPDATE readings SET published_at = $2 WHERE id = $1", reading_id, at)

    async def readings(self, conn: asyncpg.Connection, since: datetime, until: datetime) -> list[asyncpg.Record]:
        return await conn.fetch(
            """SELECT id, hour, kind, taken_at, measurements, estimated, errors, published_at
               FROM readings WHERE hour >= $1 AND hour < $2 ORDER BY hour""",
            since, until,
        )

    # -- completeness report ------------------------------------------------------------------------

    async def completeness_counts(
        self, conn: asyncpg.Connection, since: datetime, until: datetime
    ) -> list[asyncpg.Record]:
        """Per hour and meter: measurements read, estimated, and of readings marked published (the outbox
        marks a whole reading; estimates added to it later put it back in the queue)."""
        return await conn.fetch(
            """SELECT m.hour, m.meter,
                      count(*) FILTER (WHERE NOT m.estimated) AS read,
                      count(*) FILTER (WHERE m.estimated) AS estimated,
                      count(*) FILTER (WHERE r.published_at IS NOT NULL) AS published
               FROM measurements m JOIN readings r ON r.id = m.reading_id
               WHERE m.hour >= $1 AND m.hour < $2
               GROUP BY m.hour, m.meter""",
            since, until,
        )

    async def meter_runs_between(
        self, conn: asyncpg.Connection, since: datetime, until: datetime
    ) -> list[asyncpg.Record]:
        return await conn.fetch("SELECT hour, meter, ok FROM meter_runs WHERE hour >= $1 AND hour < $2", since, until)

    async def first_ok_hours(self, conn: asyncpg.Connection) -> dict[str, datetime]:
        """The first hour each meter was read successfully (readings are expected from then on)."""
        rows = await conn.fetch("SELECT meter, min(hour) AS hour FROM meter_runs WHERE ok GROUP BY meter")
        return {r["meter"]: r["hour"] for r in rows}
