"""Every SQL statement of the collector. A batch's message is stored compressed against its shard's frame
(``shared/blobs.py``); the methods here take and give it plain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from shared.blobs import Frames, scope_of
from shared.db import Conn

__all__ = ["BATCH_COLUMNS", "BatchRow", "Repository", "row_scope"]

BATCH_COLUMNS = ("hour", "meter", "shard", "part", "reading_id", "measurements", "estimated", "message")

BatchRow = tuple[Any, ...]  # in BATCH_COLUMNS order


def row_scope(row: BatchRow) -> str:
    """The frame scope of a batch row (hour, meter, shard first)."""
    return scope_of(row[1], row[2], row[0])


def _packed(frames: Frames, rows: Sequence[BatchRow]) -> list[BatchRow]:
    return [(*r[:7], frames.pack(row_scope(r), r[7])) for r in rows]


class Repository:
    def __init__(self, frames: Frames) -> None:
        self.frames = frames

    async def reading_at(self, conn: Conn, hour: datetime) -> asyncpg.Record | None:
        return await conn.fetchrow(
            "SELECT id, kind, taken_at, measurements, estimated, errors FROM readings WHERE hour = $1", hour
        )

    async def insert_reading(
        self, conn: Conn, reading_id: UUID, hour: datetime, kind: str, taken_at: datetime,
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

    async def insert_meter_runs(
        self, conn: Conn, reading_id: UUID, hour: datetime, runs: Sequence[tuple[str, bool, str | None]]
    ) -> None:
        await conn.executemany(
            "INSERT INTO meter_runs (reading_id, meter, hour, ok, error) VALUES ($1, $2, $3, $4, $5)",
            [(reading_id, meter, hour, ok, err) for meter, ok, err in runs],
        )

    async def copy_batches(self, conn: Conn, rows: Sequence[BatchRow]) -> None:
        """Store batches, each owed to the broker (the outbox) until published."""
        if rows:
            await conn.copy_records_to_table(
                "reading_batches", records=_packed(self.frames, rows), columns=BATCH_COLUMNS
            )
            await conn.copy_records_to_table(
                "reading_outbox", records=[r[:4] for r in rows], columns=("hour", "meter", "shard", "part")
            )

    async def last_ok_hour(self, conn: Conn, meter: str, before: datetime) -> datetime | None:
        last: datetime | None = await conn.fetchval(
            "SELECT max(hour) FROM meter_runs WHERE meter = $1 AND ok AND hour < $2", meter, before
        )
        return last

    async def batches_at(self, conn: Conn, meter: str, hour: datetime) -> list[bytes]:
        """The stored batches (messages) of one meter and hour."""
        rows = await conn.fetch(
            "SELECT message FROM reading_batches WHERE hour = $2 AND meter = $1 ORDER BY shard, part", meter, hour
        )
        return await self.frames.unpack_all(conn, [r["message"] for r in rows])

    async def insert_estimates(self, conn: Conn, rows: Sequence[BatchRow], taken_at: datetime) -> int:
        """Batches of estimated measurements for missed hours: their readings are created (kind 'estimated')
        when the hour has none. Idempotent: a batch stored before (same hour, meter, shard, part) is kept.
        Returns the measurements stored."""
        if not rows:
            return 0
        await conn.executemany(
            """INSERT INTO readings (id, hour, kind, taken_at) VALUES ($1, $2, 'estimated', $3)
               ON CONFLICT DO NOTHING""",
            sorted({(r[4], r[0], taken_at) for r in rows}),
        )
        await conn.execute("CREATE TEMP TABLE IF NOT EXISTS estimates_in (LIKE reading_batches) ON COMMIT DELETE ROWS")
        await conn.copy_records_to_table("estimates_in", records=_packed(self.frames, rows), columns=BATCH_COLUMNS)
        counts = await conn.fetch(
            """WITH ins AS (
                   INSERT INTO reading_batches SELECT * FROM estimates_in ON CONFLICT DO NOTHING
                   RETURNING hour, meter, shard, part, estimated),
               owed AS (INSERT INTO reading_outbox SELECT hour, meter, shard, part FROM ins)
               SELECT hour, sum(estimated)::int AS n FROM ins GROUP BY hour"""
        )
        await conn.executemany(
            "UPDATE readings SET estimated = estimated + $2 WHERE hour = $1", [(r["hour"], r["n"]) for r in counts]
        )
        return sum(r["n"] for r in counts)

    async def upsert_hierarchy(
        self, conn: Conn, seen_at: datetime,
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
                   ON CONFLICT (guid) DO UPDATE
                     SET org_guid = excluded.org_guid, name = excluded.name, seen_at = excluded.seen_at
                   WHERE (spaces.org_guid, spaces.name) IS DISTINCT FROM (excluded.org_guid, excluded.name)""",
                [(g, o, n, seen_at) for g, (o, n) in spaces.items()],
            )
        if resources:
            await conn.execute(
                """CREATE TEMP TABLE IF NOT EXISTS resources_in
                   (meter text, guid text, name text, kind text, space_guid text, seen_at timestamptz)
                   ON COMMIT DELETE ROWS"""
            )
            await conn.copy_records_to_table(
                "resources_in", records=[(*r, seen_at) for r in resources],
                columns=("meter", "guid", "name", "kind", "space_guid", "seen_at"),
            )
            await conn.execute(
                """INSERT INTO resources (meter, guid, name, kind, space_guid, seen_at)
                   SELECT DISTINCT ON (meter, guid) meter, guid, name, kind, space_guid, seen_at FROM resources_in
                   ON CONFLICT (meter, guid) DO UPDATE
                     SET name = excluded.name, kind = excluded.kind, space_guid = excluded.space_guid,
                         seen_at = excluded.seen_at
                   WHERE (resources.name, resources.kind, resources.space_guid)
                         IS DISTINCT FROM (excluded.name, excluded.kind, excluded.space_guid)"""
            )

    async def lock_unpublished(self, conn: Conn, limit: int) -> list[tuple[asyncpg.Record, bytes]]:
        """Batches the relay still owes, oldest hour first, each with its message, locked so that two relays
        never send one twice."""
        rows = await conn.fetch(
            """SELECT o.hour, o.meter, o.shard, o.part, b.message
                 FROM reading_outbox o JOIN reading_batches b USING (hour, meter, shard, part)
                ORDER BY o.hour, o.meter, o.shard, o.part LIMIT $1 FOR UPDATE OF o SKIP LOCKED""",
            limit,
        )
        return list(zip(rows, await self.frames.unpack_all(conn, [r["message"] for r in rows]), strict=True))

    async def mark_published(self, conn: Conn, keys: Sequence[tuple[datetime, str, int, int]], at: datetime) -> None:
        """The batches ``keys`` are published: out of the outbox; a reading none of whose batches is owed any
        more is published ``at``."""
        await conn.execute(
            """DELETE FROM reading_outbox o
                USING unnest($1::timestamptz[], $2::text[], $3::int2[], $4::int2[]) AS k(hour, meter, shard, part)
                WHERE o.hour = k.hour AND o.meter = k.meter AND o.shard = k.shard AND o.part = k.part""",
            [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], [k[3] for k in keys],
        )
        await conn.execute(
            """UPDATE readings r SET published_at = $2
                WHERE r.hour = ANY($1::timestamptz[]) AND r.published_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM reading_outbox o WHERE o.hour = r.hour)""",
            sorted({k[0] for k in keys}), at,
        )

    async def readings(self, conn: Conn, since: datetime, until: datetime) -> list[asyncpg.Record]:
        # A reading is published once none of its hour's batches is owed (NULL while the relay owes one).
        return await conn.fetch(
            """SELECT r.id, r.hour, r.kind, r.taken_at, r.measurements, r.estimated, r.errors,
                      CASE WHEN EXISTS (SELECT 1 FROM reading_outbox o WHERE o.hour = r.hour) THEN NULL
                           ELSE r.published_at END AS published_at
               FROM readings r
               WHERE r.hour >= $1 AND r.hour < $2
               ORDER BY r.hour""",
            since, until,
        )

    # -- completeness report ------------------------------------------------------------------------

    async def completeness_counts(
        self, conn: Conn, since: datetime, until: datetime
    ) -> list[asyncpg.Record]:
        """Per hour and meter: measurements read, estimated, and of batches published (no longer owed)."""
        return await conn.fetch(
            """SELECT b.hour, b.meter,
                      sum(b.measurements - b.estimated)::int AS read,
                      sum(b.estimated)::int AS estimated,
                      coalesce(sum(b.measurements) FILTER (WHERE o.hour IS NULL), 0)::int AS published
               FROM reading_batches b LEFT JOIN reading_outbox o USING (hour, meter, shard, part)
               WHERE b.hour >= $1 AND b.hour < $2
               GROUP BY b.hour, b.meter""",
            since, until,
        )

    async def meter_runs_between(
        self, conn: Conn, since: datetime, until: datetime
    ) -> list[asyncpg.Record]:
        return await conn.fetch("SELECT hour, meter, ok FROM meter_runs WHERE hour >= $1 AND hour < $2", since, until)

    async def first_ok_hours(self, conn: Conn) -> dict[str, datetime]:
        """The first hour each meter was read successfully (readings are expected from then on)."""
        rows = await conn.fetch("SELECT meter, min(hour) AS hour FROM meter_runs WHERE ok GROUP BY meter")
        return {r["meter"]: r["hour"] for r in rows}
