"""Every SQL statement of the ledger. Functions take a connection inside the caller's transaction; the
caller (service) owns the transaction boundary.

Usage posting keeps its state per shard of resources (``shard_state``, ``held_shards``: one row per
charges batch, the items as a document) and its exact sums per (customer, month, price) (``month_usage``);
``posting.py`` does the arithmetic, a handful of statements per batch read and write the rows. The
documents are stored compressed (``shared/blobs.py``): the functions here take and give them plain.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from fractions import Fraction

import asyncpg
import orjson

from services.ledger.domain import (
    NIL_PRICE,
    Account,
    Book,
    Entry,
    Pool,
    TransactionDraft,
    UsageAmount,
)
from shared.batches import ShardKey
from shared.blobs import Frames, shard_scope
from shared.contracts import StatementIssued
from shared.db import Conn

USAGE_LINE_COLUMNS = ("transaction_id", "org_id", "meter", "resource_kind", "price_id", "month", "microcredits")

# ---------------------------------------------------------------- posting: shard state, held charges, groups

_SHARD_KEYS = "unnest($1::timestamptz[], $2::text[], $3::int2[]) AS k(reading_hour, meter, shard)"


def _key_arrays(keys: Iterable[ShardKey]) -> tuple[list[datetime], list[str], list[int]]:
    ks = sorted(set(keys))
    return [k.reading_hour for k in ks], [k.meter for k in ks], [k.shard for k in ks]


async def lock_shard_states(conn: Conn, frames: Frames, keys: Iterable[ShardKey]) -> dict[ShardKey, bytes]:
    """The applied charges of the shards ``keys`` that have any (their items document), locked until the
    end of the transaction. Empty for a shard's first batch, which is almost always the case."""
    rows = await conn.fetch(
        f"""SELECT s.reading_hour, s.meter, s.shard, s.items
              FROM {_SHARD_KEYS}
              JOIN shard_state s ON s.reading_hour = k.reading_hour AND s.meter = k.meter AND s.shard = k.shard
             ORDER BY 1, 2, 3 FOR UPDATE OF s""",
        *_key_arrays(keys),
    )
    docs = await frames.unpack_all(conn, [r["items"] for r in rows])
    return {ShardKey(r["reading_hour"], r["meter"], r["shard"]): d for r, d in zip(rows, docs, strict=True)}


async def save_shard_states(conn: Conn, frames: Frames, rows: Sequence[tuple[ShardKey, int, int, bytes]]) -> None:
    """Insert or replace shard states: (shard, posted, revisions, items document)."""
    if not rows:
        return
    await conn.execute(
        """INSERT INTO shard_state (reading_hour, meter, shard, posted, revisions, items)
           SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int2[], $4::int4[], $5::int8[], $6::bytea[])
           ON CONFLICT (reading_hour, meter, shard) DO UPDATE
              SET posted = EXCLUDED.posted, revisions = EXCLUDED.revisions, items = EXCLUDED.items""",
        [r[0].reading_hour for r in rows], [r[0].meter for r in rows], [r[0].shard for r in rows],
        [r[1] for r in rows], [r[2] for r in rows], [frames.pack(shard_scope(r[0]), r[3]) for r in rows],
    )


async def insert_shard_states(conn: Conn, frames: Frames, rows: Sequence[tuple[ShardKey, int, int, bytes]]) -> int:
    """Insert the states of shards that had none when locked, unless another transaction inserted one
    meanwhile (this waits for it to end); returns how many were inserted."""
    if not rows:
        return 0
    status = await conn.execute(
        """INSERT INTO shard_state (reading_hour, meter, shard, posted, revisions, items)
           SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int2[], $4::int4[], $5::int8[], $6::bytea[])
           ON CONFLICT DO NOTHING""",
        [r[0].reading_hour for r in rows], [r[0].meter for r in rows], [r[0].shard for r in rows],
        [r[1] for r in rows], [r[2] for r in rows], [frames.pack(shard_scope(r[0]), r[3]) for r in rows],
    )
    return int(status.split()[-1])


async def lock_held(conn: Conn, frames: Frames, keys: Iterable[ShardKey]) -> dict[tuple[ShardKey, str], bytes]:
    """The held charges of the shards ``keys``, per org, locked."""
    rows = await conn.fetch(
        f"""SELECT h.reading_hour, h.meter, h.shard, h.org_id, h.items
              FROM {_SHARD_KEYS}
              JOIN held_shards h ON h.reading_hour = k.reading_hour AND h.meter = k.meter AND h.shard = k.shard
             ORDER BY 1, 2, 3, 4 FOR UPDATE OF h""",
        *_key_arrays(keys),
    )
    docs = await frames.unpack_all(conn, [r["items"] for r in rows])
    return {
        (ShardKey(r["reading_hour"], r["meter"], r["shard"]), r["org_id"]): d for r, d in zip(rows, docs, strict=True)
    }


async def save_held(
    conn: Conn,
    frames: Frames,
    rows: Sequence[tuple[ShardKey, str, int, int, bytes]],
    gone: Sequence[tuple[ShardKey, str]],
) -> None:
    """Insert or replace held charges (shard, org, held, revisions, items document); delete ``gone``."""
    if rows:
        await conn.execute(
            """INSERT INTO held_shards (reading_hour, meter, shard, org_id, held, revisions, items)
               SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int2[], $4::text[], $5::int4[], $6::int8[],
                                    $7::bytea[])
               ON CONFLICT (reading_hour, meter, shard, org_id) DO UPDATE
                  SET held = EXCLUDED.held, revisions = EXCLUDED.revisions, items = EXCLUDED.items, held_at = now()""",
            [r[0].reading_hour for r in rows], [r[0].meter for r in rows], [r[0].shard for r in rows],
            [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
            [frames.pack(shard_scope(r[0]), r[4]) for r in rows],
        )
    if gone:
        await conn.execute(
            """DELETE FROM held_shards h
                USING unnest($1::timestamptz[], $2::text[], $3::int2[], $4::text[])
                      AS k(reading_hour, meter, shard, org_id)
                WHERE h.reading_hour = k.reading_hour AND h.meter = k.meter AND h.shard = k.shard
                  AND h.org_id = k.org_id""",
            [g[0].reading_hour for g in gone], [g[0].meter for g in gone], [g[0].shard for g in gone],
            [g[1] for g in gone],
        )


async def insert_held(conn: Conn, frames: Frames, rows: Sequence[tuple[ShardKey, str, int, int, bytes]]) -> int:
    """Insert held charges of (shard, org) pairs that had none when locked, unless another transaction
    inserted them meanwhile; returns how many were inserted."""
    if not rows:
        return 0
    status = await conn.execute(
        """INSERT INTO held_shards (reading_hour, meter, shard, org_id, held, revisions, items)
           SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int2[], $4::text[], $5::int4[], $6::int8[],
                                $7::bytea[])
           ON CONFLICT DO NOTHING""",
        [r[0].reading_hour for r in rows], [r[0].meter for r in rows], [r[0].shard for r in rows],
        [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
            [frames.pack(shard_scope(r[0]), r[4]) for r in rows],
    )
    return int(status.split()[-1])


async def resolvable_held(
    conn: Conn, org_id: str | None, limit: int, before: datetime | None = None
) -> list[tuple[ShardKey, str]]:
    """Held (shard, org) rows whose org now has a customer at their hour (one org, or all; reading hours
    before ``before`` only, when given). Not locked here: posting them locks them in the posting order."""
    rows = await conn.fetch(
        """SELECT h.reading_hour, h.meter, h.shard, h.org_id
             FROM held_shards h
            WHERE ($1::text IS NULL OR h.org_id = $1)
              AND ($3::timestamptz IS NULL OR h.reading_hour < $3)
              AND EXISTS (SELECT 1 FROM org_assignments a WHERE a.org_id = h.org_id AND a.starts_at <= h.reading_hour)
            ORDER BY h.reading_hour, h.meter, h.shard, h.org_id
            LIMIT $2""",
        org_id,
        limit,
        before,
    )
    return [(ShardKey(r["reading_hour"], r["meter"], r["shard"]), r["org_id"]) for r in rows]


async def owners(conn: Conn, pairs: Iterable[tuple[str, datetime]]) -> dict[tuple[str, datetime], uuid.UUID]:
    """The customer of each (org, hour) that has one: the assignment with the greatest starts_at <= hour.
    One index scan per org (its few assignments), resolved per hour here: a posting asks for a thousand
    orgs at several hours each."""
    ps = set(pairs)
    if not ps:
        return {}
    rows = await conn.fetch(
        "SELECT org_id, starts_at, customer_id FROM org_assignments WHERE org_id = ANY($1::text[])"
        " ORDER BY org_id, starts_at",
        sorted({org for org, _ in ps}),
    )
    history: dict[str, tuple[list[datetime], list[uuid.UUID]]] = {}
    for r in rows:
        starts, customers = history.setdefault(r["org_id"], ([], []))
        starts.append(r["starts_at"])
        customers.append(r["customer_id"])
    found: dict[tuple[str, datetime], uuid.UUID] = {}
    for org, hour in ps:
        h = history.get(org)
        if h is not None:
            at = bisect.bisect_right(h[0], hour)
            if at:
                found[(org, hour)] = h[1][at - 1]
    return found


async def group_ids(
    conn: Conn, keys: Iterable[tuple[uuid.UUID, date, uuid.UUID]]
) -> dict[tuple[uuid.UUID, date, uuid.UUID], int]:
    """The month_usage id of each (customer, month, price), created when missing (in key order: two
    instances creating the same rows wait for each other instead of deadlocking)."""
    ks = sorted(set(keys))
    if not ks:
        return {}
    args = ([k[0] for k in ks], [k[1] for k in ks], [k[2] for k in ks])
    await conn.execute(
        """INSERT INTO month_usage (customer_id, month, price_id)
           SELECT * FROM unnest($1::uuid[], $2::date[], $3::uuid[]) AS k(customer_id, month, price_id)
            WHERE NOT EXISTS (SELECT 1 FROM month_usage g
                               WHERE g.customer_id = k.customer_id AND g.month = k.month AND g.price_id = k.price_id)
            ORDER BY 1, 2, 3
           ON CONFLICT DO NOTHING""",
        *args,
    )
    rows = await conn.fetch(
        """SELECT g.id, g.customer_id, g.month, g.price_id
             FROM unnest($1::uuid[], $2::date[], $3::uuid[]) AS k(customer_id, month, price_id)
             JOIN month_usage g ON g.customer_id = k.customer_id AND g.month = k.month AND g.price_id = k.price_id""",
        *args,
    )
    return {(r["customer_id"], r["month"], r["price_id"]): r["id"] for r in rows}


async def group_prices(conn: Conn, ids: Iterable[int]) -> dict[int, uuid.UUID]:
    """The price of each (customer, month, price) row by id (no lock: a row's price never changes)."""
    rows = await conn.fetch("SELECT id, price_id FROM month_usage WHERE id = ANY($1::bigint[])", sorted(set(ids)))
    return {r["id"]: r["price_id"] for r in rows}


async def lock_groups(conn: Conn, ids: Iterable[int]) -> dict[int, asyncpg.Record]:
    """Lock (customer, month, price) rows in id order (two ledger instances posting for the same customer
    wait for each other instead of deadlocking) and read their exact sums, and for a graduated or volume
    price its exact units and its model (``model`` and ``bands`` null: a flat price)."""
    rows = await conn.fetch(
        """SELECT g.id, g.customer_id, g.month, g.price_id, g.sum_num::text AS sum_num, g.sum_den::text AS sum_den,
                  g.posted, g.units_num::text AS units_num, g.units_den::text AS units_den,
                  m.model, m.bands::text AS bands
             FROM month_usage g LEFT JOIN price_models m ON m.price_id = g.price_id
            WHERE g.id = ANY($1::bigint[]) ORDER BY g.id FOR UPDATE OF g""",
        sorted(set(ids)),
    )
    return {r["id"]: r for r in rows}


async def update_groups(conn: Conn, rows: Sequence[tuple[int, int, int, int]], units: Mapping[int, Fraction]) -> None:
    """Store new exact sums (id, numerator, denominator, posted), and the exact units of the groups of a
    graduated or volume price (``units``, by id); the CHECK on month_usage re-verifies that posted =
    floor(sum)."""
    flat = [r for r in rows if r[0] not in units] if units else rows
    if flat:
        await conn.execute(
            """UPDATE month_usage g SET sum_num = k.n, sum_den = k.d, posted = k.p
                 FROM unnest($1::bigint[], $2::numeric[], $3::numeric[], $4::bigint[]) AS k(id, n, d, p)
                WHERE g.id = k.id""",
            [r[0] for r in flat], [r[1] for r in flat], [r[2] for r in flat], [r[3] for r in flat],
        )
    banded = [(*r, units[r[0]]) for r in rows if r[0] in units]
    if banded:
        await conn.execute(
            """UPDATE month_usage g SET sum_num = k.n, sum_den = k.d, posted = k.p, units_num = k.un, units_den = k.ud
                 FROM unnest($1::bigint[], $2::numeric[], $3::numeric[], $4::bigint[], $5::numeric[], $6::numeric[])
                      AS k(id, n, d, p, un, ud)
                WHERE g.id = k.id""",
            [r[0] for r in banded], [r[1] for r in banded], [r[2] for r in banded], [r[3] for r in banded],
            [r[4].numerator for r in banded], [r[4].denominator for r in banded],
        )


async def store_price_models(conn: Conn, models: Mapping[uuid.UUID, tuple[str, str]]) -> None:
    """Record the model and bands (JSON text) of graduated and volume prices not known yet (a known one is
    left as it is: its batches are compared with it by ``price_models``)."""
    if models:
        ids = sorted(models)
        await conn.execute(
            """INSERT INTO price_models (price_id, model, bands)
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) ORDER BY 1
               ON CONFLICT DO NOTHING""",
            ids, [models[i][0] for i in ids], [models[i][1] for i in ids],
        )


async def price_models(conn: Conn, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, tuple[str, str]]:
    """The stored (model, bands JSON text) of those of ``ids`` that are graduated or volume prices."""
    rows = await conn.fetch(
        "SELECT price_id, model, bands::text AS bands FROM price_models WHERE price_id = ANY($1::uuid[])",
        sorted(set(ids)),
    )
    return {r["price_id"]: (r["model"], r["bands"]) for r in rows}


# ---------------------------------------------------------------- months

# Postings into a month hold its lock shared; closing it holds it exclusively, so a statement sees every
# posting into its month and no posting lands in a month after it is closed.
_MONTH_LOCK_CLASS = "hashtext('billing.ledger.month')"


def _month_key(month: date) -> int:
    return month.year * 100 + month.month


async def lock_months_shared(conn: Conn, months: Iterable[date]) -> None:
    for m in sorted(months):
        await conn.execute(f"SELECT pg_advisory_xact_lock_shared({_MONTH_LOCK_CLASS}, $1)", _month_key(m))


async def lock_month_exclusive(conn: Conn, month: date) -> None:
    await conn.execute(f"SELECT pg_advisory_xact_lock({_MONTH_LOCK_CLASS}, $1)", _month_key(month))


async def closed_months(conn: Conn) -> frozenset[date]:
    return frozenset(r["month"] for r in await conn.fetch("SELECT month FROM month_closes"))


async def month_close(conn: Conn, month: date) -> datetime | None:
    closed_at: datetime | None = await conn.fetchval("SELECT closed_at FROM month_closes WHERE month = $1", month)
    return closed_at


async def insert_month_close(conn: Conn, month: date, closed_at: datetime) -> None:
    await conn.execute("INSERT INTO month_closes (month, closed_at) VALUES ($1, $2)", month, closed_at)


async def first_activity(conn: Conn) -> datetime | None:
    """When the earliest transaction occurred (months before it need no statement)."""
    first: datetime | None = await conn.fetchval("SELECT min(occurred_at) FROM transactions")
    return first


# ---------------------------------------------------------------- books: accounts and agreements


async def load_books(conn: Conn, customer_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Book]:
    """Lock the accounts of these customers (in id order) and read them with their agreements."""
    ids = sorted(set(customer_ids))
    if not ids:
        return {}
    accounts = await conn.fetch(
        """SELECT id, customer_id, name, type, agreement_id, balance FROM accounts
            WHERE customer_id = ANY($1::uuid[]) ORDER BY id FOR UPDATE""",
        ids,
    )
    agreements = await conn.fetch(
        """SELECT id, customer_id, starts_at, ends_at, credits, expired_at IS NOT NULL AS expired
             FROM agreements WHERE customer_id = ANY($1::uuid[])""",
        ids,
    )
    books = {cid: Book(cid, {}) for cid in ids}
    pool_accounts: dict[uuid.UUID, Account] = {}
    for r in accounts:
        acct = Account(r["id"], r["name"], r["type"], r["balance"])
        if r["agreement_id"] is not None:
            pool_accounts[r["agreement_id"]] = acct
        books[r["customer_id"]].accounts[r["name"]] = acct
    for r in agreements:
        pool_acct = pool_accounts.get(r["id"])
        if pool_acct is None:
            continue
        books[r["customer_id"]].pools.append(
            Pool(r["id"], r["starts_at"], r["ends_at"], r["credits"], r["expired"], pool_acct)
        )
    return books


async def insert_transactions(
    conn: Conn, drafts: Sequence[TransactionDraft], ids: Sequence[uuid.UUID], posted_at: datetime
) -> None:
    """Insert transactions with their entries and usage lines: three statements whatever their number."""
    if not drafts:
        return
    await conn.execute(
        """
        INSERT INTO transactions (id, customer_id, type, occurred_at, reading_hour, description, idempotency_key,
                                  reverses, agreement_id, corrects_month, posted_at)
        SELECT t.*, $11::timestamptz
          FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[],
                      $7::text[], $8::uuid[], $9::uuid[], $10::date[]) AS t
        """,
        list(ids),
        [d.customer_id for d in drafts],
        [d.type for d in drafts],
        [d.occurred_at for d in drafts],
        [d.reading_hour for d in drafts],
        [d.description for d in drafts],
        [d.idempotency_key for d in drafts],
        [d.reverses for d in drafts],
        [d.agreement_id for d in drafts],
        [d.corrects_month for d in drafts],
        posted_at,
    )
    e_txn: list[uuid.UUID] = []
    e_acct: list[int] = []
    e_side: list[str] = []
    e_amt: list[int] = []
    lines: list[tuple[uuid.UUID, str, str, str, uuid.UUID | None, date, int]] = []
    for tid, d in zip(ids, drafts, strict=True):
        for e in d.entries:
            e_txn.append(tid)
            e_acct.append(e.account_id)
            e_side.append(e.side)
            e_amt.append(e.amount)
        lines += [(tid, u.org_id, u.meter, u.resource_kind, u.price_id, u.month, u.microcredits) for u in d.usage]
    await conn.execute(
        """INSERT INTO entries (transaction_id, account_id, side, amount)
           SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[])""",
        e_txn,
        e_acct,
        e_side,
        e_amt,
    )
    if lines:
        # COPY: a usage transaction has a line per org, meter, kind and price (thousands per posting), and
        # COPY writes them a few times faster than INSERT ... unnest (the reference to transactions is still
        # checked, once per statement: migration 005).
        await conn.copy_records_to_table("usage_lines", records=lines, columns=USAGE_LINE_COLUMNS)


async def insert_alerts(
    conn: Conn, rows: Sequence[tuple[uuid.UUID, int, uuid.UUID, int, int, datetime]]
) -> list[asyncpg.Record]:
    """Record threshold crossings (agreement, threshold, customer, funded, used, raised_at); returns only
    those not raised before."""
    if not rows:
        return []
    cols = list(zip(*rows, strict=True))
    return await conn.fetch(
        """
        INSERT INTO alerts (agreement_id, threshold_percent, customer_id, funded, used, raised_at)
        SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::bigint[], $5::bigint[], $6::timestamptz[])
        ON CONFLICT DO NOTHING
        RETURNING agreement_id, threshold_percent, customer_id, funded, used, raised_at
        """,
        *[list(c) for c in cols],
    )


# ---------------------------------------------------------------- outbox


async def insert_outbox(conn: Conn, messages: Sequence[tuple[str, bytes | None, bytes]]) -> list[int]:
    if not messages:
        return []
    topics, keys, payloads = (list(c) for c in zip(*messages, strict=True))
    rows = await conn.fetch(
        """INSERT INTO outbox (topic, key, payload)
           SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) RETURNING id""",
        topics,
        keys,
        payloads,
    )
    return sorted(r["id"] for r in rows)


async def outbox_by_ids(conn: Conn, ids: Sequence[int]) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, topic, key, payload FROM outbox WHERE id = ANY($1::bigint[]) ORDER BY id", list(ids)
    )


async def lock_stale_outbox(conn: Conn, older_than: datetime, limit: int) -> list[asyncpg.Record]:
    """Outbox rows left behind (a crash between commit and publish), locked so one sweeper sends them."""
    return await conn.fetch(
        """SELECT id, topic, key, payload FROM outbox WHERE created_at <= $1
            ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED""",
        older_than,
        limit,
    )


async def delete_outbox(conn: Conn, ids: Sequence[int]) -> None:
    await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", list(ids))


# ---------------------------------------------------------------- tiers, customers, assignments


async def insert_tier(conn: Conn, name: str, credits: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """INSERT INTO tiers (name, credits_per_period) VALUES ($1, $2) ON CONFLICT DO NOTHING
           RETURNING name, credits_per_period, created_at""",
        name,
        credits,
    )


async def get_tier(conn: Conn, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT name, credits_per_period, created_at FROM tiers WHERE name = $1", name)


async def list_tiers(conn: Conn, after: str | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT name, credits_per_period, created_at FROM tiers
            WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2""",
        after,
        limit,
    )


async def insert_customer(
    conn: Conn, customer_id: uuid.UUID, name: str, tier: str, accounts: Sequence[str]
) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO customers (id, name, tier) VALUES ($1, $2, $3) RETURNING id, name, tier, created_at",
        customer_id,
        name,
        tier,
    )
    await conn.execute(
        """INSERT INTO accounts (customer_id, type, name)
           SELECT $1, a, a FROM unnest($2::text[]) AS a""",
        customer_id,
        list(accounts),
    )
    assert row is not None  # INSERT ... RETURNING answers its row or raises
    return row


async def get_customer(conn: Conn, customer_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT id, name, tier, created_at FROM customers WHERE id = $1", customer_id)


async def list_customers(conn: Conn, after: uuid.UUID | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT id, name, tier, created_at FROM customers
            WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2""",
        after,
        limit,
    )


async def customers_active_before(conn: Conn, end: datetime) -> list[uuid.UUID]:
    """Customers created before ``end`` or with a transaction before it: those a month ending at ``end``
    has a statement for."""
    rows = await conn.fetch(
        """SELECT id FROM customers WHERE created_at < $1
           UNION SELECT DISTINCT customer_id FROM transactions WHERE occurred_at < $1
           ORDER BY 1""",
        end,
    )
    return [r["id"] for r in rows]


async def insert_assignment(
    conn: Conn, org_id: str, customer_id: uuid.UUID, starts_at: datetime
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """INSERT INTO org_assignments (org_id, starts_at, customer_id) VALUES ($1, $2, $3)
           ON CONFLICT DO NOTHING RETURNING org_id, customer_id, starts_at, created_at""",
        org_id,
        starts_at,
        customer_id,
    )


async def assignments_around(conn: Conn, org_id: str, starts_at: datetime) -> tuple[uuid.UUID | None, datetime | None]:
    """The customer of the org's assignment in force just before ``starts_at`` (None: none), and when its
    next assignment after ``starts_at`` starts (None: none)."""
    row = await conn.fetchrow(
        """SELECT (SELECT customer_id FROM org_assignments WHERE org_id = $1 AND starts_at < $2
                    ORDER BY starts_at DESC LIMIT 1) AS before,
                  (SELECT min(starts_at) FROM org_assignments WHERE org_id = $1 AND starts_at > $2) AS until""",
        org_id,
        starts_at,
    )
    assert row is not None  # a SELECT of two scalar subqueries answers one row
    return row["before"], row["until"]


async def list_assignments(
    conn: Conn, org_id: str | None, customer_id: uuid.UUID | None, after: tuple[str, datetime] | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT org_id, customer_id, starts_at, created_at FROM org_assignments
            WHERE ($1::text IS NULL OR org_id = $1) AND ($2::uuid IS NULL OR customer_id = $2)
              AND ($3::text IS NULL OR (org_id, starts_at) > ($3, $4::timestamptz))
            ORDER BY org_id, starts_at LIMIT $5""",
        org_id,
        customer_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


async def list_held(
    conn: Conn, frames: Frames, after: tuple[datetime, str, int, str] | None, limit: int
) -> list[tuple[asyncpg.Record, bytes]]:
    """Held (shard, org) rows in key order from ``after`` (inclusive: the caller skips what it listed), each
    with its items document."""
    h, m, s, o = after if after is not None else (None, None, None, None)
    rows = await conn.fetch(
        # COLLATE "C": the caller compares positions in Python (code point order), whatever the database's
        # default collation (a managed PostgreSQL is often en_US, which orders "org-a" before "org-B").
        """SELECT reading_hour, meter, shard, org_id, held_at, items FROM held_shards
            WHERE $1::timestamptz IS NULL
               OR (reading_hour, meter COLLATE "C", shard, org_id COLLATE "C")
                  >= ($1, $2::text COLLATE "C", $3::int2, $4::text COLLATE "C")
            ORDER BY reading_hour, meter COLLATE "C", shard, org_id COLLATE "C" LIMIT $5""",
        h, m, s, o, limit,
    )
    return list(zip(rows, await frames.unpack_all(conn, [r["items"] for r in rows]), strict=True))


# ---------------------------------------------------------------- agreements


async def insert_agreement(
    conn: Conn,
    agreement_id: uuid.UUID,
    customer_id: uuid.UUID,
    starts_at: datetime,
    ends_at: datetime,
    credits: int,
    pool_name: str,
) -> int:
    """Insert an agreement and its credit pool account; returns the account id."""
    await conn.execute(
        "INSERT INTO agreements (id, customer_id, starts_at, ends_at, credits) VALUES ($1, $2, $3, $4, $5)",
        agreement_id,
        customer_id,
        starts_at,
        ends_at,
        credits,
    )
    return int(
        await conn.fetchval(
            """INSERT INTO accounts (customer_id, type, agreement_id, name) VALUES ($1, 'credit_pool', $2, $3)
               RETURNING id""",
            customer_id,
            agreement_id,
            pool_name,
        )
    )


_AGREEMENT_COLUMNS = """a.id, a.customer_id, a.starts_at, a.ends_at, a.credits, a.created_at, a.expired_at,
       a.expiry_transaction_id, -p.balance AS remaining"""


async def list_agreements(
    conn: Conn, customer_id: uuid.UUID | None, after: uuid.UUID | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_AGREEMENT_COLUMNS}
              FROM agreements a JOIN accounts p ON p.agreement_id = a.id
             WHERE ($1::uuid IS NULL OR a.customer_id = $1) AND ($2::uuid IS NULL OR a.id > $2)
             ORDER BY a.id LIMIT $3""",
        customer_id,
        after,
        limit,
    )


async def get_agreement(conn: Conn, agreement_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_AGREEMENT_COLUMNS} FROM agreements a JOIN accounts p ON p.agreement_id = a.id WHERE a.id = $1",
        agreement_id,
    )


async def due_agreements(conn: Conn, ended_before: datetime, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT id, customer_id, ends_at FROM agreements
            WHERE expired_at IS NULL AND ends_at <= $1 ORDER BY ends_at, id LIMIT $2""",
        ended_before,
        limit,
    )


async def lock_unexpired_agreement(conn: Conn, agreement_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, customer_id, ends_at FROM agreements WHERE id = $1 AND expired_at IS NULL FOR UPDATE",
        agreement_id,
    )


async def mark_expired(conn: Conn, agreement_id: uuid.UUID, at: datetime, transaction_id: uuid.UUID | None) -> None:
    await conn.execute(
        "UPDATE agreements SET expired_at = $2, expiry_transaction_id = $3 WHERE id = $1",
        agreement_id,
        at,
        transaction_id,
    )


# ---------------------------------------------------------------- transactions


async def get_transaction(conn: Conn, transaction_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT id, customer_id, type, occurred_at, reading_hour, description, idempotency_key, reverses,
                  agreement_id, corrects_month, posted_at
             FROM transactions WHERE id = $1""",
        transaction_id,
    )


async def reversal_of(conn: Conn, transaction_id: uuid.UUID) -> uuid.UUID | None:
    reversal: uuid.UUID | None = await conn.fetchval("SELECT id FROM transactions WHERE reverses = $1", transaction_id)
    return reversal


async def transaction_entries(conn: Conn, transaction_id: uuid.UUID) -> list[Entry]:
    rows = await conn.fetch(
        """SELECT e.account_id, a.name, e.side, e.amount FROM entries e JOIN accounts a ON a.id = e.account_id
            WHERE e.transaction_id = $1 ORDER BY e.account_id, e.side""",
        transaction_id,
    )
    return [Entry(r["account_id"], r["name"], r["side"], r["amount"]) for r in rows]


async def transaction_usage(conn: Conn, transaction_id: uuid.UUID) -> list[UsageAmount]:
    rows = await conn.fetch(
        """SELECT org_id, meter, resource_kind, price_id, month, microcredits FROM usage_lines
            WHERE transaction_id = $1 ORDER BY org_id, meter, resource_kind, price_id""",
        transaction_id,
    )
    return [
        UsageAmount(
            r["org_id"], r["meter"], r["resource_kind"], r["price_id"] or NIL_PRICE, r["month"], r["microcredits"]
        )
        for r in rows
    ]


# ---------------------------------------------------------------- balances and statements

# Movements per customer and account type, before `start` and within [start, end): signed debits minus
# credits. Only funding, usage and expired matter: remaining = funding - usage - expired (normal sides).
_FLOWS = """
SELECT t.customer_id, a.type,
       coalesce(sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END)
                FILTER (WHERE t.occurred_at < $1), 0)::bigint AS before,
       coalesce(sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END)
                FILTER (WHERE t.occurred_at >= $1), 0)::bigint AS during
  FROM transactions t
  JOIN entries e ON e.transaction_id = t.id
  JOIN accounts a ON a.id = e.account_id
 WHERE t.occurred_at < $2 AND a.type IN ('funding', 'usage', 'expired') {customer_filter}
 GROUP BY t.customer_id, a.type
"""


async def flows(
    conn: Conn, start: datetime, end: datetime, customer_id: uuid.UUID | None = None
) -> list[asyncpg.Record]:
    if customer_id is None:
        return await conn.fetch(_FLOWS.format(customer_filter=""), start, end)
    return await conn.fetch(_FLOWS.format(customer_filter="AND t.customer_id = $3"), start, end, customer_id)


async def used_by_kind(conn: Conn, start: datetime, end: datetime) -> list[asyncpg.Record]:
    """Usage posted within [start, end) per customer, meter, resource kind and price (late usage and
    corrections dated in it included)."""
    return await conn.fetch(
        """SELECT t.customer_id, u.meter, u.resource_kind, u.price_id, sum(u.microcredits)::bigint AS microcredits
             FROM transactions t JOIN usage_lines u ON u.transaction_id = t.id
            WHERE t.occurred_at >= $1 AND t.occurred_at < $2
            GROUP BY t.customer_id, u.meter, u.resource_kind, u.price_id
            ORDER BY t.customer_id, u.meter, u.resource_kind, u.price_id""",
        start,
        end,
    )


async def pool_balances_as_of(conn: Conn, customer_id: uuid.UUID, as_of: datetime) -> list[asyncpg.Record]:
    """Each agreement of the customer with what its pool held at ``as_of`` (by occurred_at)."""
    return await conn.fetch(
        """SELECT a.id, a.starts_at, a.ends_at, a.credits, a.expired_at,
                  coalesce((SELECT -sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END)
                              FROM entries e JOIN transactions t ON t.id = e.transaction_id
                             WHERE e.account_id = p.id AND t.occurred_at <= $2), 0)::bigint AS remaining
             FROM agreements a JOIN accounts p ON p.agreement_id = a.id
            WHERE a.customer_id = $1
            ORDER BY a.ends_at, a.starts_at, a.id""",
        customer_id,
        as_of,
    )


async def insert_statements(conn: Conn, statements: Sequence[tuple[StatementIssued, int]]) -> list[uuid.UUID]:
    """Store statement versions (each with the number of the month's correction transactions it covers),
    unless that (customer, month, version) exists already; returns the ids of those stored."""
    if not statements:
        return []
    rows = await conn.fetch(
        """INSERT INTO statements (customer_id, month, version, id, opening_balance, funded, used, expired,
                                   closing_balance, used_by_kind, issued_at, original_used, correction, reasons,
                                   corrections)
           SELECT * FROM unnest($1::uuid[], $2::date[], $3::int[], $4::uuid[], $5::bigint[], $6::bigint[],
                                $7::bigint[], $8::bigint[], $9::bigint[], $10::jsonb[], $11::timestamptz[],
                                $12::bigint[], $13::bigint[], $14::jsonb[], $15::int[])
           ON CONFLICT DO NOTHING
           RETURNING id""",
        [m.customer_id for m, _ in statements],
        [date.fromisoformat(m.month + "-01") for m, _ in statements],
        [m.version for m, _ in statements],
        [m.id for m, _ in statements],
        [m.opening_balance for m, _ in statements],
        [m.funded for m, _ in statements],
        [m.used for m, _ in statements],
        [m.expired for m, _ in statements],
        [m.closing_balance for m, _ in statements],
        [orjson.dumps([line.model_dump(mode="json") for line in m.used_by_kind]).decode() for m, _ in statements],
        [m.issued_at for m, _ in statements],
        [m.original_used for m, _ in statements],
        [m.correction for m, _ in statements],
        [orjson.dumps(m.reasons).decode() for m, _ in statements],
        [n for _, n in statements],
    )
    return [r["id"] for r in rows]


_STATEMENT_COLUMNS = """customer_id, month, version, id, opening_balance, funded, used, expired, closing_balance,
       used_by_kind::text AS used_by_kind, issued_at, original_used, correction, reasons::text AS reasons,
       corrections"""


async def get_statement(
    conn: Conn, customer_id: uuid.UUID, month: date, version: int | None = None
) -> asyncpg.Record | None:
    """A version of the month's statement (None: the latest)."""
    return await conn.fetchrow(
        f"""SELECT {_STATEMENT_COLUMNS} FROM statements
             WHERE customer_id = $1 AND month = $2 AND ($3::int IS NULL OR version = $3)
             ORDER BY version DESC LIMIT 1""",
        customer_id,
        month,
        version,
    )


async def statement_versions(conn: Conn, customer_id: uuid.UUID, month: date) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT version, id, issued_at, used, correction FROM statements
            WHERE customer_id = $1 AND month = $2 ORDER BY version""",
        customer_id,
        month,
    )


async def lock_statements(conn: Conn, customer_id: uuid.UUID, month: date) -> list[asyncpg.Record]:
    """The month's statement versions, in order, locked (two instances amending one month wait in turn)."""
    return await conn.fetch(
        f"""SELECT {_STATEMENT_COLUMNS} FROM statements
             WHERE customer_id = $1 AND month = $2 ORDER BY version FOR UPDATE""",
        customer_id,
        month,
    )


async def due_amendments(conn: Conn, quiet_since: datetime, limit: int) -> list[tuple[uuid.UUID, date]]:
    """(customer, closed month) pairs with correction transactions that their latest statement version does
    not cover, none of them posted after ``quiet_since``."""
    rows = await conn.fetch(
        """WITH fixes AS (SELECT customer_id, corrects_month AS month, count(*) AS n, max(posted_at) AS last
                            FROM transactions WHERE type = 'correction'
                           GROUP BY customer_id, corrects_month)
           SELECT f.customer_id, f.month
             FROM fixes f
             JOIN LATERAL (SELECT s.corrections FROM statements s
                            WHERE s.customer_id = f.customer_id AND s.month = f.month
                            ORDER BY s.version DESC LIMIT 1) l ON true
            WHERE f.n > l.corrections AND f.last <= $1
            ORDER BY f.customer_id, f.month LIMIT $2""",
        quiet_since,
        limit,
    )
    return [(r["customer_id"], r["month"]) for r in rows]


async def month_corrections(conn: Conn, customer_id: uuid.UUID, month: date) -> asyncpg.Record:
    """The correction transactions of a customer's closed month, read in one statement (one snapshot): their
    number ``n``, when the last was posted, their descriptions (distinct, in the order posted: ``reasons``,
    JSON) and their usage per (meter, kind, price) (``lines``, JSON [meter, kind, price id, microcredits])."""
    row = await conn.fetchrow(
        """WITH t AS (SELECT id, description, posted_at FROM transactions
                       WHERE type = 'correction' AND customer_id = $1 AND corrects_month = $2)
           SELECT (SELECT count(*) FROM t) AS n,
                  (SELECT max(posted_at) FROM t) AS last,
                  (SELECT coalesce(jsonb_agg(d ORDER BY first, d), '[]')
                     FROM (SELECT description AS d, min(posted_at) AS first FROM t GROUP BY description) x
                  )::text AS reasons,
                  (SELECT coalesce(jsonb_agg(jsonb_build_array(meter, resource_kind, price_id, s)
                                             ORDER BY meter, resource_kind, price_id), '[]')
                     FROM (SELECT u.meter, u.resource_kind, u.price_id, sum(u.microcredits)::bigint AS s
                             FROM usage_lines u JOIN t ON t.id = u.transaction_id
                            GROUP BY u.meter, u.resource_kind, u.price_id) y
                  )::text AS lines""",
        customer_id,
        month,
    )
    assert row is not None  # a SELECT of scalar subqueries answers one row
    return row


async def count_statements(conn: Conn, month: date) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM statements WHERE month = $1 AND version = 1", month))



async def balance_flows(conn: Conn, customer_id: uuid.UUID, as_of: datetime) -> dict[str, int]:
    """Signed (debits minus credits) totals per account type of a customer, over transactions that
    occurred at or before ``as_of``."""
    rows = await conn.fetch(
        """SELECT a.type, sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END)::bigint AS signed
             FROM transactions t
             JOIN entries e ON e.transaction_id = t.id
             JOIN accounts a ON a.id = e.account_id
            WHERE t.customer_id = $1 AND t.occurred_at <= $2
            GROUP BY a.type""",
        customer_id,
        as_of,
    )
    return {r["type"]: int(r["signed"]) for r in rows}


# ---------------------------------------------------------------- completeness report


async def completeness_counts(conn: Conn, since: datetime, until: datetime) -> list[asyncpg.Record]:
    """Per reading hour and meter: charges applied to a customer's month (posted, zero and unpriced ones
    included), charges held for want of a customer (not counting one applied meanwhile), and the sum of
    their revisions."""
    return await conn.fetch(
        """
        SELECT hour, meter, sum(posted)::bigint AS posted, sum(held)::bigint AS held,
               sum(revisions)::bigint AS revisions
          FROM (SELECT reading_hour AS hour, meter, posted, 0 AS held, revisions
                  FROM shard_state WHERE reading_hour >= $1 AND reading_hour < $2
                UNION ALL
                SELECT reading_hour, meter, 0, held, revisions
                  FROM held_shards WHERE reading_hour >= $1 AND reading_hour < $2) t
         GROUP BY hour, meter
         ORDER BY hour, meter
        """,
        since,
        until,
    )
