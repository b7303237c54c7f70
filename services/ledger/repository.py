"""Every SQL statement of the ledger. Functions take a connection inside the caller's transaction; the
caller (service) owns the transaction boundary.

Usage posting is set-based: a batch of charges is COPYed into a temporary table, then a handful of
statements resolve orgs to customers, compare with the applied revisions, compute the exact per
(customer, month, price) sums and the whole microcredits each (hour, org, meter, kind) adds to the posted
floor, and update the state. Python only sees the aggregated result (a few rows per customer-hour).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any

import asyncpg

from services.ledger.domain import (
    NIL_PRICE,
    Account,
    Book,
    Entry,
    Pool,
    TransactionDraft,
    UsageAmount,
)

Conn = asyncpg.Connection | Any  # a pool proxy is an asyncpg connection too

INCOMING_COLUMNS = (
    "measurement_id",
    "revision",
    "reading_hour",
    "org_id",
    "meter",
    "resource_kind",
    "resource_id",
    "price_id",
    "num",
    "den",
)

# ---------------------------------------------------------------- posting pipeline: temporary tables

# Created once per connection and emptied at every commit; IF NOT EXISTS keeps them across batches, so a
# batch pays no catalog writes. client_min_messages hides the "already exists" notice; the larger work_mem
# keeps a batch's sorts in memory.
_WORK_TABLES = """
SET LOCAL client_min_messages = warning;
SET LOCAL work_mem = '64MB';
CREATE TEMP TABLE IF NOT EXISTS ledger_incoming (
    measurement_id uuid NOT NULL, revision integer NOT NULL, reading_hour timestamptz NOT NULL,
    org_id text NOT NULL, meter text NOT NULL, resource_kind text NOT NULL, resource_id text NOT NULL,
    price_id uuid NOT NULL, num bigint NOT NULL, den bigint NOT NULL
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ledger_work (
    measurement_id uuid, revision integer, reading_hour timestamptz, org_id text, meter text,
    resource_kind text, resource_id text, price_id uuid, num bigint, den bigint, customer_id uuid, month date,
    old_revision integer, old_group bigint, old_num bigint, old_den bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ledger_delta (
    group_id bigint, reading_hour timestamptz, org_id text, meter text, resource_kind text, num numeric, den bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ledger_alloc (
    group_id bigint, reading_hour timestamptz, org_id text, meter text, resource_kind text,
    n numeric, l numeric, base numeric, amount bigint
) ON COMMIT DELETE ROWS;
"""


async def prepare_work_tables(conn: Conn) -> None:
    await conn.execute(_WORK_TABLES)


async def copy_incoming(conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
    """COPY a batch of charges (tuples in INCOMING_COLUMNS order) into the batch table."""
    await conn.copy_records_to_table("ledger_incoming", records=rows, columns=INCOMING_COLUMNS)


async def load_held_into_incoming(conn: Conn, org_id: str | None, limit: int) -> int:
    """Put held charges whose org now has a customer at their hour into the batch table (one org, or all)."""
    status = await conn.execute(
        """
        INSERT INTO ledger_incoming
        SELECT h.measurement_id, h.revision, h.reading_hour, h.org_id, h.meter, h.resource_kind, h.resource_id,
               h.price_id, h.num, h.den
          FROM held_charges h
         WHERE ($1::text IS NULL OR h.org_id = $1)
           AND EXISTS (SELECT 1 FROM org_assignments a WHERE a.org_id = h.org_id AND a.starts_at <= h.reading_hour)
         ORDER BY h.measurement_id
         LIMIT $2
         FOR UPDATE OF h SKIP LOCKED
        """,
        org_id,
        limit,
    )
    return int(status.split()[-1])


async def incoming_months(conn: Conn) -> list[date]:
    rows = await conn.fetch("SELECT DISTINCT billing_month(reading_hour) AS m FROM ledger_incoming")
    return [r["m"] for r in rows]


async def incoming_digest(conn: Conn) -> str:
    """A digest of the batch's (measurement, revision) pairs: part of its usage transactions' keys."""
    value = await conn.fetchval(
        """SELECT left(md5(string_agg(measurement_id::text || ':' || revision::text, ','
                                      ORDER BY measurement_id, revision)), 24)
             FROM ledger_incoming"""
    )
    return str(value or "empty")


async def resolve(conn: Conn) -> None:
    """Fill ledger_work with the charges of the batch that change something: the latest revision of each
    measurement, its org's customer at its hour (null: unassigned) and the revision already applied (if
    any, with what it counted), in charge_state's key order. Orgs are resolved once per distinct (org,
    hour), not per charge. The sort that picks the latest revision comes last, so the rows leave it in
    charge_state's key order and apply_charges inserts them along the index (a revision not newer than the
    applied one is dropped before DISTINCT ON picks: the same pick, since the latest is newer if any is)."""
    await conn.execute(
        """
        INSERT INTO ledger_work
        WITH owners AS MATERIALIZED (
            SELECT k.org_id, k.reading_hour,
                   (SELECT a.customer_id FROM org_assignments a
                     WHERE a.org_id = k.org_id AND a.starts_at <= k.reading_hour
                     ORDER BY a.starts_at DESC LIMIT 1) AS customer_id
              FROM (SELECT DISTINCT org_id, reading_hour FROM ledger_incoming) k
        )
        SELECT DISTINCT ON (l.reading_hour, l.measurement_id)
               l.measurement_id, l.revision, l.reading_hour, l.org_id, l.meter, l.resource_kind, l.resource_id,
               l.price_id, l.num, l.den, o.customer_id, billing_month(l.reading_hour),
               s.revision, s.group_id, s.num, s.den
          FROM ledger_incoming l
          JOIN owners o ON o.org_id = l.org_id AND o.reading_hour = l.reading_hour
          LEFT JOIN charge_state s ON s.reading_hour = l.reading_hour AND s.measurement_id = l.measurement_id
         WHERE s.revision IS NULL OR s.revision < l.revision
         ORDER BY l.reading_hour, l.measurement_id, l.revision DESC
        """
    )


async def hold_unassigned(conn: Conn) -> int:
    """Keep the charges whose org has no customer at their hour (latest revision wins)."""
    status = await conn.execute(
        """
        INSERT INTO held_charges (measurement_id, revision, reading_hour, org_id, meter, resource_kind,
                                  resource_id, price_id, num, den)
        SELECT measurement_id, revision, reading_hour, org_id, meter, resource_kind, resource_id, price_id, num, den
          FROM ledger_work WHERE customer_id IS NULL
        ON CONFLICT (measurement_id) DO UPDATE
           SET revision = EXCLUDED.revision, reading_hour = EXCLUDED.reading_hour, org_id = EXCLUDED.org_id,
               meter = EXCLUDED.meter, resource_kind = EXCLUDED.resource_kind,
               resource_id = EXCLUDED.resource_id, price_id = EXCLUDED.price_id, num = EXCLUDED.num,
               den = EXCLUDED.den, held_at = now()
         WHERE held_charges.revision < EXCLUDED.revision
        """
    )
    return int(status.split()[-1])


async def release_held(conn: Conn) -> int:
    """Forget held charges of the batch that now resolve to a customer (they were posted, or superseded)."""
    status = await conn.execute(
        """
        DELETE FROM held_charges h
         USING ledger_incoming i
         WHERE h.measurement_id = i.measurement_id AND h.revision <= i.revision
           AND EXISTS (SELECT 1 FROM org_assignments a WHERE a.org_id = h.org_id AND a.starts_at <= h.reading_hour)
        """
    )
    return int(status.split()[-1])


async def create_groups(conn: Conn) -> None:
    """Create the (customer, month, price) rows the batch needs that do not exist yet, in key order (two
    instances creating the same rows wait for each other instead of deadlocking)."""
    await conn.execute(
        """
        INSERT INTO month_usage (customer_id, month, price_id)
        SELECT DISTINCT w.customer_id, w.month, w.price_id FROM ledger_work w
         WHERE w.customer_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM month_usage g
                            WHERE g.customer_id = w.customer_id AND g.month = w.month AND g.price_id = w.price_id)
         ORDER BY 1, 2, 3
        ON CONFLICT DO NOTHING
        """
    )


async def apply_charges(conn: Conn) -> int:
    """Record the applied revision of every assigned charge of the batch; returns the charges replaced.
    A replacement only matches the revision the batch compared against (resolve), so fewer rows than
    expected mean another transaction changed the same charge meanwhile. First sights are plain inserts
    (half the cost of an upsert): a concurrent insert of the same charge fails on the primary key. Either
    way the caller retries the batch."""
    replaced = await conn.execute(
        """
        UPDATE charge_state s
           SET revision = w.revision, group_id = g.id, num = w.num, den = w.den, meter = w.meter
          FROM ledger_work w
          JOIN month_usage g ON g.customer_id = w.customer_id AND g.month = w.month AND g.price_id = w.price_id
         WHERE s.reading_hour = w.reading_hour AND s.measurement_id = w.measurement_id
           AND w.old_revision IS NOT NULL AND s.revision = w.old_revision
        """
    )
    await conn.execute(
        """
        INSERT INTO charge_state (reading_hour, measurement_id, revision, group_id, num, den, meter)
        SELECT w.reading_hour, w.measurement_id, w.revision, g.id, w.num, w.den, w.meter
          FROM ledger_work w
          JOIN month_usage g ON g.customer_id = w.customer_id AND g.month = w.month AND g.price_id = w.price_id
         WHERE w.old_revision IS NULL
        """
    )
    return int(replaced.split()[-1])


async def collect_deltas(conn: Conn) -> int:
    """What the batch changes, as signed deltas summed per (group, hour, org, meter, kind, denominator):
    +new amount on its group, -replaced amount on the group the replaced revision was counted in.
    Returns the number of changed charges."""
    status = await conn.execute(
        """
        INSERT INTO ledger_delta (group_id, reading_hour, org_id, meter, resource_kind, num, den)
        SELECT group_id, reading_hour, org_id, meter, resource_kind, sum(num), den
          FROM (SELECT g.id AS group_id, w.reading_hour, w.org_id, w.meter, w.resource_kind, w.num, w.den
                  FROM ledger_work w
                  JOIN month_usage g ON g.customer_id = w.customer_id AND g.month = w.month AND g.price_id = w.price_id
                UNION ALL
                SELECT w.old_group, w.reading_hour, w.org_id, w.meter, w.resource_kind, -w.old_num, w.old_den
                  FROM ledger_work w
                 WHERE w.old_group IS NOT NULL AND w.customer_id IS NOT NULL) d
         GROUP BY group_id, reading_hour, org_id, meter, resource_kind, den
        """
    )
    return int(status.split()[-1])


async def work_counts(conn: Conn) -> tuple[int, int]:
    """(assigned charges that change something, of which replace an applied revision)."""
    row = await conn.fetchrow(
        """SELECT count(*) AS changed, count(*) FILTER (WHERE old_revision IS NOT NULL) AS replacing
             FROM ledger_work WHERE customer_id IS NOT NULL"""
    )
    return int(row["changed"]), int(row["replacing"])


async def lock_groups(conn: Conn) -> None:
    """Lock every (customer, month, price) row the batch changes, in id order: two ledger instances
    posting for the same customer wait for each other instead of deadlocking."""
    await conn.execute(
        """SELECT 1 FROM month_usage WHERE id IN (SELECT DISTINCT group_id FROM ledger_delta)
            ORDER BY id FOR UPDATE"""
    )


async def allocate(conn: Conn) -> None:
    """The heart of the posting rule, exactly, in one statement.

    Each changed charge is a delta on its (customer, month, price) group (ledger_delta, already summed per
    (hour, org, meter, kind, denominator) as integers). Per group, the deltas are scaled to one
    common denominator l (lcm of the stored sum's denominator and the deltas'), and the resulting lines,
    in a fixed order, are given floor(base + running sum) - floor(base + running sum before them) whole
    microcredits, base being the group's stored exact sum. The amounts telescope: their total is
    floor(new sum) - floor(old sum), exactly what must be added to the posted figure for it to stay
    floor(exact sum). No rounding happens anywhere else."""
    await conn.execute(
        """
        INSERT INTO ledger_alloc (group_id, reading_hour, org_id, meter, resource_kind, n, l, base, amount)
        WITH by_den AS (
            SELECT group_id, reading_hour, org_id, meter, resource_kind, den::numeric AS den, num FROM ledger_delta
        ), common AS MATERIALIZED (
            SELECT d.group_id, lcm(lcm_agg(d.den), min(g.sum_den)) AS l,
                   min(g.sum_num) AS sum_num, min(g.sum_den) AS sum_den
              FROM (SELECT DISTINCT group_id, den FROM by_den) d JOIN month_usage g ON g.id = d.group_id
             GROUP BY d.group_id
        ), lines AS (
            SELECT d.group_id, d.reading_hour, d.org_id, d.meter, d.resource_kind,
                   sum(d.num * div(c.l, d.den)) AS n, min(c.l) AS l, min(c.sum_num * div(c.l, c.sum_den)) AS base
              FROM by_den d JOIN common c ON c.group_id = d.group_id
             GROUP BY d.group_id, d.reading_hour, d.org_id, d.meter, d.resource_kind
        ), running AS (
            SELECT x.*, sum(x.n) OVER (PARTITION BY x.group_id
                                       ORDER BY x.reading_hour, x.org_id, x.meter, x.resource_kind) AS upto
              FROM lines x
        )
        -- div is floor here: a running sum is the stored exact sum with some charges added and some of its
        -- own charges' old amounts removed, so it is never negative (floor_div would not be inlined).
        SELECT group_id, reading_hour, org_id, meter, resource_kind, n, l, base,
               div(base + upto, l) - div(base + upto - n, l)
          FROM running
        """
    )
    # The new exact sum of each group, reduced, and its floor (the CHECK on month_usage re-verifies it).
    await conn.execute(
        """
        UPDATE month_usage g
           SET sum_num = div(t.total, gcd(t.total, t.l)),
               sum_den = div(t.l, gcd(t.total, t.l)),
               posted = floor_div(t.total, t.l)
          FROM (SELECT group_id, min(l) AS l, min(base) + sum(n) AS total
                  FROM ledger_alloc GROUP BY group_id) t
         WHERE g.id = t.group_id
        """
    )


async def allocations(conn: Conn) -> list[asyncpg.Record]:
    """The non-zero whole microcredits to post, per customer, hour, org, meter, kind, price and month."""
    return await conn.fetch(
        """
        SELECT g.customer_id, g.month, g.price_id, a.reading_hour, a.org_id, a.meter, a.resource_kind, a.amount
          FROM ledger_alloc a JOIN month_usage g ON g.id = a.group_id
         WHERE a.amount <> 0
         ORDER BY g.customer_id, a.reading_hour, a.org_id, a.meter, a.resource_kind, g.price_id
        """
    )


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
    return await conn.fetchval("SELECT closed_at FROM month_closes WHERE month = $1", month)


async def insert_month_close(conn: Conn, month: date, closed_at: datetime) -> None:
    await conn.execute("INSERT INTO month_closes (month, closed_at) VALUES ($1, $2)", month, closed_at)


async def first_activity(conn: Conn) -> datetime | None:
    """When the earliest transaction occurred (months before it need no statement)."""
    return await conn.fetchval("SELECT min(occurred_at) FROM transactions")


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
        acct = pool_accounts.get(r["id"])
        if acct is None:
            continue
        books[r["customer_id"]].pools.append(
            Pool(r["id"], r["starts_at"], r["ends_at"], r["credits"], r["expired"], acct)
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
                                  reverses, agreement_id, posted_at)
        SELECT t.*, $10::timestamptz
          FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[],
                      $7::text[], $8::uuid[], $9::uuid[]) AS t
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
        posted_at,
    )
    e_txn: list[uuid.UUID] = []
    e_acct: list[int] = []
    e_side: list[str] = []
    e_amt: list[int] = []
    u_txn: list[uuid.UUID] = []
    u_org: list[str] = []
    u_meter: list[str] = []
    u_kind: list[str] = []
    u_price: list[uuid.UUID | None] = []
    u_month: list[date] = []
    u_amt: list[int] = []
    for tid, d in zip(ids, drafts, strict=True):
        for e in d.entries:
            e_txn.append(tid)
            e_acct.append(e.account_id)
            e_side.append(e.side)
            e_amt.append(e.amount)
        for u in d.usage:
            u_txn.append(tid)
            u_org.append(u.org_id)
            u_meter.append(u.meter)
            u_kind.append(u.resource_kind)
            u_price.append(u.price_id)
            u_month.append(u.month)
            u_amt.append(u.microcredits)
    await conn.execute(
        """INSERT INTO entries (transaction_id, account_id, side, amount)
           SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[])""",
        e_txn,
        e_acct,
        e_side,
        e_amt,
    )
    if u_txn:
        await conn.execute(
            """INSERT INTO usage_lines (transaction_id, org_id, meter, resource_kind, price_id, month, microcredits)
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::date[],
                                    $7::bigint[])""",
            u_txn,
            u_org,
            u_meter,
            u_kind,
            u_price,
            u_month,
            u_amt,
        )


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


async def list_held(conn: Conn, after: uuid.UUID | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT measurement_id, revision, reading_hour, org_id, meter, resource_kind, resource_id, price_id,
                  num, den, held_at
             FROM held_charges WHERE $1::uuid IS NULL OR measurement_id > $1
            ORDER BY measurement_id LIMIT $2""",
        after,
        limit,
    )


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
                  agreement_id, posted_at
             FROM transactions WHERE id = $1""",
        transaction_id,
    )


async def reversal_of(conn: Conn, transaction_id: uuid.UUID) -> uuid.UUID | None:
    return await conn.fetchval("SELECT id FROM transactions WHERE reverses = $1", transaction_id)


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
    """Usage posted within [start, end) per customer, meter and resource kind (late usage included)."""
    return await conn.fetch(
        """SELECT t.customer_id, u.meter, u.resource_kind, sum(u.microcredits)::bigint AS microcredits
             FROM transactions t JOIN usage_lines u ON u.transaction_id = t.id
            WHERE t.occurred_at >= $1 AND t.occurred_at < $2
            GROUP BY t.customer_id, u.meter, u.resource_kind
            ORDER BY t.customer_id, u.meter, u.resource_kind""",
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


async def insert_statements(conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
    """rows: (customer_id, month, id, opening, funded, used, expired, closing, used_by_kind json, issued_at)."""
    if not rows:
        return
    await conn.executemany(
        """INSERT INTO statements (customer_id, month, id, opening_balance, funded, used, expired, closing_balance,
                                   used_by_kind, issued_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)""",
        rows,
    )


async def get_statement(conn: Conn, customer_id: uuid.UUID, month: date) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT customer_id, month, id, opening_balance, funded, used, expired, closing_balance,
                  used_by_kind::text AS used_by_kind, issued_at
             FROM statements WHERE customer_id = $1 AND month = $2""",
        customer_id,
        month,
    )


async def count_statements(conn: Conn, month: date) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM statements WHERE month = $1", month))



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


async def try_lock_held_sweep(conn: Conn) -> bool:
    """One held-charge sweep at a time across instances (the others skip their turn)."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('billing.ledger.held'))"))


# ---------------------------------------------------------------- completeness report


async def completeness_counts(conn: Conn, since: datetime, until: datetime) -> list[asyncpg.Record]:
    """Per reading hour and meter: charges applied to a customer's month (posted, zero and unpriced ones
    included), charges held for want of a customer (not counting one applied meanwhile), and the sum of
    their revisions. Both scans follow a key or index that starts with the reading hour, except held
    charges (indexed by org; few)."""
    return await conn.fetch(
        """
        SELECT hour, meter,
               sum(posted)::bigint AS posted, sum(held)::bigint AS held, sum(revisions)::bigint AS revisions
          FROM (SELECT reading_hour AS hour, meter, count(*) AS posted, 0 AS held, sum(revision) AS revisions
                  FROM charge_state
                 WHERE reading_hour >= $1 AND reading_hour < $2
                 GROUP BY reading_hour, meter
                UNION ALL
                SELECT h.reading_hour, h.meter, 0, count(*), sum(h.revision)
                  FROM held_charges h
                 WHERE h.reading_hour >= $1 AND h.reading_hour < $2
                   AND NOT EXISTS (SELECT 1 FROM charge_state s
                                    WHERE s.reading_hour = h.reading_hour AND s.measurement_id = h.measurement_id)
                 GROUP BY h.reading_hour, h.meter) t
         GROUP BY hour, meter
         ORDER BY hour, meter
        """,
        since,
        until,
    )
