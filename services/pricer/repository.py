"""Every SQL statement of the pricer. Functions take a connection; the caller owns the transaction.

Charges are stored per shard (reading hour, meter, shard), a batch message per row (``charge_batches``),
compressed against the shard's frame (``shared/blobs.py``): the functions here take and give messages plain.

Catalog consistency: every writer of charges (a readings batch, a re-pricing chunk) holds the catalog
lock in SHARED mode for its transaction and reads the catalog inside it; every catalog change holds it
EXCLUSIVE. So a change waits for the batches priced with the old catalog to commit, and no batch
commits charges priced with a catalog older than the last committed change: a new price never misses
an unpriced charge that a concurrent batch was writing, and an end never misses a charge just priced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

from services.pricer.pricing import Price, RerateJob
from shared.batches import ShardKey
from shared.blobs import Frames, shard_scope
from shared.db import Conn
from shared.price_models import PriceModel, from_document, to_document

__all__ = [
    "CATALOG_LOCK",
    "BatchRow",
    "ConcurrentShardWriteError",
    "add_priced_hours",
    "add_unpriced",
    "advance_rerate",
    "all_batches",
    "assignment_shards",
    "catalog_version",
    "completeness_counts",
    "count_measurements",
    "count_unpriced",
    "covered_unpriced",
    "delete_unpriced",
    "end_price",
    "fail_rerate",
    "finish_rerate",
    "get_price",
    "get_price_for_update",
    "get_rerate",
    "insert_assignments",
    "insert_batches",
    "insert_price",
    "insert_rerate",
    "last_priced_hour",
    "list_prices",
    "list_rerates",
    "load_assignments",
    "load_prices",
    "load_shards",
    "lock_catalog_exclusive",
    "lock_catalog_shared",
    "lock_rerate",
    "lock_shards",
    "mark_published",
    "next_rerate",
    "overlapping_prices",
    "rerate_shards",
    "take_unpublished",
    "unpriced_after",
    "versions",
]

# Two-key advisory lock (a key space apart from the single-bigint keys other code may use).
_LOCK_CLASS, _LOCK_OBJECT = 0x70726963, 1  # "pric", catalog
CATALOG_LOCK = (_LOCK_CLASS, _LOCK_OBJECT)


async def lock_catalog_shared(conn: Conn) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)", _LOCK_CLASS, _LOCK_OBJECT)


async def lock_catalog_exclusive(conn: Conn, timeout_ms: int) -> None:
    """Raises asyncpg.LockNotAvailableError after ``timeout_ms`` (for the rest of the transaction too)."""
    await conn.execute(f"SET LOCAL lock_timeout = {int(timeout_ms)}")  # SET takes no parameters
    await conn.execute("SELECT pg_advisory_xact_lock($1::int4, $2::int4)", _LOCK_CLASS, _LOCK_OBJECT)


async def catalog_version(conn: Conn) -> int:
    return int(await conn.fetchval("SELECT version FROM catalog_state"))


async def versions(conn: Conn) -> tuple[int, int]:
    """The catalog's version and the assignments' (one query: the hot path asks at every batch)."""
    row = await conn.fetchrow("SELECT c.version AS c, a.version AS a FROM catalog_state c, assignments_state a")
    assert row is not None  # both tables hold their one row from their migrations on
    return int(row["c"]), int(row["a"])


async def load_assignments(conn: Conn) -> list[tuple[str, datetime, str, str]]:
    """Every org assignment the pricer received: (org, starts_at, customer id as text, tier)."""
    rows = await conn.fetch("SELECT org_id, starts_at, customer_id::text AS customer_id, tier FROM org_assignments")
    return [(r["org_id"], r["starts_at"], r["customer_id"], r["tier"]) for r in rows]


async def insert_assignments(
    conn: Conn, rows: Sequence[tuple[UUID, str, datetime, UUID, str, datetime]]
) -> list[tuple[UUID, str, datetime, UUID, str] | None]:
    """Store assignments (id, org, starts_at, customer, tier, assigned_at), a redelivered one changing nothing;
    bumps the assignments' version when any is new. Per row: None when stored (now or before, the same), else
    the stored (id, org, starts_at, customer, tier) it contradicts (another id or content for that org and
    instant)."""
    out: list[tuple[UUID, str, datetime, UUID, str] | None] = []
    added = False
    for aid, org, starts, customer, tier, assigned in rows:
        new = await conn.fetchval(
            """INSERT INTO org_assignments (id, org_id, starts_at, customer_id, tier, assigned_at)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true""",
            aid, org, starts, customer, tier, assigned,
        )
        if new:
            added = True
            out.append(None)
            continue
        have = await conn.fetchrow(
            """SELECT id, org_id, starts_at, customer_id, tier FROM org_assignments
               WHERE (org_id = $1 AND starts_at = $2) OR id = $3 LIMIT 1""",
            org, starts, aid,
        )
        assert have is not None  # the insert conflicted with it
        held = (UUID(int=have["id"].int), have["org_id"], have["starts_at"], UUID(int=have["customer_id"].int),
                have["tier"])
        out.append(None if held == (aid, org, starts, customer, tier) else held)
    if added:
        await conn.execute("UPDATE assignments_state SET version = version + 1")
    return out


async def assignment_shards(
    conn: Conn, meters: Sequence[str], since: datetime, until: datetime | None, after: ShardKey | None, limit: int
) -> list[ShardKey]:
    """The shards of ``meters`` with a reading hour in [since, until) (until None: no end), in (hour, meter,
    shard) order after ``after``."""
    rows = await conn.fetch(
        """SELECT DISTINCT reading_hour, meter, shard FROM charge_batches
           WHERE meter = ANY($1::text[]) AND reading_hour >= $2 AND ($3::timestamptz IS NULL OR reading_hour < $3)
             AND ($4::timestamptz IS NULL OR (reading_hour, meter, shard) > ($4, $5::text, $6::int2))
           ORDER BY reading_hour, meter, shard
           LIMIT $7""",
        list(meters), since, until,
        after.reading_hour if after else None, after.meter if after else None, after.shard if after else None,
        limit,
    )
    return [ShardKey(r["reading_hour"], r["meter"], r["shard"]) for r in rows]


async def _bump_catalog_version(conn: Conn) -> None:
    await conn.execute("UPDATE catalog_state SET version = version + 1")


_PRICE_COLUMNS = """id, meter, resource_kind, unit_of_measure, microcredits_per_unit, unit,
    lower(valid_during) AS valid_from, upper(valid_during) AS valid_until, created_at, model, bands::text AS bands,
    correction, scope_kind, scope_id"""


def _uuid(value: UUID | None) -> UUID | None:
    """asyncpg's own UUID subclass as a plain uuid.UUID (orjson serialises only the latter)."""
    return None if value is None else UUID(int=value.int)


def _model(r: asyncpg.Record) -> PriceModel:
    """A row's price model, read through ``shared.price_models`` (the table holds its JSON form)."""
    if r["model"] == "flat":
        return PriceModel.flat(r["microcredits_per_unit"])
    return from_document({"model": r["model"], "bands": json.loads(r["bands"])})


def _bands(price: Price) -> str | None:
    """The JSON of a price's bands as the table holds them (null for flat)."""
    return None if price.flat else json.dumps(to_document(price.model)["bands"])


def _price(r: asyncpg.Record) -> Price:
    return Price(
        id=UUID(int=r["id"].int),
        meter=r["meter"],
        resource_kind=r["resource_kind"],
        unit_of_measure=r["unit_of_measure"],
        microcredits_per_unit=r["microcredits_per_unit"],
        unit=r["unit"],
        valid_from=r["valid_from"],
        valid_until=r["valid_until"],
        created_at=r["created_at"],
        model=_model(r),
        correction=r["correction"],
        scope_kind=r["scope_kind"],
        scope_id=r["scope_id"],
    )


async def load_prices(conn: Conn) -> list[Price]:
    """The whole catalog (it is small: a few prices per meter and kind)."""
    return [_price(r) for r in await conn.fetch(f"SELECT {_PRICE_COLUMNS} FROM prices")]


async def insert_price(conn: Conn, price: Price) -> Price:
    """Insert ``price`` and bump the catalog version. Raises asyncpg.ExclusionViolationError on an
    overlap with a price of the same (meter, kind)."""
    key_id = await conn.fetchval(
        """WITH new AS (
               INSERT INTO price_keys (meter, resource_kind, scope_kind, scope_id) VALUES ($1, $2, $3, $4)
               ON CONFLICT (meter, resource_kind, scope_kind, scope_id) DO NOTHING RETURNING id)
           SELECT id FROM new
           UNION ALL
           SELECT id FROM price_keys
           WHERE meter = $1 AND resource_kind = $2 AND scope_kind = $3 AND scope_id = $4""",
        price.meter,
        price.resource_kind,
        price.scope_kind,
        price.scope_id,
    )
    row = await conn.fetchrow(
        f"""INSERT INTO prices (id, key_id, meter, resource_kind, unit_of_measure, microcredits_per_unit, unit,
                                valid_during, model, bands, correction, scope_kind, scope_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, tstzrange($8, $9, '[)'), $10, $11::jsonb, $12, $13, $14)
            RETURNING {_PRICE_COLUMNS}""",
        price.id,
        key_id,
        price.meter,
        price.resource_kind,
        price.unit_of_measure,
        price.microcredits_per_unit,
        price.unit,
        price.valid_from,
        price.valid_until,
        price.model.model,
        _bands(price),
        price.correction,
        price.scope_kind,
        price.scope_id,
    )
    await _bump_catalog_version(conn)
    assert row is not None  # INSERT ... RETURNING answers its row or raises
    return _price(row)


async def overlapping_prices(
    conn: Conn,
    meter: str,
    resource_kind: str,
    valid_from: datetime,
    valid_until: datetime | None,
    *,
    correction: bool = False,
    scope: tuple[str, str] = ("global", ""),
) -> list[Price]:
    """The ordinary prices of ``scope`` (or, with ``correction``, the price corrections) of (meter, kind)
    overlapping the range."""
    rows = await conn.fetch(
        f"""SELECT {_PRICE_COLUMNS} FROM prices
            WHERE meter = $1 AND resource_kind = $2 AND valid_during && tstzrange($3, $4, '[)') AND correction = $5
              AND scope_kind = $6 AND scope_id = $7
            ORDER BY lower(valid_during)""",
        meter,
        resource_kind,
        valid_from,
        valid_until,
        correction,
        *scope,
    )
    return [_price(r) for r in rows]


async def get_price(conn: Conn, price_id: UUID) -> Price | None:
    row = await conn.fetchrow(f"SELECT {_PRICE_COLUMNS} FROM prices WHERE id = $1", price_id)
    return None if row is None else _price(row)


async def get_price_for_update(conn: Conn, price_id: UUID) -> Price | None:
    row = await conn.fetchrow(f"SELECT {_PRICE_COLUMNS} FROM prices WHERE id = $1 FOR UPDATE", price_id)
    return None if row is None else _price(row)


async def end_price(conn: Conn, price_id: UUID, at: datetime) -> Price:
    """Make the price valid until ``at`` (exclusive) and bump the catalog version."""
    row = await conn.fetchrow(
        f"""UPDATE prices SET valid_during = tstzrange(lower(valid_during), $2, '[)')
            WHERE id = $1 RETURNING {_PRICE_COLUMNS}""",
        price_id,
        at,
    )
    await _bump_catalog_version(conn)
    assert row is not None  # the caller locked the price (get_price_for_update) in this transaction
    return _price(row)


async def list_prices(
    conn: Conn, meter: str | None, resource_kind: str | None, at: datetime | None, limit: int
) -> list[Price]:
    rows = await conn.fetch(
        f"""SELECT {_PRICE_COLUMNS} FROM prices
            WHERE NOT correction
              AND ($1::text IS NULL OR meter = $1)
              AND ($2::text IS NULL OR resource_kind = $2)
              AND ($3::timestamptz IS NULL OR valid_during @> $3::timestamptz)
            ORDER BY meter, resource_kind, scope_kind <> 'global', scope_kind, scope_id, lower(valid_during)
            LIMIT $4""",
        meter,
        resource_kind,
        at,
        limit,
    )
    return [_price(r) for r in rows]


async def last_priced_hour(conn: Conn, price_id: UUID, since: datetime) -> datetime | None:
    """The latest reading hour at or after ``since`` priced with ``price_id``."""
    value: datetime | None = await conn.fetchval(
        "SELECT max(reading_hour) FROM priced_hours WHERE price_id = $1 AND reading_hour >= $2", price_id, since
    )
    return value


class ConcurrentShardWriteError(asyncpg.SerializationError):
    """Another transaction stored a batch of the same shard meanwhile: retry (a serialization failure, so
    the consumer and the re-pricer treat it as transient; the retry sees that batch)."""


# A batch as stored: its shard, seq, counts (items, priced, unpriced, revisions), published, message. An
# unpublished batch also gets its key into unpublished_batches (the outbox), the batch row itself is never
# rewritten.
BatchRow = tuple[ShardKey, int, int, int, int, int, bool, bytes]

_BATCH_COLUMNS = ("reading_hour", "meter", "shard", "seq", "items", "d_priced", "d_unpriced", "d_revisions", "message")


def _keys(keys: Iterable[ShardKey]) -> tuple[list[datetime], list[str], list[int]]:
    ks = sorted(set(keys))
    return [k.reading_hour for k in ks], [k.meter for k in ks], [k.shard for k in ks]


_SHARD_BATCHES = """
    SELECT b.reading_hour, b.meter, b.shard, b.seq, b.message
    FROM unnest($1::timestamptz[], $2::text[], $3::int2[]) AS k(reading_hour, meter, shard)
    JOIN charge_batches b ON b.reading_hour = k.reading_hour AND b.meter = k.meter AND b.shard = k.shard
    ORDER BY b.reading_hour, b.meter, b.shard, b.seq"""


async def _by_shard(
    conn: Conn, frames: Frames, rows: Sequence[asyncpg.Record]
) -> dict[ShardKey, list[tuple[int, bytes]]]:
    out: dict[ShardKey, list[tuple[int, bytes]]] = {}
    messages = await frames.unpack_all(conn, [r["message"] for r in rows])
    for r, message in zip(rows, messages, strict=True):
        out.setdefault(ShardKey(r["reading_hour"], r["meter"], r["shard"]), []).append((r["seq"], message))
    return out


async def lock_shards(
    conn: Conn, frames: Frames, keys: Iterable[ShardKey]
) -> dict[ShardKey, list[tuple[int, bytes]]]:
    """The stored batches (seq, message) of the shards ``keys`` that have any, locked until the end of the
    transaction. Almost always empty: a shard is priced once, when its readings first arrive."""
    return await _by_shard(conn, frames, await conn.fetch(_SHARD_BATCHES + " FOR UPDATE OF b", *_keys(keys)))


async def load_shards(
    conn: Conn, frames: Frames, keys: Iterable[ShardKey]
) -> dict[ShardKey, list[tuple[int, bytes]]]:
    """``lock_shards`` without the lock (for reading)."""
    return await _by_shard(conn, frames, await conn.fetch(_SHARD_BATCHES, *_keys(keys)))


async def insert_batches(conn: Conn, frames: Frames, rows: Sequence[BatchRow]) -> None:
    """Store new batches (COPY), their messages compressed. Raises ConcurrentShardWriteError when a (shard,
    seq) exists already."""
    if not rows:
        return
    records = [
        (k.reading_hour, k.meter, k.shard, seq, n, p, u, r, frames.pack(shard_scope(k), msg))
        for k, seq, n, p, u, r, _, msg in rows
    ]
    outbox = [(k.reading_hour, k.meter, k.shard, seq) for k, seq, _n, _p, _u, _r, pub, _m in rows if not pub]
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("charge_batches", records=records, columns=_BATCH_COLUMNS)
            if outbox:
                await conn.copy_records_to_table(
                    "unpublished_batches", records=outbox, columns=("reading_hour", "meter", "shard", "seq")
                )
    except asyncpg.UniqueViolationError as exc:
        raise ConcurrentShardWriteError("another transaction stored a batch of this shard") from exc


async def add_unpriced(conn: Conn, rows: Iterable[tuple[ShardKey, str]]) -> None:
    """Note the shards that now hold unpriced charges of a kind."""
    rows = sorted(set(rows))
    if rows:
        await conn.execute(
            """INSERT INTO unpriced_shards (reading_hour, meter, shard, resource_kind)
               SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int2[], $4::text[])
               ON CONFLICT DO NOTHING""",
            [k.reading_hour for k, _ in rows],
            [k.meter for k, _ in rows],
            [k.shard for k, _ in rows],
            [c for _, c in rows],
        )


async def delete_unpriced(conn: Conn, rows: Iterable[tuple[ShardKey, str]]) -> None:
    rows = sorted(set(rows))
    if rows:
        await conn.execute(
            """DELETE FROM unpriced_shards u
               USING unnest($1::timestamptz[], $2::text[], $3::int2[], $4::text[]) AS k(h, m, s, c)
               WHERE u.reading_hour = k.h AND u.meter = k.m AND u.shard = k.s AND u.resource_kind = k.c""",
            [k.reading_hour for k, _ in rows],
            [k.meter for k, _ in rows],
            [k.shard for k, _ in rows],
            [c for _, c in rows],
        )


async def add_priced_hours(conn: Conn, rows: Iterable[tuple[UUID, datetime]]) -> None:
    rows = sorted(set(rows))
    if rows:
        await conn.execute(
            """INSERT INTO priced_hours (price_id, reading_hour)
               SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) ON CONFLICT DO NOTHING""",
            [p for p, _ in rows], [h for _, h in rows],
        )


UnpricedKey = tuple[datetime, str, int, str]  # reading hour, meter, shard, kind: the keyset of unpriced_shards


async def covered_unpriced(
    conn: Conn, after: UnpricedKey | None, limit: int, only: Price | None = None
) -> list[tuple[ShardKey, str]]:
    """Shards holding unpriced charges of a kind that a price now covers (the price ``only``, or any), in
    keyset order after ``after``, locked (rows another re-pricer holds are skipped)."""
    h, m, s, c = after if after is not None else (None, None, None, None)
    if only is not None:
        rows = await conn.fetch(
            """SELECT reading_hour, meter, shard, resource_kind FROM unpriced_shards
               WHERE meter = $1 AND resource_kind = $2
                 AND reading_hour >= $3 AND ($4::timestamptz IS NULL OR reading_hour < $4)
                 AND ($5::timestamptz IS NULL
                      OR (reading_hour, meter, shard, resource_kind) > ($5, $6::text, $7::int2, $8::text))
               ORDER BY reading_hour, meter, shard, resource_kind
               LIMIT $9
               FOR UPDATE SKIP LOCKED""",
            only.meter, only.resource_kind, only.valid_from, only.valid_until, h, m, s, c, limit,
        )
    else:
        rows = await conn.fetch(
            """SELECT u.reading_hour, u.meter, u.shard, u.resource_kind FROM unpriced_shards u
               WHERE EXISTS (SELECT 1 FROM prices p
                             WHERE p.meter = u.meter AND p.resource_kind = u.resource_kind
                               AND p.valid_during @> u.reading_hour)
                 AND ($1::timestamptz IS NULL
                      OR (u.reading_hour, u.meter, u.shard, u.resource_kind) > ($1, $2::text, $3::int2, $4::text))
               ORDER BY u.reading_hour, u.meter, u.shard, u.resource_kind
               LIMIT $5
               FOR UPDATE OF u SKIP LOCKED""",
            h, m, s, c, limit,
        )
    return [(ShardKey(r["reading_hour"], r["meter"], r["shard"]), r["resource_kind"]) for r in rows]


async def unpriced_after(
    conn: Conn, after: UnpricedKey | None, limit: int, *, strict: bool = False
) -> list[tuple[ShardKey, str]]:
    """Shards holding unpriced charges, by kind, in keyset order from ``after`` (past it when ``strict``;
    the admin list)."""
    h, m, s, c = after if after is not None else (None, None, None, None)
    op = ">" if strict else ">="
    rows = await conn.fetch(
        # COLLATE "C": the caller compares positions in Python (code point order), whatever the database's
        # default collation.
        f"""SELECT reading_hour, meter, shard, resource_kind FROM unpriced_shards
           WHERE ($1::timestamptz IS NULL
                  OR (reading_hour, meter COLLATE "C", shard, resource_kind COLLATE "C")
                     {op} ($1, $2::text COLLATE "C", $3::int2, $4::text COLLATE "C"))
           ORDER BY reading_hour, meter COLLATE "C", shard, resource_kind COLLATE "C"
           LIMIT $5""",
        h, m, s, c, limit,
    )
    return [(ShardKey(r["reading_hour"], r["meter"], r["shard"]), r["resource_kind"]) for r in rows]


async def take_unpublished(conn: Conn, frames: Frames, limit: int) -> list[tuple[ShardKey, int, bytes]]:
    """Batches stored but not yet acknowledged by the broker, oldest first, locked (another publisher
    skips them) until the transaction ends."""
    rows = await conn.fetch(
        """SELECT b.reading_hour, b.meter, b.shard, b.seq, b.message
             FROM unpublished_batches u
             JOIN charge_batches b USING (reading_hour, meter, shard, seq)
            ORDER BY u.created_at, u.reading_hour, u.meter, u.shard, u.seq
            LIMIT $1
              FOR UPDATE OF u SKIP LOCKED""",
        limit,
    )
    messages = await frames.unpack_all(conn, [r["message"] for r in rows])
    return [
        (ShardKey(r["reading_hour"], r["meter"], r["shard"]), r["seq"], m) for r, m in zip(rows, messages, strict=True)
    ]


async def mark_published(conn: Conn, batches: Sequence[tuple[ShardKey, int]]) -> None:
    if batches:
        await conn.execute(
            """DELETE FROM unpublished_batches u
               USING unnest($1::timestamptz[], $2::text[], $3::int2[], $4::int4[]) AS k(h, m, s, q)
               WHERE u.reading_hour = k.h AND u.meter = k.m AND u.shard = k.s AND u.seq = k.q""",
            [k.reading_hour for k, _ in batches], [k.meter for k, _ in batches], [k.shard for k, _ in batches],
            [q for _, q in batches],
        )


async def count_unpriced(conn: Conn) -> int:
    """Measurements whose latest charge is unpriced (sum of the batches' changes)."""
    return int(await conn.fetchval("SELECT coalesce(sum(d_unpriced), 0) FROM charge_batches"))


async def all_batches(conn: Conn, frames: Frames) -> dict[ShardKey, list[tuple[int, bytes]]]:
    """Every stored batch (tests and audits; not for the hot path)."""
    return await _by_shard(
        conn,
        frames,
        await conn.fetch("SELECT reading_hour, meter, shard, seq, message FROM charge_batches ORDER BY 1, 2, 3, 4"),
    )


async def completeness_counts(conn: Conn, since: datetime, until: datetime) -> list[asyncpg.Record]:
    """Per reading hour and meter: measurements whose latest charge revision is priced / unpriced, and the
    sum of those latest revisions (the ledger must have applied the same)."""
    return await conn.fetch(
        """SELECT reading_hour AS hour, meter, sum(d_priced)::bigint AS priced, sum(d_unpriced)::bigint AS unpriced,
                  sum(d_revisions)::bigint AS revisions
           FROM charge_batches
           WHERE reading_hour >= $1 AND reading_hour < $2
           GROUP BY reading_hour, meter
           ORDER BY reading_hour, meter""",
        since,
        until,
    )


# -- re-rating jobs --------------------------------------------------------------------------------

_JOB_COLUMNS = """j.id AS job_id, j.reason, j.state, j.failure, j.total, j.done, j.repriced, j.refused, j.after_hour,
    j.after_shard, j.created_at AS job_created_at, j.finished_at"""


def _job(r: asyncpg.Record) -> RerateJob:
    after = None if r["after_hour"] is None else (r["after_hour"], int(r["after_shard"]))
    return RerateJob(
        id=UUID(int=r["job_id"].int),
        price=_price(r),
        reason=r["reason"],
        state=r["state"],
        failure=r["failure"],
        total=r["total"],
        done=r["done"],
        repriced=r["repriced"],
        refused=r["refused"],
        after=after,
        created_at=r["job_created_at"],
        finished_at=r["finished_at"],
    )


_JOB_SELECT = f"""SELECT {_JOB_COLUMNS}, p.id, p.meter, p.resource_kind, p.unit_of_measure, p.microcredits_per_unit,
    p.unit, lower(p.valid_during) AS valid_from, upper(p.valid_during) AS valid_until, p.created_at, p.model,
    p.bands::text AS bands, p.correction, p.scope_kind, p.scope_id
    FROM rerate_jobs j JOIN prices p ON p.id = j.price_id"""


async def count_measurements(conn: Conn, meter: str, since: datetime, until: datetime) -> int:
    """Measurements of ``meter`` with a reading hour in [since, until) (every kind), from the batches' counts."""
    return int(
        await conn.fetchval(
            """SELECT coalesce(sum(d_priced + d_unpriced), 0) FROM charge_batches
               WHERE meter = $1 AND reading_hour >= $2 AND reading_hour < $3""",
            meter, since, until,
        )
    )


async def insert_rerate(conn: Conn, job_id: UUID, price: Price, reason: str, total: int) -> RerateJob:
    await conn.execute(
        """INSERT INTO rerate_jobs (id, price_id, meter, resource_kind, valid_from, valid_until, reason, total)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        job_id, price.id, price.meter, price.resource_kind, price.valid_from, price.valid_until, reason, total,
    )
    job = await get_rerate(conn, job_id)
    assert job is not None
    return job


async def get_rerate(conn: Conn, job_id: UUID) -> RerateJob | None:
    row = await conn.fetchrow(_JOB_SELECT + " WHERE j.id = $1", job_id)
    return None if row is None else _job(row)


async def lock_rerate(conn: Conn, job_id: UUID) -> RerateJob | None:
    """The job, locked until the end of the transaction (another instance working it waits)."""
    row = await conn.fetchrow(_JOB_SELECT + " WHERE j.id = $1 FOR UPDATE OF j", job_id)
    return None if row is None else _job(row)


async def list_rerates(conn: Conn, before: UUID | None, limit: int) -> list[RerateJob]:
    """Jobs, newest first (ids are uuid7), after the cursor ``before``."""
    rows = await conn.fetch(
        _JOB_SELECT + " WHERE ($1::uuid IS NULL OR j.id < $1) ORDER BY j.id DESC LIMIT $2", before, limit
    )
    return [_job(r) for r in rows]


async def next_rerate(conn: Conn) -> UUID | None:
    """The oldest running job: jobs run one at a time, in the order they were entered."""
    value = await conn.fetchval(
        "SELECT id FROM rerate_jobs WHERE state = 'running' ORDER BY created_at, id LIMIT 1"
    )
    return None if value is None else UUID(int=value.int)


async def rerate_shards(
    conn: Conn, meter: str, since: datetime, until: datetime, after: tuple[datetime, int] | None, limit: int
) -> list[tuple[ShardKey, int]]:
    """The shards of ``meter`` with a reading hour in [since, until), in (hour, shard) order after ``after``,
    each with its number of measurements."""
    h, s = after if after is not None else (None, None)
    rows = await conn.fetch(
        """SELECT reading_hour, shard, sum(d_priced + d_unpriced)::bigint AS n FROM charge_batches
           WHERE meter = $1 AND reading_hour >= $2 AND reading_hour < $3
             AND ($4::timestamptz IS NULL OR (reading_hour, shard) > ($4, $5::int2))
           GROUP BY reading_hour, shard
           ORDER BY reading_hour, shard
           LIMIT $6""",
        meter, since, until, h, s, limit,
    )
    return [(ShardKey(r["reading_hour"], meter, r["shard"]), int(r["n"])) for r in rows]


async def advance_rerate(
    conn: Conn, job_id: UUID, after: ShardKey, done: int, repriced: int, refused: int
) -> None:
    await conn.execute(
        """UPDATE rerate_jobs SET after_hour = $2, after_shard = $3, done = done + $4, repriced = repriced + $5,
                  refused = refused + $6
           WHERE id = $1""",
        job_id, after.reading_hour, after.shard, done, repriced, refused,
    )


async def finish_rerate(conn: Conn, job_id: UUID) -> None:
    """Done: ``total`` becomes ``done`` if later readings of the range made it larger."""
    await conn.execute(
        """UPDATE rerate_jobs SET state = 'done', total = greatest(total, done), finished_at = now()
           WHERE id = $1 AND state = 'running'""",
        job_id,
    )


async def fail_rerate(conn: Conn, job_id: UUID, reason: str) -> None:
    await conn.execute(
        """UPDATE rerate_jobs SET state = 'failed', failure = $2, finished_at = now()
           WHERE id = $1 AND state = 'running'""",
        job_id, reason[:2000],
    )
