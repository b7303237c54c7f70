"""Every SQL statement of the api, named, with bind parameters only.

The few statements whose text varies (the usage queries, by granularity and grouping dimension) are
built from the fixed table ``_DIM_COLUMNS`` below, never from request text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from fractions import Fraction
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from services.api.charges import PRICED, ResourceDoc, ResourceKey, ShardDoc, exact, ny_day, ny_month
from services.api.service import OrgHour, TransactionRow, ny_midnight
from shared.batches import ShardKey
from shared.blobs import Frames, shard_scope
from shared.db import Conn

__all__ = [
    "UsageRow",
    "access",
    "apply_group_rollups",
    "bucket_sums",
    "charge_shards_at",
    "corrections_of",
    "customer_org_hours",
    "customers_of",
    "entitlements_page",
    "grant_entitlement",
    "insert_customers",
    "insert_org_hours",
    "insert_transactions",
    "json_value",
    "lock_charge_shards",
    "lock_hours",
    "lock_resource_docs",
    "monthly_money",
    "remember_price_models",
    "resource_attrs",
    "resource_docs",
    "revoke_entitlement",
    "save_charge_shards",
    "save_resource_docs",
    "statement",
    "statement_versions",
    "transactions_by_id",
    "transactions_page",
    "unreversed_with_amount",
    "upsert_names",
    "upsert_statements",
    "usage_page",
    "visible_customers",
]


def _json(value: Any) -> str:
    # The shared pool has no jsonb codec: jsonb travels as text both ways.
    return orjson.dumps(value).decode()


def json_value(text: str | None) -> Any:
    """A jsonb column as read (text) turned back into Python values."""
    return None if text is None else orjson.loads(text)


# ------------------------------------------------------------------------------------------- consumers


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(b"api-org:" + name.encode(), digest_size=8).digest(), "big", signed=True)


async def lock_hours(conn: Conn, hours: Iterable[datetime]) -> None:
    """Transaction-scoped advisory locks on these reading hours, in one global order (no deadlock): the
    charges consumer and the ledger consumer serialise per hour, so a charge and the fact that attributes
    it to a customer can never miss each other (each would otherwise not see the other's uncommitted row)."""
    keys = sorted({_lock_key(f"hour:{h.isoformat()}") for h in hours})
    if keys:
        await conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k ORDER BY k", keys)


_SHARDS = "unnest($1::timestamptz[], $2::text[], $3::int2[]) AS k(reading_hour, meter, shard)"


# Shard documents are stored compressed against their shard's frame (shared/blobs.py): the writer (the
# projector) keeps the frames of its database; reading needs only frames by id, the same in every database.
_READER = Frames()


async def lock_charge_shards(
    conn: Conn, frames: Frames, keys: Iterable[ShardKey]
) -> dict[ShardKey, bytes]:
    """The stored documents of these shards (those that have one), locked until the transaction ends."""
    ks = sorted(set(keys))
    rows = await conn.fetch(
        f"""SELECT c.reading_hour, c.meter, c.shard, c.items FROM {_SHARDS}
              JOIN charge_shard c ON c.reading_hour = k.reading_hour AND c.meter = k.meter AND c.shard = k.shard
             ORDER BY 1, 2, 3 FOR UPDATE OF c""",
        [k.reading_hour for k in ks], [k.meter for k in ks], [k.shard for k in ks],
    )
    docs = await frames.unpack_all(conn, [r["items"] for r in rows])
    return {ShardKey(r["reading_hour"], r["meter"], r["shard"]): d for r, d in zip(rows, docs, strict=True)}


async def save_charge_shards(conn: Conn, frames: Frames, docs: Sequence[tuple[ShardKey, bytes]]) -> None:
    """Insert or replace shard documents."""
    if docs:
        ordered = sorted(docs)
        await conn.execute(
            """INSERT INTO charge_shard (reading_hour, meter, shard, items)
               SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int2[], $4::bytea[])
               ON CONFLICT (reading_hour, meter, shard) DO UPDATE SET items = EXCLUDED.items""",
            [k.reading_hour for k, _ in ordered], [k.meter for k, _ in ordered], [k.shard for k, _ in ordered],
            [frames.pack(shard_scope(k), d) for k, d in ordered],
        )


async def charge_shards_at(conn: Conn, hours: Iterable[datetime]) -> dict[ShardKey, bytes]:
    """Every shard document of these reading hours."""
    rows = await conn.fetch(
        """SELECT reading_hour, meter, shard, items FROM charge_shard
            WHERE reading_hour = ANY($1::timestamptz[]) ORDER BY 1, 2, 3""",
        sorted(set(hours)),
    )
    docs = await _READER.unpack_all(conn, [r["items"] for r in rows])
    return {ShardKey(r["reading_hour"], r["meter"], r["shard"]): d for r, d in zip(rows, docs, strict=True)}


_RESOURCE_TABLES = {"day": ("usage_resource_day", "day")}  # a month is read as its days


async def lock_resource_docs(conn: Conn, period: str, keys: Iterable[ResourceKey]) -> dict[ResourceKey, bytes]:
    """The per-resource documents (``period`` day or month) of these keys that exist, locked."""
    table, column = _RESOURCE_TABLES[period]
    ks = sorted(set(keys))
    if not ks:
        return {}
    rows = await conn.fetch(
        f"""SELECT t.customer_id, t.{column} AS period, t.meter, t.items
              FROM unnest($1::uuid[], $2::date[], $3::text[]) AS k(customer_id, period, meter)
              JOIN {table} t ON t.customer_id = k.customer_id AND t.{column} = k.period AND t.meter = k.meter
             ORDER BY 1, 2, 3 FOR UPDATE OF t""",
        [k[0] for k in ks], [k[1] for k in ks], [k[2] for k in ks],
    )
    return {(r["customer_id"], r["period"], r["meter"]): r["items"] for r in rows}


async def save_resource_docs(conn: Conn, period: str, docs: Sequence[tuple[ResourceKey, bytes]]) -> None:
    table, column = _RESOURCE_TABLES[period]
    if docs:
        ordered = sorted(docs)
        await conn.execute(
            f"""INSERT INTO {table} (customer_id, {column}, meter, items)
                SELECT * FROM unnest($1::uuid[], $2::date[], $3::text[], $4::bytea[])
                ON CONFLICT (customer_id, {column}, meter) DO UPDATE SET items = EXCLUDED.items""",
            [k[0] for k, _ in ordered], [k[1] for k, _ in ordered], [k[2] for k, _ in ordered],
            [d for _, d in ordered],
        )


async def resource_docs(
    conn: Conn, period: str, customer_id: UUID, first: date, stop: date
) -> list[tuple[date, bytes]]:
    """Every per-resource document of a customer for the periods in [first, stop), by period."""
    table, column = _RESOURCE_TABLES[period]
    rows = await conn.fetch(
        f"""SELECT {column} AS period, items FROM {table}
             WHERE customer_id = $1 AND {column} >= $2 AND {column} < $3 ORDER BY {column}, meter""",
        customer_id, first, stop,
    )
    return [(r["period"], r["items"]) for r in rows]


async def customer_org_hours(
    conn: Conn, customer_id: UUID, first: datetime, stop: datetime
) -> dict[datetime, set[str]]:
    """The orgs that belonged to the customer in each reading hour of [first, stop)."""
    rows = await conn.fetch(
        """SELECT hour, org_id FROM org_customer_hour
            WHERE customer_id = $1 AND hour >= $2 AND hour < $3 ORDER BY hour""",
        customer_id, first, stop,
    )
    out: dict[datetime, set[str]] = {}
    for r in rows:
        out.setdefault(r["hour"], set()).add(r["org_id"])
    return out


async def resource_attrs(conn: Conn, resource_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """Display attributes of these resources (name, meter, kind, space and org with their names)."""
    if not resource_ids:
        return {}
    rows = await conn.fetch(
        f"""SELECT r.resource_id, {_DIM_NAMES["resource"][1]}
              FROM resource_info r LEFT JOIN space_info s ON s.space_id = r.space_id
              LEFT JOIN org_info o ON o.org_id = r.org_id
             WHERE r.resource_id = ANY($1::text[])""",
        sorted(set(resource_ids)),
    )
    return {r["resource_id"]: {c: r[c] or "" for c in _DIM_ATTRS["resource"]} for r in rows}


async def _stage(conn: Conn, table: str, columns: str, records: Sequence[tuple[Any, ...]]) -> None:
    """COPY ``records`` into the session's temporary ``table`` (``columns`` = its DDL), emptied at commit.

    The batch writes go through COPY rather than array parameters (``unnest($1::text[], ...)``): asyncpg
    checks every element of an array parameter against collections.abc before encoding it, which cost
    the charges consumer about 40% of its time; COPY encodes the rows directly."""
    await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({columns}) ON COMMIT DELETE ROWS")
    await conn.copy_records_to_table(table, records=records)


async def customers_of(conn: Conn, pairs: Iterable[tuple[str, datetime]]) -> dict[tuple[str, datetime], UUID]:
    """The customer of each (org, hour) the ledger has told us about."""
    ps = list(set(pairs))
    if not ps:
        return {}
    rows = await conn.fetch(
        """
        SELECT m.org_id, m.hour, m.customer_id
        FROM org_customer_hour m
        JOIN unnest($1::text[], $2::timestamptz[]) AS p(org_id, hour) ON p.org_id = m.org_id AND p.hour = m.hour
        """,
        [p[0] for p in ps],
        [p[1] for p in ps],
    )
    return {(r["org_id"], r["hour"]): r["customer_id"] for r in rows}


def _rollup_upsert_sql(table: str, keys: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """The staging columns of ``table``'s changes and the INSERT ... ON CONFLICT that adds them (value,
    amount_num / amount_den) to its rows, exactly: the amounts are summed over the lcm of their
    denominators. Rows are written in key order: one global order of row locks across concurrent writers."""
    names = ", ".join(k for k, _ in keys)
    staging = ", ".join(f"{k} {t}" for k, t in keys) + ", value bigint, amount_num numeric, amount_den numeric"
    return staging, f"""
        INSERT INTO {table} AS u ({names}, value, amount_num, amount_den)
        SELECT {names}, value, amount_num, amount_den FROM {table}_in ORDER BY {names}
        ON CONFLICT ({names}) DO UPDATE SET
            value = u.value + EXCLUDED.value,
            amount_num = u.amount_num * div(lcm(u.amount_den, EXCLUDED.amount_den), u.amount_den)
                         + EXCLUDED.amount_num * div(lcm(u.amount_den, EXCLUDED.amount_den), EXCLUDED.amount_den),
            amount_den = lcm(u.amount_den, EXCLUDED.amount_den)
    """


def _group_keys(period: str, sql_type: str) -> tuple[tuple[str, str], ...]:
    return (
        ("customer_id", "uuid"),
        ("dim", "text"),
        (period, sql_type),
        ("key", "text"),
        ("key2", "text"),
        ("unit", "text"),
        ("priced", "text"),
    )


# Granularity -> (its table, staging columns, upsert), in the order they are written.
_ROLLUP_UPSERTS = {
    granularity: (table, *_rollup_upsert_sql(table, keys))
    for granularity, table, keys in (
        ("month", "usage_month", _group_keys("month", "date")),
        ("day", "usage_day_group", _group_keys("day", "date")),
        ("hour", "usage_hour_group", _group_keys("hour", "timestamptz")),
    )
}


async def apply_group_rollups(conn: Conn, groups: dict[str, dict[Any, tuple[int, int, int]]]) -> None:
    """Add the changes to the group rollups, exactly (rational sums over the lcm)."""
    for granularity, (table, staging, sql) in _ROLLUP_UPSERTS.items():
        cells = groups.get(granularity)
        if cells:
            await _stage(conn, f"{table}_in", staging, [(*k, v, n, d) for k, (v, n, d) in cells.items()])
            await conn.execute(sql)


async def upsert_names(
    conn: Conn,
    orgs: dict[str, str],
    spaces: dict[str, tuple[str, str]],
    resources: dict[str, tuple[str, str, str, str, str]],
) -> None:
    """Remember the latest display names; rows that did not change are not rewritten."""
    if orgs:
        ks = sorted(orgs)
        await conn.execute(
            """
            INSERT INTO org_info AS o (org_id, org_name) SELECT * FROM unnest($1::text[], $2::text[])
            ON CONFLICT (org_id) DO UPDATE SET org_name = EXCLUDED.org_name
            WHERE o.org_name IS DISTINCT FROM EXCLUDED.org_name
            """,
            ks,
            [orgs[k] for k in ks],
        )
    if spaces:
        ks = sorted(spaces)
        await conn.execute(
            """
            INSERT INTO space_info AS s (space_id, space_name, org_id)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
            ON CONFLICT (space_id) DO UPDATE SET space_name = EXCLUDED.space_name, org_id = EXCLUDED.org_id
            WHERE (s.space_name, s.org_id) IS DISTINCT FROM (EXCLUDED.space_name, EXCLUDED.org_id)
            """,
            ks,
            [spaces[k][0] for k in ks],
            [spaces[k][1] for k in ks],
        )
    if resources:
        await _stage(
            conn,
            "resource_info_in",
            "resource_id text, resource_name text, meter text, resource_kind text, space_id text, org_id text",
            [(k, *v) for k, v in resources.items()],
        )
        await conn.execute(
            """
            INSERT INTO resource_info AS r (resource_id, resource_name, meter, resource_kind, space_id, org_id)
            SELECT * FROM resource_info_in ORDER BY resource_id
            ON CONFLICT (resource_id) DO UPDATE SET resource_name = EXCLUDED.resource_name, meter = EXCLUDED.meter,
                resource_kind = EXCLUDED.resource_kind, space_id = EXCLUDED.space_id, org_id = EXCLUDED.org_id
            WHERE (r.resource_name, r.meter, r.resource_kind, r.space_id, r.org_id)
                  IS DISTINCT FROM (EXCLUDED.resource_name, EXCLUDED.meter, EXCLUDED.resource_kind,
                                    EXCLUDED.space_id, EXCLUDED.org_id)
            """
        )


async def insert_org_hours(conn: Conn, facts: Sequence[OrgHour]) -> tuple[list[OrgHour], list[OrgHour]]:
    """Record which customer each org belonged to in each hour. Returns (new facts, conflicting facts):
    a fact already recorded is kept; one naming another customer for the same org and hour is refused."""
    if not facts:
        return [], []
    ordered = sorted(facts, key=lambda f: (f.org_id, f.hour))
    rows = await conn.fetch(
        """
        INSERT INTO org_customer_hour (org_id, hour, customer_id)
        SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::uuid[])
        ON CONFLICT (org_id, hour) DO NOTHING
        RETURNING org_id, hour
        """,
        [f.org_id for f in ordered],
        [f.hour for f in ordered],
        [f.customer_id for f in ordered],
    )
    inserted = {(r["org_id"], r["hour"]) for r in rows}
    new = [f for f in ordered if (f.org_id, f.hour) in inserted]
    rest = [f for f in ordered if (f.org_id, f.hour) not in inserted]
    known = await customers_of(conn, [(f.org_id, f.hour) for f in rest])
    conflicts = [f for f in rest if known.get((f.org_id, f.hour)) not in (None, f.customer_id)]
    return new, conflicts


async def insert_customers(conn: Conn, ids: Iterable[UUID]) -> None:
    ks = sorted(set(ids))
    if ks:
        await conn.execute(
            "INSERT INTO customer (customer_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING", ks
        )


async def transactions_by_id(conn: Conn, customer_id: UUID, ids: Sequence[UUID]) -> dict[UUID, tuple[UUID, str, int]]:
    """(id, bucket, signed amount) of those of ``ids`` that are this customer's transactions."""
    if not ids:
        return {}
    rows = await conn.fetch(
        """
        SELECT transaction_id, bucket, signed_amount FROM ledger_transaction
        WHERE customer_id = $1 AND transaction_id = ANY($2::uuid[])
        """,
        customer_id,
        list(ids),
    )
    return {r["transaction_id"]: (r["transaction_id"], r["bucket"], r["signed_amount"]) for r in rows}


async def unreversed_with_amount(conn: Conn, customer_id: UUID, amount: int) -> list[asyncpg.Record]:
    """The customer's transactions of this amount that no reversal has taken back yet, newest first
    (candidates for the original of a reversal that does not name it)."""
    return await conn.fetch(
        """
        SELECT t.transaction_id, t.bucket, t.signed_amount, t.entries FROM ledger_transaction t
        WHERE t.customer_id = $1 AND t.amount = $2 AND t.bucket <> 'none'
          AND NOT EXISTS (SELECT 1 FROM ledger_transaction r WHERE r.customer_id = $1 AND r.reverses = t.transaction_id)
        ORDER BY t.posted_at DESC, t.transaction_id DESC
        LIMIT 50
        """,
        customer_id,
        amount,
    )


async def insert_transactions(conn: Conn, rows: Sequence[TransactionRow]) -> set[UUID]:
    """Store transactions not seen before (idempotent by id); returns the ids stored now."""
    if not rows:
        return set()
    stored = await conn.fetch(
        """
        INSERT INTO ledger_transaction (transaction_id, customer_id, type, occurred_at, posted_at, reading_hour,
            description, idempotency_key, amount, bucket, signed_amount, reverses, entries, usage, corrects_month)
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                             $6::timestamptz[], $7::text[], $8::text[], $9::bigint[], $10::text[], $11::bigint[],
                             $12::uuid[], $13::jsonb[], $14::jsonb[], $15::date[])
        ON CONFLICT (transaction_id) DO NOTHING
        RETURNING transaction_id
        """,
        [r.transaction_id for r in rows],
        [r.customer_id for r in rows],
        [r.type for r in rows],
        [r.occurred_at for r in rows],
        [r.posted_at for r in rows],
        [r.reading_hour for r in rows],
        [r.description for r in rows],
        [r.idempotency_key for r in rows],
        [r.amount for r in rows],
        [r.bucket for r in rows],
        [r.signed_amount for r in rows],
        [r.reverses for r in rows],
        [_json(r.entries) for r in rows],
        [_json(r.usage) for r in rows],
        [r.corrects_month for r in rows],
    )
    return {r["transaction_id"] for r in stored}


async def upsert_statements(conn: Conn, rows: Sequence[dict[str, Any]]) -> None:
    """Store statements, every version of a month (1 = the close, 2, 3, ... = amended by corrections); a
    version re-issued later for the same customer and month replaces the older issue of that version."""
    for s in sorted(rows, key=lambda s: (s["customer_id"], s["month"], s["version"], s["issued_at"])):
        await conn.execute(
            """
            INSERT INTO statement AS s (customer_id, month, statement_id, opening_balance, funded, used, expired,
                                        closing_balance, used_by_kind, issued_at, version, original_used,
                                        correction, reasons)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            ON CONFLICT (customer_id, month, version) DO UPDATE SET
                statement_id = EXCLUDED.statement_id, opening_balance = EXCLUDED.opening_balance,
                funded = EXCLUDED.funded, used = EXCLUDED.used, expired = EXCLUDED.expired,
                closing_balance = EXCLUDED.closing_balance, used_by_kind = EXCLUDED.used_by_kind,
                issued_at = EXCLUDED.issued_at, original_used = EXCLUDED.original_used,
                correction = EXCLUDED.correction, reasons = EXCLUDED.reasons
            WHERE s.issued_at < EXCLUDED.issued_at
            """,
            s["customer_id"],
            s["month"],
            s["statement_id"],
            s["opening_balance"],
            s["funded"],
            s["used"],
            s["expired"],
            s["closing_balance"],
            _json(s["used_by_kind"]),
            s["issued_at"],
            s["version"],
            s["original_used"],
            s["correction"],
            _json(s["reasons"]),
        )


# --------------------------------------------------------------------------------------------- queries


async def access(conn: Conn, customer_id: UUID, subject: str) -> tuple[bool, bool]:
    """(the read model knows the customer, an admin entitled ``subject`` to it)."""
    row = await conn.fetchrow(
        """
        SELECT EXISTS (SELECT 1 FROM customer WHERE customer_id = $1) AS known,
               EXISTS (SELECT 1 FROM entitlement WHERE subject = $2 AND customer_id = $1) AS granted
        """,
        customer_id,
        subject,
    )
    assert row is not None
    return row["known"], row["granted"]


async def visible_customers(
    conn: Conn, *, everyone: bool, subject: str, claimed: Sequence[UUID], after: UUID | None, limit: int
) -> list[asyncpg.Record]:
    """Known customers the caller may see, by id: all for an admin; else those of the token's claim and
    of the subject's entitlements."""
    return await conn.fetch(
        """
        SELECT c.customer_id, c.first_seen_at FROM customer c
        WHERE ($1 OR c.customer_id = ANY($3::uuid[])
                  OR EXISTS (SELECT 1 FROM entitlement e WHERE e.subject = $2 AND e.customer_id = c.customer_id))
          AND ($4::uuid IS NULL OR c.customer_id > $4)
        ORDER BY c.customer_id
        LIMIT $5
        """,
        everyone,
        subject,
        list(claimed),
        after,
        limit,
    )


async def bucket_sums(conn: Conn, customer_id: UUID, as_of: datetime) -> dict[str, int]:
    rows = await conn.fetch(
        """
        SELECT bucket, sum(signed_amount) AS total FROM ledger_transaction
        WHERE customer_id = $1 AND occurred_at <= $2
        GROUP BY bucket
        """,
        customer_id,
        as_of,
    )
    return {r["bucket"]: int(r["total"]) for r in rows}


async def transactions_page(
    conn: Conn,
    customer_id: UUID,
    *,
    before: tuple[datetime, UUID] | None,
    limit: int,
    types: Sequence[str] | None,
    start: datetime | None,
    end: datetime | None,
) -> list[asyncpg.Record]:
    """Newest first by (occurred_at, id); ``before`` is the last row of the previous page."""
    return await conn.fetch(
        """
        SELECT transaction_id, type, occurred_at, posted_at, reading_hour, description, amount, bucket,
               signed_amount, reverses, entries, usage, corrects_month
        FROM ledger_transaction
        WHERE customer_id = $1
          AND ($2::timestamptz IS NULL OR (occurred_at, transaction_id) < ($2, $3::uuid))
          AND ($5::text[] IS NULL OR type = ANY($5))
          AND ($6::timestamptz IS NULL OR occurred_at >= $6)
          AND ($7::timestamptz IS NULL OR occurred_at < $7)
        ORDER BY occurred_at DESC, transaction_id DESC
        LIMIT $4
        """,
        customer_id,
        before[0] if before else None,
        before[1] if before else None,
        limit,
        list(types) if types else None,
        start,
        end,
    )


async def statement(
    conn: Conn, customer_id: UUID, month: date, version: int | None = None
) -> asyncpg.Record | None:
    """A month's statement: its latest version, or ``version``."""
    return await conn.fetchrow(
        """
        SELECT statement_id, opening_balance, funded, used, expired, closing_balance, used_by_kind, issued_at,
               version, original_used, correction, reasons
        FROM statement WHERE customer_id = $1 AND month = $2 AND ($3::int IS NULL OR version = $3)
        ORDER BY version DESC LIMIT 1
        """,
        customer_id,
        month,
        version,
    )


async def corrections_of(conn: Conn, customer_id: UUID, month: date) -> list[asyncpg.Record]:
    """The correction transactions that restate ``month`` (a closed month), in the order they occurred."""
    return await conn.fetch(
        """
        SELECT transaction_id, occurred_at, description, signed_amount, usage
        FROM ledger_transaction WHERE customer_id = $1 AND type = 'correction' AND corrects_month = $2
        ORDER BY occurred_at, transaction_id
        """,
        customer_id,
        month,
    )


async def statement_versions(conn: Conn, customer_id: UUID, month: date) -> list[asyncpg.Record]:
    """Every version of a month's statement, oldest first: version, id, issue time, used and correction."""
    return await conn.fetch(
        """
        SELECT version, statement_id, issued_at, used, original_used, correction
        FROM statement WHERE customer_id = $1 AND month = $2 ORDER BY version
        """,
        customer_id,
        month,
    )


def _exact_sum(nums: Sequence[str], dens: Sequence[str]) -> Fraction:
    """The exact sum of nums[i]/dens[i] (numerics read as text: cheaper than Decimal); a single
    Fraction when the denominators agree, the usual case."""
    if len(nums) == 1 or all(d == dens[0] for d in dens):
        return Fraction(sum(map(int, nums)), int(dens[0]))
    return sum((Fraction(int(n), int(d)) for n, d in zip(nums, dens, strict=True)), Fraction(0))


@dataclass(frozen=True, slots=True)
class UsageRow:
    period: date | datetime
    key: str
    key2: str
    values: dict[str, int]
    amount: Fraction
    attrs: dict[str, str]
    priced: str = "exact"  # "monthly": graduated or volume usage, whose amount is the ledger's (0 here)


# Grouping dimension -> (key column, key2 column) of usage_day and charge. Only these strings ever
# reach the usage SQL text.
_DIM_COLUMNS = {
    "org": ("org_id", "''"),
    "space": ("space_id", "''"),
    "resource": ("resource_id", "''"),
    "meter": ("meter", "''"),
    "kind": ("meter", "resource_kind"),
}

# Display attributes joined to a page of groups, per dimension: (joins, columns).
_DIM_NAMES = {
    "org": ("LEFT JOIN org_info o ON o.org_id = p.key", "o.org_name"),
    "space": (
        "LEFT JOIN space_info s ON s.space_id = p.key LEFT JOIN org_info o ON o.org_id = s.org_id",
        "s.space_name, s.org_id, o.org_name",
    ),
    "resource": (
        "LEFT JOIN resource_info r ON r.resource_id = p.key LEFT JOIN space_info s ON s.space_id = r.space_id "
        "LEFT JOIN org_info o ON o.org_id = r.org_id",
        "r.resource_name, r.meter, r.resource_kind, r.space_id, s.space_name, r.org_id, o.org_name",
    ),
    "meter": ("", ""),
    "kind": ("", ""),
}
_DIM_ATTRS = {
    dim: tuple(c.split(".")[1] for c in cols.split(", ")) if cols else () for dim, (_, cols) in _DIM_NAMES.items()
}


# Granularity -> (table, period column, its SQL type) of the per-group rollups.
_GROUP_ROLLUPS = {
    "hour": ("usage_hour_group", "hour", "timestamptz"),
    "day": ("usage_day_group", "day", "date"),
    "month": ("usage_month", "month", "date"),
}


def _usage_sql(granularity: str, dim: str, paged: bool) -> str:
    """One statement per (granularity, group dimension, first page or not): a page of groups with their
    values per unit and their exact amounts as (numerator, denominator) pairs, combined exactly in
    Python, and the groups' display names. Pre-aggregated per group and unit: a handful of rows per
    period. (Per-resource usage is read from documents: ``_resource_page``.)"""
    table, column, sql_type = _GROUP_ROLLUPS[granularity]
    after = f"AND ({column}, key, key2, priced) > ($6::{sql_type}, $7::text, $8::text, $9::text)" if paged else ""
    grouped = f"""
        SELECT {column} AS period, key, key2, priced, array_agg(unit) AS units, array_agg(value) AS vals,
               array_agg(amount_num::text) AS nums, array_agg(amount_den::text) AS dens
        FROM {table}
        WHERE customer_id = $1 AND dim = $2 AND {column} >= $3::{sql_type} AND {column} < $4::{sql_type} {after}
        GROUP BY {column}, key, key2, priced
        ORDER BY {column}, key, key2, priced
        LIMIT $5
    """
    joins, columns = _DIM_NAMES[dim]
    return f"""
        SELECT p.* {", " + columns if columns else ""}
        FROM ({grouped}) p {joins}
        ORDER BY p.period, p.key, p.key2, p.priced
    """


_USAGE_SQL = {
    (g, d, paged): _usage_sql(g, d, paged)
    for g in ("hour", "day", "month") for d in _DIM_COLUMNS if d != "resource" for paged in (False, True)
}


async def usage_page(
    conn: Conn,
    customer_id: UUID,
    *,
    granularity: str,
    dim: str,
    first: date | datetime,
    stop: date | datetime,
    after: tuple[date | datetime, str, str, str] | None,
    limit: int,
) -> list[UsageRow]:
    """A page of usage groups in (period, key, key2, priced) order; ``after`` is the last of the previous
    page. A group with usage of graduated or volume prices has a second row, ``priced`` = ``monthly``."""
    if dim == "resource":
        return await _resource_page(conn, customer_id, granularity, first, stop, after, limit)
    sql = _USAGE_SQL[(granularity, dim, after is not None)]
    args: list[Any] = [customer_id, dim, first, stop, limit]
    if after is not None:
        args.extend(after)
    out = []
    for r in await conn.fetch(sql, *args):
        values: dict[str, int] = {}
        for unit, value in zip(r["units"], r["vals"], strict=True):
            values[unit] = values.get(unit, 0) + int(value)
        amount = _exact_sum(r["nums"], r["dens"])
        attrs = {c: r[c] or "" for c in _DIM_ATTRS[dim]}
        out.append(
            UsageRow(
                period=r["period"], key=r["key"], key2=r["key2"], values=values, amount=amount, attrs=attrs,
                priced=r["priced"],
            )
        )
    return out


# Periods read at a time while a page of per-resource usage fills.
_PERIODS_PER_READ = {"hour": 6, "day": 2, "month": 1}


async def _resource_page(
    conn: Conn,
    customer_id: UUID,
    granularity: str,
    first: date | datetime,
    stop: date | datetime,
    after: tuple[date | datetime, str, str, str] | None,
    limit: int,
) -> list[UsageRow]:
    """A page of usage per resource, in (period, resource) order: hours from the charge documents of the
    hours the customer had orgs in, days and months from its per-resource day documents. Periods are read a
    few at a time until the page is full, so a page costs what its periods hold, not the whole range."""
    start = after[0] if after is not None else first
    if granularity == "hour":
        org_hours = await customer_org_hours(conn, customer_id, start, stop)  # type: ignore[arg-type]
        periods: list[Any] = sorted(org_hours)
    else:
        rows = await conn.fetch(
            """SELECT DISTINCT date_trunc($4, day)::date AS p FROM usage_resource_day
                 WHERE customer_id = $1 AND day >= $2 AND day < $3 ORDER BY 1""",
            customer_id, start, stop, granularity,
        )
        periods = [r["p"] for r in rows]
    out: list[UsageRow] = []
    step = _PERIODS_PER_READ[granularity]
    for i in range(0, len(periods), step):
        chunk = periods[i : i + step]
        cells: dict[tuple[Any, str, str], tuple[dict[str, int], dict[int, int]]] = {}
        if granularity == "hour":
            for key, raw in (await charge_shards_at(conn, chunk)).items():
                doc = ShardDoc.load(raw)
                orgs = org_hours[key.reading_hour]
                wanted = {j for j, org in enumerate(doc.orgs) if org in orgs}
                for j in range(len(doc)):
                    if doc.o[j] in wanted:
                        _add_cell(
                            cells, (key.reading_hour, doc.r[j], PRICED[doc.m[j]]),
                            doc.units[doc.u[j]], doc.x[j], doc.n[j], doc.d[j],
                        )
        else:  # a day's documents, or a month's days summed
            rows = await conn.fetch(
                """SELECT date_trunc($4, day)::date AS p, items FROM usage_resource_day
                    WHERE customer_id = $1 AND day >= $2 AND day < $3""",
                customer_id, chunk[0], _next_period(granularity, chunk[-1]), granularity,
            )
            for r in rows:
                for (rid, unit, monthly), (x, n, d) in ResourceDoc.load(r["items"]).cells.items():
                    _add_cell(cells, (r["p"], rid, PRICED[monthly]), unit, x, n, d)
        for period, rid, priced in sorted(cells):
            if after is not None and (period, rid, "", priced) <= after:
                continue
            values, dens = cells[(period, rid, priced)]
            num, den = exact(dens)
            out.append(
                UsageRow(
                    period=period, key=rid, key2="", values=values, amount=Fraction(num, den), attrs={}, priced=priced
                )
            )
            if len(out) == limit:
                break
        if len(out) == limit:
            break
    names = await resource_attrs(conn, [r.key for r in out])
    blank = {c: "" for c in _DIM_ATTRS["resource"]}
    return [UsageRow(r.period, r.key, r.key2, r.values, r.amount, names.get(r.key, blank), r.priced) for r in out]


def _next_period(granularity: str, period: date) -> date:
    if granularity == "day":
        return period + timedelta(days=1)
    return date(period.year + period.month // 12, period.month % 12 + 1, 1)


def _add_cell(
    cells: dict[tuple[Any, str, str], tuple[dict[str, int], dict[int, int]]],
    key: tuple[Any, str, str],
    unit: str,
    x: int,
    n: int,
    d: int,
) -> None:
    cell = cells.get(key)
    if cell is None:
        cell = cells[key] = ({}, {})
    cell[0][unit] = cell[0].get(unit, 0) + x
    cell[1][d] = cell[1].get(d, 0) + n


async def remember_price_models(conn: Conn, models: dict[UUID, str]) -> None:
    """Record the graduated and volume prices the charges named (prices are immutable: first write wins)."""
    if models:
        ids = sorted(models)
        await conn.execute(
            """INSERT INTO price_model (price_id, model) SELECT * FROM unnest($1::uuid[], $2::text[])
               ON CONFLICT (price_id) DO NOTHING""",
            ids, [models[i] for i in ids],
        )


# The ledger's usage lines carry org, meter and kind: the dimensions whose money it posts.
_LEDGER_DIMS = {"org": ("org_id", None), "meter": ("meter", None), "kind": ("meter", "resource_kind")}


async def monthly_money(
    conn: Conn, customer_id: UUID, granularity: str, dim: str, first: date | datetime, stop: date | datetime
) -> dict[tuple[Any, str, str], int]:
    """What the ledger posted for the customer's usage of graduated and volume prices, per (period, key,
    key2) of ``dim`` (org, meter or kind; {} for space and resource, which the ledger's lines do not carry):
    the microcredits of the usage lines naming such a price, of usage, late usage and correction
    transactions, in the period of their reading hour."""
    if dim not in _LEDGER_DIMS:
        return {}
    lo = first if isinstance(first, datetime) else ny_midnight(first)
    hi = stop if isinstance(stop, datetime) else ny_midnight(stop)
    rows = await conn.fetch(
        """
        SELECT t.reading_hour, l->>'org_id' AS org_id, l->>'meter' AS meter, l->>'resource_kind' AS resource_kind,
               (l->>'microcredits')::bigint AS microcredits
          FROM ledger_transaction t, jsonb_array_elements(t.usage) AS l
          JOIN price_model p ON p.price_id = (l->>'price_id')::uuid
         WHERE t.customer_id = $1 AND t.type IN ('usage', 'late_usage', 'correction')
           AND t.reading_hour >= $2 AND t.reading_hour < $3
        """,
        customer_id, lo, hi,
    )
    key_col, key2_col = _LEDGER_DIMS[dim]
    out: dict[tuple[Any, str, str], int] = {}
    for r in rows:
        hour = r["reading_hour"]
        period = hour if granularity == "hour" else ny_day(hour) if granularity == "day" else ny_month(hour)
        k = (period, r[key_col] or "", (r[key2_col] or "") if key2_col else "")
        out[k] = out.get(k, 0) + int(r["microcredits"])
    return out


# ------------------------------------------------------------------------------------------ entitlements


async def grant_entitlement(
    conn: Conn, subject: str, customer_id: UUID, granted_by: str
) -> tuple[asyncpg.Record, bool]:
    """(the entitlement, whether it was created now)."""
    row = await conn.fetchrow(
        """
        INSERT INTO entitlement (subject, customer_id, granted_by) VALUES ($1, $2, $3)
        ON CONFLICT (subject, customer_id) DO NOTHING
        RETURNING subject, customer_id, granted_by, granted_at
        """,
        subject,
        customer_id,
        granted_by,
    )
    if row is not None:
        return row, True
    existing = await conn.fetchrow(
        "SELECT subject, customer_id, granted_by, granted_at FROM entitlement WHERE subject = $1 AND customer_id = $2",
        subject,
        customer_id,
    )
    assert existing is not None
    return existing, False


async def entitlements_page(
    conn: Conn,
    *,
    subject: str | None,
    customer_id: UUID | None,
    after: tuple[str, UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT subject, customer_id, granted_by, granted_at FROM entitlement
        WHERE ($1::text IS NULL OR subject = $1)
          AND ($2::uuid IS NULL OR customer_id = $2)
          AND ($3::text IS NULL OR (subject, customer_id) > ($3, $4::uuid))
        ORDER BY subject, customer_id
        LIMIT $5
        """,
        subject,
        customer_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


async def revoke_entitlement(conn: Conn, subject: str, customer_id: UUID) -> bool:
    status = await conn.execute("DELETE FROM entitlement WHERE subject = $1 AND customer_id = $2", subject, customer_id)
    return status.endswith(" 1")
