"""Every SQL statement of the pricer. Functions take a connection; the caller owns the transaction.

Catalog consistency: every writer of charges (a readings batch, a re-pricing chunk) holds the catalog
lock in SHARED mode for its transaction and reads the catalog inside it; every catalog change holds it
EXCLUSIVE. So a change waits for the batches priced with the old catalog to commit, and no batch
commits charges priced with a catalog older than the last committed change: a new price never misses
an unpriced charge that a concurrent batch was writing, and an end never misses a charge just priced.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from services.pricer.service import ChargeRow, Price, StoredCharge, UnpricedRow

__all__ = [
    "lock_catalog_shared",
    "lock_catalog_exclusive",
    "catalog_version",
    "load_prices",
    "insert_price",
    "overlapping_prices",
    "get_price",
    "get_price_for_update",
    "end_price",
    "list_prices",
    "last_priced_hour",
    "store_charges",
    "latest_staged_charges",
    "covered_unpriced",
    "store_repriced",
    "take_outbox",
    "delete_outbox",
    "list_unpriced",
    "count_unpriced",
    "stored_charges",
    "completeness_counts",
]

# Two-key advisory lock (a key space apart from the single-bigint keys other code may use).
_LOCK_CLASS, _LOCK_OBJECT = 0x70726963, 1  # "pric", catalog


async def lock_catalog_shared(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)", _LOCK_CLASS, _LOCK_OBJECT)


async def lock_catalog_exclusive(conn: asyncpg.Connection, timeout_ms: int) -> None:
    """Raises asyncpg.LockNotAvailableError after ``timeout_ms`` (for the rest of the transaction too)."""
    await conn.execute(f"SET LOCAL lock_timeout = {int(timeout_ms)}")  # SET takes no parameters
    await conn.execute("SELECT pg_advisory_xact_lock($1::int4, $2::int4)", _LOCK_CLASS, _LOCK_OBJECT)


async def catalog_version(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT version FROM catalog_state"))


async def _bump_catalog_version(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE catalog_state SET version = version + 1")


_PRICE_COLUMNS = """id, meter, resource_kind, unit_of_measure, microcredits_per_unit, unit,
    lower(valid_during) AS valid_from, upper(valid_during) AS valid_until, created_at"""


def _uuid(value: UUID | None) -> UUID | None:
    """asyncpg's own UUID subclass as a plain uuid.UUID (orjson serialises only the latter)."""
    return None if value is None else UUID(int=value.int)


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
    )


async def load_prices(conn: asyncpg.Connection) -> list[Price]:
    """The whole catalog (it is small: a few prices per meter and kind)."""
    return [_price(r) for r in await conn.fetch(f"SELECT {_PRICE_COLUMNS} FROM prices")]


async def insert_price(conn: asyncpg.Connection, price: Price) -> Price:
    """Insert ``price`` and bump the catalog version. Raises asyncpg.ExclusionViolationError on an
    overlap with a price of the same (meter, kind)."""
    key_id = await conn.fetchval(
        """WITH new AS (
               INSERT INTO price_keys (meter, resource_kind) VALUES ($1, $2)
               ON CONFLICT (meter, resource_kind) DO NOTHING RETURNING id)
           SELECT id FROM new
           UNION ALL
           SELECT id FROM price_keys WHERE meter = $1 AND resource_kind = $2""",
        price.meter,
        price.resource_kind,
    )
    row = await conn.fetchrow(
        f"""INSERT INTO prices (id, key_id, meter, resource_kind, unit_of_measure, microcredits_per_unit, unit,
                                valid_during)
            VALUES ($1, $2, $3, $4, $5, $6, $7, tstzrange($8, $9, '[)'))
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
    )
    await _bump_catalog_version(conn)
    return _price(row)


async def overlapping_prices(
    conn: asyncpg.Connection, meter: str, resource_kind: str, valid_from: datetime, valid_until: datetime | None
) -> list[Price]:
    rows = await conn.fetch(
        f"""SELECT {_PRICE_COLUMNS} FROM prices
            WHERE meter = $1 AND resource_kind = $2 AND valid_during && tstzrange($3, $4, '[)')
            ORDER BY lower(valid_during)""",
        meter,
        resource_kind,
        valid_from,
        valid_until,
    )
    return [_price(r) for r in rows]


async def get_price(conn: asyncpg.Connection, price_id: UUID) -> Price | None:
    row = await conn.fetchrow(f"SELECT {_PRICE_COLUMNS} FROM prices WHERE id = $1", price_id)
    return None if row is None else _price(row)


async def get_price_for_update(conn: asyncpg.Connection, price_id: UUID) -> Price | None:
    row = await conn.fetchrow(f"SELECT {_PRICE_COLUMNS} FROM prices WHERE id = $1 FOR UPDATE", price_id)
    return None if row is None else _price(row)


async def end_price(conn: asyncpg.Connection, price_id: UUID, at: datetime) -> Price:
    """Make the price valid until ``at`` (exclusive) and bump the catalog version."""
    row = await conn.fetchrow(
        f"""UPDATE prices SET valid_during = tstzrange(lower(valid_during), $2, '[)')
            WHERE id = $1 RETURNING {_PRICE_COLUMNS}""",
        price_id,
        at,
    )
    await _bump_catalog_version(conn)
    return _price(row)


async def list_prices(
    conn: asyncpg.Connection, meter: str | None, resource_kind: str | None, at: datetime | None, limit: int
) -> list[Price]:
    rows = await conn.fetch(
        f"""SELECT {_PRICE_COLUMNS} FROM prices
            WHERE ($1::text IS NULL OR meter = $1)
              AND ($2::text IS NULL OR resource_kind = $2)
              AND ($3::timestamptz IS NULL OR valid_during @> $3::timestamptz)
            ORDER BY meter, resource_kind, lower(valid_during)
            LIMIT $4""",
        meter,
        resource_kind,
        at,
        limit,
    )
    return [_price(r) for r in rows]


async def last_priced_hour(conn: asyncpg.Connection, price_id: UUID, since: datetime) -> datetime | None:
    """The latest reading hour at or after ``since`` priced with ``price_id``. Walks the charges key
    from ``since`` (it starts with the reading hour), so ending a price near now reads few rows."""
    value: datetime | None = await conn.fetchval(
        "SELECT max(reading_hour) FROM charges WHERE reading_hour >= $1 AND price_id = $2", since, price_id
    )
    return value


_CHARGE_COLUMNS = (
    "reading_hour",
    "measurement_id",
    "revision",
    "meter",
    "resource_kind",
    "value",
    "price_id",
    "amount_numerator",
    "amount_denominator",
    "priced_at",
)
_UNPRICED_COLUMNS = ("measurement_id", "reading_hour", "meter", "resource_kind", "revision", "charge")

# The redelivery path stages the batch with COPY in a per-session temporary table and moves it with one
# INSERT ... ON CONFLICT DO NOTHING, which is what makes a measurement stored before a no-op.
_STAGING_DDL = """CREATE TEMPORARY TABLE IF NOT EXISTS charge_staging (
    reading_hour timestamptz, measurement_id uuid, revision integer, meter text, resource_kind text,
    value bigint, price_id uuid, amount_numerator bigint, amount_denominator bigint, priced_at timestamptz,
    charge jsonb
) ON COMMIT DELETE ROWS"""
# Insert the new charges and, for those of them that are unpriced (and only those: a redelivered
# measurement must not resurrect an unpriced entry that was re-priced since), the unpriced entry.
_MOVE_STAGED = """
WITH inserted AS (
    INSERT INTO charges (reading_hour, measurement_id, revision, meter, resource_kind, value, price_id,
                         amount_numerator, amount_denominator, priced_at)
    SELECT reading_hour, measurement_id, revision, meter, resource_kind, value, price_id,
           amount_numerator, amount_denominator, priced_at
    FROM charge_staging
    ON CONFLICT DO NOTHING
    RETURNING measurement_id, price_id
), unpriced AS (
    INSERT INTO unpriced_charges (measurement_id, reading_hour, meter, resource_kind, revision, charge)
    SELECT s.measurement_id, s.reading_hour, s.meter, s.resource_kind, s.revision, s.charge
    FROM charge_staging s JOIN inserted i ON i.measurement_id = s.measurement_id
    WHERE i.price_id IS NULL
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM unpriced) AS unpriced"""


async def store_charges(
    conn: asyncpg.Connection, rows: Sequence[ChargeRow], unpriced: Sequence[UnpricedRow]
) -> tuple[int, int]:
    """Store revision 1 of a batch's charges (distinct measurements) unless already stored, and the
    unpriced entries of the new unpriced ones; returns (charges inserted, of which unpriced).

    First tries COPY straight into ``charges`` inside a savepoint: almost every batch is new, and this
    is the cheapest write there is (no staging, no conflict handling). A batch holding a measurement
    stored before fails that attempt on the primary key; the savepoint is rolled back and the batch
    goes through the staging table instead. Either way the staged rows of the second path remain
    readable by ``latest_staged_charges`` until the transaction ends."""
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("charges", records=rows, columns=_CHARGE_COLUMNS)
    except asyncpg.UniqueViolationError:
        pass
    else:
        if unpriced:
            await conn.copy_records_to_table("unpriced_charges", records=unpriced, columns=_UNPRICED_COLUMNS)
        return len(rows), len(unpriced)
    docs = {u[0]: u[5] for u in unpriced}
    await conn.execute(_STAGING_DDL)
    await conn.copy_records_to_table(
        "charge_staging", records=[(*r, docs.get(r[1])) for r in rows], columns=(*_CHARGE_COLUMNS, "charge")
    )
    row = await conn.fetchrow(_MOVE_STAGED)
    return int(row["inserted"]), int(row["unpriced"])


_STORED_COLUMNS = "measurement_id, revision, price_id, amount_numerator, amount_denominator, value, priced_at"


def _stored(r: asyncpg.Record) -> StoredCharge:
    return StoredCharge(
        measurement_id=UUID(int=r["measurement_id"].int),
        revision=r["revision"],
        price_id=_uuid(r["price_id"]),
        amount_numerator=r["amount_numerator"],
        amount_denominator=r["amount_denominator"],
        value=r["value"],
        priced_at=r["priced_at"],
    )


async def latest_staged_charges(conn: asyncpg.Connection) -> dict[UUID, StoredCharge]:
    """The latest stored revision of each staged measurement (after ``store_charges``)."""
    rows = await conn.fetch(
        f"""SELECT DISTINCT ON (c.measurement_id) {", ".join("c." + c for c in _STORED_COLUMNS.split(", "))}
            FROM charge_staging s
            JOIN charges c ON c.reading_hour = s.reading_hour AND c.measurement_id = s.measurement_id
            ORDER BY c.measurement_id, c.revision DESC"""
    )
    return {c.measurement_id: c for c in map(_stored, rows)}


async def covered_unpriced(
    conn: asyncpg.Connection,
    after: tuple[datetime, UUID] | None,
    limit: int,
    only: Price | None = None,
) -> list[asyncpg.Record]:
    """Unpriced charges that a price now covers, in (reading_hour, measurement_id) order after the
    keyset position ``after``, locked for re-pricing (rows another re-pricer holds are skipped).
    ``only``: just those the price ``only`` covers (uses the (meter, kind, hour) index)."""
    hour, mid = after if after is not None else (None, None)
    if only is not None:
        return await conn.fetch(
            """SELECT measurement_id, reading_hour, revision, charge FROM unpriced_charges
               WHERE meter = $1 AND resource_kind = $2
                 AND reading_hour >= $3 AND ($4::timestamptz IS NULL OR reading_hour < $4)
                 AND ($5::timestamptz IS NULL OR (reading_hour, measurement_id) > ($5, $6::uuid))
               ORDER BY reading_hour, measurement_id
               LIMIT $7
               FOR UPDATE SKIP LOCKED""",
            only.meter,
            only.resource_kind,
            only.valid_from,
            only.valid_until,
            hour,
            mid,
            limit,
        )
    return await conn.fetch(
        """SELECT u.measurement_id, u.reading_hour, u.revision, u.charge FROM unpriced_charges u
           WHERE EXISTS (SELECT 1 FROM prices p
                         WHERE p.meter = u.meter AND p.resource_kind = u.resource_kind
                           AND p.valid_during @> u.reading_hour)
             AND ($1::timestamptz IS NULL OR (u.reading_hour, u.measurement_id) > ($1, $2::uuid))
           ORDER BY u.reading_hour, u.measurement_id
           LIMIT $3
           FOR UPDATE OF u SKIP LOCKED""",
        hour,
        mid,
        limit,
    )


async def store_repriced(conn: asyncpg.Connection, rows: Sequence[ChargeRow], outbox: Sequence[tuple[UUID, int, str, bytes]]) -> None:
    """Store re-priced revisions, drop their unpriced entries, and queue their messages in the outbox."""
    await conn.executemany(
        """INSERT INTO charges (reading_hour, measurement_id, revision, meter, resource_kind, value, price_id,
                               amount_numerator, amount_denominator, priced_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT DO NOTHING""",
        rows,
    )
    await conn.execute("DELETE FROM unpriced_charges WHERE measurement_id = ANY($1::uuid[])", [r[1] for r in rows])
    await conn.executemany(
        """INSERT INTO charge_outbox (measurement_id, revision, org_id, payload) VALUES ($1, $2, $3, $4)
           ON CONFLICT DO NOTHING""",
        outbox,
    )


async def take_outbox(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Outbox rows to publish, locked (another publisher skips them) until the transaction ends."""
    return await conn.fetch(
        """SELECT measurement_id, revision, org_id, payload FROM charge_outbox
           ORDER BY created_at, measurement_id, revision
           LIMIT $1
           FOR UPDATE SKIP LOCKED""",
        limit,
    )


async def delete_outbox(conn: asyncpg.Connection, keys: Sequence[tuple[UUID, int]]) -> None:
    await conn.execute(
        """DELETE FROM charge_outbox o USING unnest($1::uuid[], $2::int[]) AS k(measurement_id, revision)
           WHERE o.measurement_id = k.measurement_id AND o.revision = k.revision""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )


async def list_unpriced(
    conn: asyncpg.Connection, after: tuple[datetime, UUID] | None, limit: int
) -> list[asyncpg.Record]:
    """Unpriced charges (their latest revision) in (reading_hour, measurement_id) order."""
    hour, mid = after if after is not None else (None, None)
    return await conn.fetch(
        """SELECT measurement_id, reading_hour, charge FROM unpriced_charges
           WHERE ($1::timestamptz IS NULL OR (reading_hour, measurement_id) > ($1, $2::uuid))
           ORDER BY reading_hour, measurement_id
           LIMIT $3""",
        hour,
        mid,
        limit,
    )


async def count_unpriced(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM unpriced_charges"))


async def stored_charges(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every stored charge revision (tests and audits; not for the hot path)."""
    rows = await conn.fetch(
        f"SELECT reading_hour, meter, resource_kind, {_STORED_COLUMNS} FROM charges "
        "ORDER BY reading_hour, measurement_id, revision"
    )
    return [dict(r) for r in rows]


async def completeness_counts(conn: asyncpg.Connection, since: datetime, until: datetime) -> list[asyncpg.Record]:
    """Per reading hour and meter: measurements whose latest charge revision is priced / unpriced, and the
    sum of those latest revisions (the ledger must have applied the same). Walks the charges key, which
    starts with the reading hour, in order: DISTINCT ON keeps each measurement's highest revision."""
    return await conn.fetch(
        """SELECT reading_hour AS hour, meter,
                  count(*) FILTER (WHERE price_id IS NOT NULL) AS priced,
                  count(*) FILTER (WHERE price_id IS NULL) AS unpriced,
                  sum(revision)::bigint AS revisions
           FROM (SELECT DISTINCT ON (reading_hour, measurement_id) reading_hour, meter, price_id, revision
                 FROM charges
                 WHERE reading_hour >= $1 AND reading_hour < $2
                 ORDER BY reading_hour, measurement_id, revision DESC) latest
           GROUP BY reading_hour, meter
           ORDER BY reading_hour, meter""",
        since,
        until,
    )
