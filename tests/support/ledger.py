"""Fixtures and helpers the ledger's integration tests share (imported by the test_ledger_* modules), and
the accounting checks every ledger test ends with.

``ledger_db``: the ledger's schema migrated in a fresh database, a pool on it, and a ``LedgerService`` whose
clock the test can move. At teardown it asserts the invariants of the whole book: the sum of every
account's signed balance is zero (the accounting equation), each account's balance equals the sum of its
entries, every transaction is balanced with two or more entries, each (customer, month, price) posted
figure is floor(its exact sum), and that exact sum is the sum of the charges applied to it in the shards'
state (whose counts, like those of the held charges, match their documents).

Charges are ``usage.charges.v3`` batches (``shared.batches.Charges``): ``item(...)`` states one charge of
a flat price, ``usage(...)`` one of a graduated or volume price (``banded_price``: its terms, units and no
amount), ``charges_batch(hour, items)`` makes one batch of a shard, ``charges_batches`` deals charges into
per-shard batches, ``delivered`` passes batches through the encoder and the consumer's decoder. For a group
of a graduated or volume price the books' check compares its units with the charges applied and its exact
sum with the independent ``reference_f`` of the stored model.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import asyncpg
import orjson
import pytest

from services.ledger.app import MIGRATIONS
from services.ledger.posting import Posting
from services.ledger.service import LedgerService
from services.ledger.settings import LedgerSettings
from shared.batches import (
    Band,
    Charges,
    Price,
    Ref,
    charges_id,
    decode_charges,
    encode_charges,
    shard_key,
    shard_of,
)
from shared.db import create_pool, migrate
from shared.kafka import Outgoing, Publisher
from shared.topics import CHARGES
from tests.support.documents import unpacked
from tests.support.price_models import RawBand, reference_f

PRICE_A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
PRICE_B = uuid.UUID("00000000-0000-4000-8000-00000000000b")
LONG_AGO = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class Clock:
    """A settable clock for the service (real time unless a test sets ``now``)."""

    now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now or datetime.now(UTC)


@dataclass
class LedgerDB:
    pool: asyncpg.Pool
    service: LedgerService
    clock: Clock
    settings: LedgerSettings
    dsn: str
    made: dict[str, Any] = field(default_factory=dict)

    async def tier(self, credits: int = 1_000_000) -> str:
        name = f"tier-{uuid.uuid4().hex[:8]}"
        await self.service.create_tier(name, credits)
        return name

    async def customer(self, name: str = "Agency", tier: str | None = None) -> uuid.UUID:
        tier = tier or await self.tier()
        return (await self.service.create_customer(name, tier)).body["id"]  # type: ignore[no-any-return]

    async def post(self, hour: datetime, *items: ChargeItem, meter: str = "cfapps") -> Posting:
        """Post charges of one hour as the consumer would: dealt into per-shard batches, one posting."""
        return await self.service.post_charges(delivered(charges_batches(items, hour, meter=meter)))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(sql, *args)


@dataclass(frozen=True)
class ChargeItem:
    """One measurement's charge as a test states it: an item of a ``usage.charges.v2`` batch.

    ``amount`` is the exact microcredits; ``denominator`` writes it over that denominator unreduced (the
    pricer writes amounts over the price's unit: 1500/1000 rather than 3/2). ``price_id`` None is unpriced
    (the contract wants its amount 0; tests build a bad item by giving one anyway).
    """

    org_id: str
    amount: Fraction
    resource: str = "app-1"
    revision: int = 1
    price_id: uuid.UUID | None = PRICE_A
    kind: str = ""
    denominator: int | None = None
    value: int = 1
    terms: Price | None = None  # the price's terms in the batch (default: 1 microcredit per unit, flat)

    @property
    def fraction(self) -> tuple[int, int]:
        """(numerator, denominator) as the batch carries them."""
        if self.denominator is None:
            return self.amount.numerator, self.amount.denominator
        numerator = self.amount * self.denominator
        assert numerator.denominator == 1, f"{self.amount} cannot be written over {self.denominator}"
        return int(numerator), self.denominator


def item(
    org_id: str,
    amount: Fraction | int,
    *,
    resource: str = "app-1",
    revision: int = 1,
    price_id: uuid.UUID | None = PRICE_A,
    kind: str = "",
    denominator: int | None = None,
) -> ChargeItem:
    return ChargeItem(org_id, Fraction(amount), resource, revision, price_id, kind, denominator)


def edge_text(edge: Fraction) -> str:
    return str(edge.numerator) if edge.denominator == 1 else f"{edge.numerator}/{edge.denominator}"


def banded_price(price_id: uuid.UUID, model: str, bands: Sequence[RawBand], unit: int = 1) -> Price:
    """The terms of a graduated or volume price as a v3 batch carries them (edges as exact strings)."""
    return Price(
        price_id, 0, unit, model,  # type: ignore[arg-type]
        [Band(None if u is None else edge_text(u), rate, fee) for u, rate, fee in bands],
    )


def usage(
    org_id: str, value: int, terms: Price, *, resource: str = "app-1", revision: int = 1, kind: str = ""
) -> ChargeItem:
    """A charge of a graduated or volume price: ``value`` in the meter's quantity (``value / unit`` units of
    the price), amount 0/1 (priced by the ledger on the month's total)."""
    return ChargeItem(org_id, Fraction(0), resource, revision, terms.id, kind, None, value, terms)


def charges_batch(
    hour: datetime, items: Sequence[ChargeItem], *, meter: str = "cfapps", shard: int | None = None
) -> Charges:
    """One charges batch of ``items`` as the pricer publishes it (tables in order of first use, items in
    the order given, the id derived from the content). The items must share a shard (``shard_of`` of their
    resource ids) unless ``shard`` is given: a test builds a batch holding an item of another shard so."""
    assert items, "a batch holds at least one item"
    shards = {shard_of(it.resource) for it in items}
    if shard is None:
        assert len(shards) == 1, f"items of shards {sorted(shards)} in one batch: use charges_batches"
        shard = shards.pop()
    orgs: dict[str, int] = {}
    kinds: dict[str, int] = {}
    prices: dict[uuid.UUID, int] = {}
    terms: dict[uuid.UUID, Price] = {}
    for it in items:
        orgs.setdefault(it.org_id, len(orgs))
        kinds.setdefault(it.kind, len(kinds))
        if it.price_id is not None:
            prices.setdefault(it.price_id, len(prices))
            terms.setdefault(it.price_id, it.terms or Price(it.price_id, 1, 1))
    rids = [it.resource for it in items]
    revisions = [it.revision for it in items]
    fractions = [it.fraction for it in items]
    return Charges(
        id=charges_id(hour, meter, shard, rids, revisions),
        reading_hour=hour,
        meter=meter,
        unit="MB",
        shard=shard,
        priced_at=hour + timedelta(minutes=5),
        orgs=[Ref(o, f"name of {o}") for o in orgs],
        spaces=[Ref("space-1", "dev")],
        kinds=list(kinds),
        prices=[terms[p] for p in prices],
        resource_id=rids,
        resource_name=[f"name of {r}" for r in rids],
        org=[orgs[it.org_id] for it in items],
        space=[0] * len(items),
        kind=[kinds[it.kind] for it in items],
        value=[it.value for it in items],
        estimated=[False] * len(items),
        revision=revisions,
        price=[prices[it.price_id] if it.price_id is not None else -1 for it in items],
        amount_numerator=[f[0] for f in fractions],
        amount_denominator=[f[1] for f in fractions],
    )


def charges_batches(
    charges: Iterable[tuple[datetime, ChargeItem]] | Iterable[ChargeItem],
    hour: datetime | None = None,
    *,
    meter: str = "cfapps",
) -> list[Charges]:
    """Deal charges into batches, one per (hour, shard) in order of first appearance; a resource that comes
    again with other facts (another revision) starts another batch of its shard, since one message holds a
    measurement once (the decoder refuses it otherwise). The same charge twice may share a batch: the
    decoder counts it once (pass the batches through ``delivered``). Items are (hour, item) pairs, or items
    all of ``hour``."""
    pairs = [(hour, c) if isinstance(c, ChargeItem) else c for c in charges]
    parts: dict[tuple[datetime, int], list[list[ChargeItem]]] = {}
    for at, it in pairs:
        assert at is not None, "give the hour of the items"
        groups = parts.setdefault((at, shard_of(it.resource)), [])
        for part in groups:
            same = [x for x in part if x.resource == it.resource]
            if not same or same[0] == it:
                part.append(it)
                break
        else:
            groups.append([it])
    return [charges_batch(at, part, meter=meter) for (at, _), groups in parts.items() for part in groups]


def resources_of_shard(shard: int, n: int, prefix: str = "app") -> list[str]:
    """``n`` resource ids (``prefix``-<i>) that fall in ``shard``."""
    found = [r for r in (f"{prefix}-{i}" for i in range(200 * n + 2000)) if shard_of(r) == shard][:n]
    assert len(found) == n
    return found


def delivered(batches: Sequence[Charges]) -> list[Charges]:
    """The batches as the ledger's consumer hands them over: encoded as published, decoded as consumed
    (a charge twice in one message counts once there). Fails if the decoder refuses any item."""
    out = []
    for b in batches:
        decoded = decode_charges(encode_charges(b))
        assert decoded.rejected == [], decoded.rejected
        assert decoded.message is not None
        out.append(decoded.message)
    return out


async def applied_revisions(db: LedgerDB | asyncpg.Pool) -> dict[tuple[datetime, str, str], int]:
    """The applied revision of every measurement (hour, meter, resource), read from ``shard_state``'s
    documents as the migration describes them."""
    out: dict[tuple[datetime, str, str], int] = {}
    rows = await db.fetch("SELECT reading_hour, meter, items FROM shard_state")
    for r, raw in zip(rows, await unpacked(db, "ledger", [r["items"] for r in rows]), strict=True):
        doc = orjson.loads(raw)
        for rid, rev in zip(doc["r"], doc["v"], strict=True):
            key = (r["reading_hour"], r["meter"], rid)
            assert key not in out, f"{key} applied in two shards"
            out[key] = rev
    return out


async def held_revisions(db: LedgerDB | asyncpg.Pool) -> dict[tuple[datetime, str, str, str], int]:
    """The held revision of every held charge (hour, meter, org, resource), from ``held_shards``."""
    out: dict[tuple[datetime, str, str, str], int] = {}
    rows = await db.fetch("SELECT reading_hour, meter, org_id, items FROM held_shards")
    for r, raw in zip(rows, await unpacked(db, "ledger", [r["items"] for r in rows]), strict=True):
        doc = orjson.loads(raw)
        for rid, rev in zip(doc["r"], doc["v"], strict=True):
            out[(r["reading_hour"], r["meter"], r["org_id"], rid)] = rev
    return out


async def posted_by_group(
    db: LedgerDB, customers: list[uuid.UUID]
) -> dict[tuple[uuid.UUID, str, uuid.UUID | None], int]:
    """Microcredits posted per (customer, billing month YYYY-MM, price), from the transactions' usage lines."""
    rows = await db.fetch(
        """SELECT t.customer_id, to_char(u.month, 'YYYY-MM') AS month, u.price_id, sum(u.microcredits)::bigint AS mc
             FROM usage_lines u JOIN transactions t ON t.id = u.transaction_id
            WHERE t.customer_id = ANY($1::uuid[])
            GROUP BY 1, 2, 3""",
        customers,
    )
    return {(r["customer_id"], r["month"], r["price_id"]): r["mc"] for r in rows if r["mc"] != 0}


async def remaining(db: LedgerDB, customer_id: uuid.UUID) -> int:
    """Remaining credits from the accounts: pools minus overage (normal sides)."""
    return int(
        await db.fetchval(
            """SELECT coalesce(sum(CASE WHEN type = 'credit_pool' THEN -balance
                                        WHEN type = 'overage' THEN -balance ELSE 0 END), 0)
                 FROM accounts WHERE customer_id = $1""",
            customer_id,
        )
    )


async def assert_books_hold(pool: asyncpg.Pool) -> None:
    """The invariants of the whole ledger, computed from the raw rows."""
    async with pool.acquire() as conn:
        total = await conn.fetchval("SELECT coalesce(sum(balance), 0) FROM accounts")
        assert total == 0, f"accounting equation broken: sum of signed balances is {total}"
        signed = "CASE WHEN e.side = 'debit' THEN e.amount ELSE -e.amount END"
        drift = await conn.fetch(
            f"""SELECT a.id, a.balance, coalesce(sum({signed}), 0) AS s
                  FROM accounts a LEFT JOIN entries e ON e.account_id = a.id
                 GROUP BY a.id HAVING a.balance <> coalesce(sum({signed}), 0)"""
        )
        assert drift == [], f"account balances differ from their entries: {drift}"
        unbalanced = await conn.fetch(
            f"""SELECT t.id, count(e.*) AS n, coalesce(sum({signed}), 0) AS s
                  FROM transactions t LEFT JOIN entries e ON e.transaction_id = t.id
                 GROUP BY t.id HAVING count(e.*) < 2 OR coalesce(sum({signed}), 0) <> 0"""
        )
        assert unbalanced == [], f"unbalanced transactions: {unbalanced}"
        # Usage lines of a transaction add up to its usage-account movement (credits minus debits).
        mismatched = await conn.fetch(
            f"""WITH lines AS (SELECT transaction_id, sum(microcredits) AS s FROM usage_lines GROUP BY 1),
                     moves AS (SELECT e.transaction_id, -sum({signed}) AS s
                                 FROM entries e JOIN accounts a ON a.id = e.account_id AND a.type = 'usage'
                                GROUP BY 1)
                SELECT coalesce(l.transaction_id, m.transaction_id) AS id, l.s AS lines, m.s AS moves
                  FROM lines l FULL JOIN moves m ON m.transaction_id = l.transaction_id
                 WHERE coalesce(l.s, 0) <> coalesce(m.s, 0)"""
        )
        assert mismatched == [], f"usage lines differ from usage movements: {mismatched}"
        groups = await conn.fetch(
            """SELECT g.id, g.sum_num::text, g.sum_den::text, g.posted, g.units_num::text, g.units_den::text,
                      m.model, m.bands::text
                 FROM month_usage g LEFT JOIN price_models m ON m.price_id = g.price_id"""
        )
        exact = {g["id"]: Fraction(int(g["sum_num"]), int(g["sum_den"])) for g in groups}
        for g in groups:
            assert g["posted"] == exact[g["id"]].numerator // exact[g["id"]].denominator, f"group {g['id']}"
        # A group of a graduated or volume price sums units; its exact sum is f(units) of its price's model.
        units = {
            g["id"]: Fraction(int(g["units_num"]), int(g["units_den"])) if g["units_num"] is not None else Fraction(0)
            for g in groups
            if g["model"] is not None
        }
        for g in groups:
            if g["model"] is not None:
                bands = [
                    (None if b["up_to"] is None else Fraction(b["up_to"]), b["microcredits_per_unit"], b["flat_fee"])
                    for b in orjson.loads(g["bands"])
                ]
                assert exact[g["id"]] == reference_f(g["model"], bands, units[g["id"]]), f"f(units) of {g['id']}"
            else:
                assert g["units_num"] is None, f"units on the flat group {g['id']}"
        # The exact sums are the sums of the charges applied to them, and the counts of each shard's state
        # (the completeness report's posted and revisions) are those of its document.
        applied: dict[tuple[datetime, str, int], set[str]] = {}
        from_state: dict[int, Fraction] = defaultdict(Fraction)
        rows = await conn.fetch("SELECT reading_hour, meter, shard, posted, revisions, items FROM shard_state")
        for r, raw in zip(rows, await unpacked(conn, "ledger", [r["items"] for r in rows]), strict=True):
            doc = orjson.loads(raw)
            assert len(set(doc["r"])) == len(doc["r"]), f"a resource applied twice in shard {tuple(r)[:3]}"
            assert (r["posted"], r["revisions"]) == (len(doc["r"]), sum(doc["v"])), f"counts of {tuple(r)[:3]}"
            applied[(r["reading_hour"], r["meter"], r["shard"])] = set(doc["r"])
            for gid, num, den in zip(doc["g"], doc["n"], doc["d"], strict=True):
                from_state[gid] += Fraction(num, den)
        quantities = {g: s for g, s in exact.items() if g not in units} | units
        assert {g: s for g, s in quantities.items() if s} == {g: s for g, s in from_state.items() if s}, (
            "exact sums differ from the charges applied (units, for a graduated or volume price)"
        )
        rows = await conn.fetch("SELECT reading_hour, meter, shard, org_id, held, revisions, items FROM held_shards")
        for r, raw in zip(rows, await unpacked(conn, "ledger", [r["items"] for r in rows]), strict=True):
            doc = orjson.loads(raw)
            done = applied.get((r["reading_hour"], r["meter"], r["shard"]), set())
            waiting = [v for rid, v in zip(doc["r"], doc["v"], strict=True) if rid not in done]
            assert doc["r"], f"an empty held row {tuple(r)[:4]}"
            assert (r["held"], r["revisions"]) == (len(waiting), sum(waiting)), f"held counts of {tuple(r)[:4]}"


@pytest.fixture
async def ledger_db(database: Any) -> AsyncIterator[LedgerDB]:
    dsn = database.dsn("ledger")
    pool = await create_pool(dsn, "ledger", max_size=6)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "ledger", MIGRATIONS)
        clock = Clock()
        settings = LedgerSettings(database_url=dsn, port=8083, settlement_delay_hours=48, month_close_delay_hours=96)
        yield LedgerDB(pool, LedgerService(pool, settings, clock), clock, settings, dsn)
        await assert_books_hold(pool)
    finally:
        await pool.close()


async def publish_charges(
    bootstrap: str, topic_prefix: str, batches: Sequence[Charges], topic: str = CHARGES
) -> None:
    """Publish batches to ``usage.charges.v3`` (or ``topic``) as the pricer does: the encoded batch keyed by
    its shard."""
    publisher = Publisher(bootstrap, client_id="ledger-test")
    await publisher.start()
    try:
        await publisher.publish(
            topic_prefix + topic, [Outgoing(shard_key(b.shard), encode_charges(b)) for b in batches]
        )
    finally:
        await publisher.stop()


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete a test's prefixed topic set (each holds 12 partitions: a shared broker runs out of file
    handles when every test leaves its topics behind)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from shared.topics import ALL_TOPICS

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([prefix + t for t in ALL_TOPICS])
    except Exception:  # noqa: BLE001 - best effort: a topic already gone is fine
        pass
    finally:
        await admin.close()


@pytest.fixture
async def ledger_topics(infra: Any, topic_prefix: str) -> AsyncIterator[str]:
    """``topic_prefix``, deleted after the test."""
    try:
        yield topic_prefix
    finally:
        await delete_topics(infra.kafka, topic_prefix)
