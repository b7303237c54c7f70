"""Rate cards (issue 18, item 2), on the real PostgreSQL and Kafka.

A price may apply to one tier or one customer and then overrides the global price of the same (meter, kind)
for that tier's or customer's orgs while it is valid; prices of one (scope, meter, kind) never overlap (the
database refuses it), prices of different scopes may. The pricer learns which customer (and tier) an org
belongs to from the ledger's ``ledger.assignments.v1``; an assignment that arrives after the org's charges
were priced re-prices them (revision 2), and the ledger posts exactly the difference. Expected figures are
computed here from the definition (value * rate / unit, floored once per customer, month and price).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from services.ledger.app import MIGRATIONS as LEDGER_MIGRATIONS
from shared import ids
from shared.batches import Charges, Item, Measurements, measurement_batches
from shared.contracts import OrgAssigned
from shared.db import create_pool, migrate
from shared.ids import org_assignment_id
from shared.kafka import Outgoing, Publisher, Received
from shared.topics import ASSIGNMENTS, dlq
from tests.integration.test_pricer_prices import (
    Running,
    price_body,
    read_charges,
    running,  # noqa: F401  (the fixture)
    stored,
)
from tests.support.ledger import LedgerDB, ledger_db, ledger_topics, posted_by_group  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

H0 = datetime(2026, 1, 10, 0, tzinfo=UTC)
MONTH_START = datetime(2026, 1, 1, 5, tzinfo=UTC)  # midnight America/New_York
GLOBAL_RATE, GLOBAL_UNIT = 1_000_000, 730 * 1024
TIER_RATE, TIER_UNIT = 700_001, 1000
CUSTOMER_RATE, CUSTOMER_UNIT = 3, 7


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


def readings(hour: datetime, orgs: list[str]) -> list[Measurements]:
    """Three resources per org (kind ""), values varying by org, resource and hour."""
    k = int((hour - H0).total_seconds()) // 3600
    items = [
        Item(f"{org}-app-{i}", f"app {i}", org, org.upper(), f"{org}-space", "dev", "", 1000 * (i + 1) + 13 * n + 7 * k)
        for n, org in enumerate(orgs)
        for i in range(3)
    ]
    return measurement_batches(hour, "cfapps", "MB", items, reading_id=ids.reading_id(hour),
                               taken_at=hour + timedelta(minutes=61))


def value_of(hour: datetime, orgs: list[str], resource: str) -> int:
    for m in readings(hour, orgs):
        if resource in m.resource_id:
            return m.value[m.resource_id.index(resource)]
    raise KeyError(resource)


def received(ms: list[Measurements]) -> list[Received[Measurements]]:
    return [Received(m, b"shard-%d" % m.shard, 0, i) for i, m in enumerate(ms)]


def assignment(org: str, customer: uuid.UUID, tier: str, starts_at: datetime = MONTH_START) -> OrgAssigned:
    return OrgAssigned(id=org_assignment_id(org, starts_at), org_id=org, starts_at=starts_at, customer_id=customer,
                       tier=tier, assigned_at=datetime.now(UTC))


async def publish(kafka: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    publisher = Publisher(kafka, client_id="rate-cards-test")
    await publisher.start()
    try:
        await publisher.publish(topic, [Outgoing(k, v) for k, v in messages])
    finally:
        await publisher.stop()


async def wait_for(check: Any, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


# -- prices with a scope ------------------------------------------------------------------------------------


async def test_a_bad_scope_is_a_422_problem_and_stores_nothing(running: Running) -> None:
    for scope in ({}, {"tier": "gold", "customer": str(uuid.uuid4())}, {"customer": "not-a-uuid"}, {"tier": ""},
                  {"region": "eu"}, {"tier": "gold", "extra": 1}, "gold", {"tier": " gold"}):
        body = problem(await running.http.post("/internal/prices", json=price_body(scope=scope)), 422)
        assert body["status"] == 422
    assert (await running.http.get("/internal/prices")).json()["items"] == []
    async with running.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM prices") == 0


async def test_prices_overlap_only_within_their_scope_and_the_database_enforces_it(running: Running) -> None:
    customer = uuid.uuid4()
    r = await running.http.post("/internal/prices", json=price_body())
    assert r.status_code == 201 and r.json()["scope"] is None
    gold = await running.http.post("/internal/prices", json=price_body(scope={"tier": "gold"}))
    assert gold.status_code == 201, gold.text
    assert gold.json()["scope"] == {"tier": "gold", "customer": None}
    # Another tier and a customer may overlap the global price and the gold one.
    assert (await running.http.post("/internal/prices", json=price_body(scope={"tier": "basic"}))).status_code == 201
    mine = await running.http.post("/internal/prices", json=price_body(scope={"customer": str(customer)}))
    assert mine.status_code == 201 and mine.json()["scope"] == {"tier": None, "customer": str(customer)}
    # Within a scope: 409, naming the price it overlaps; nothing stored.
    again = price_body(scope={"tier": "gold"}, valid_from="2026-03-01T00:00:00Z", microcredits_per_unit=5)
    body = problem(await running.http.post("/internal/prices", json=again), 409)
    assert body["conflicts"] == [gold.json()["id"]] and "tier gold" in body["detail"]
    body = problem(await running.http.post(
        "/internal/prices", json=price_body(scope={"customer": str(customer)}, microcredits_per_unit=9)), 409)
    assert body["conflicts"] == [mine.json()["id"]]
    listed = (await running.http.get("/internal/prices")).json()["items"]
    assert len(listed) == 4
    # A gold price after the first one ends is fine.
    end = await running.http.post(f"/internal/prices/{gold.json()['id']}/end", json={"at": "2026-03-01T00:00:00Z"})
    assert end.status_code == 200, end.text
    assert (await running.http.post("/internal/prices", json=again)).status_code == 201

    # The database itself: a row overlapping another of its scope is refused, and a row cannot claim a scope
    # its key does not have.
    async with running.pool.acquire() as conn:
        key = await conn.fetchval("SELECT key_id FROM prices WHERE id = $1", uuid.UUID(mine.json()["id"]))
        insert = """INSERT INTO prices (id, key_id, meter, resource_kind, unit_of_measure, microcredits_per_unit,
                                        unit, valid_during, scope_kind, scope_id)
                    VALUES ($1, $2, 'cfapps', '', 'MB-hour', 1, 1, tstzrange($3, NULL, '[)'), $4, $5)"""
        later, earlier = datetime(2027, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
        with pytest.raises(asyncpg.ExclusionViolationError):
            await conn.execute(insert, uuid.uuid4(), key, later, "customer", str(customer))
        with pytest.raises(asyncpg.ForeignKeyViolationError):  # before any price of that key: no overlap
            await conn.execute(insert.replace("NULL", "'2025-06-01'"), uuid.uuid4(), key, earlier, "tier", "gold")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO price_keys (meter, resource_kind, scope_kind, scope_id) "
                               "VALUES ('cfapps', '', 'tier', '')")


# -- pricing by scope ---------------------------------------------------------------------------------------


async def test_each_org_gets_its_customers_price_else_its_tiers_else_the_global_one(running: Running) -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ids_of: dict[str, uuid.UUID] = {}
    for name, body in (
        ("global", price_body(microcredits_per_unit=GLOBAL_RATE, unit=GLOBAL_UNIT)),
        ("gold", price_body(microcredits_per_unit=TIER_RATE, unit=TIER_UNIT, scope={"tier": "gold"})),
        ("a", price_body(microcredits_per_unit=CUSTOMER_RATE, unit=CUSTOMER_UNIT, scope={"customer": str(a)})),
    ):
        r = await running.http.post("/internal/prices", json=body)
        assert r.status_code == 201, r.text
        ids_of[name] = uuid.UUID(r.json()["id"])
    # Through the topic, as the ledger publishes them: org-a (customer a, gold: its own price wins), org-b
    # (customer b, gold), org-c (customer c, basic: no price of its own); org-d has no customer.
    orgs = ["org-a", "org-b", "org-c", "org-d"]
    sent = [assignment("org-a", a, "gold"), assignment("org-b", b, "gold"), assignment("org-c", c, "basic")]
    await publish(running.kafka, running.charges_topic.replace("usage.charges.v3", ASSIGNMENTS),
                  [(m.org_id.encode(), m.model_dump_json().encode()) for m in sent])

    async def learned() -> bool:
        async with running.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM org_assignments") == 3)

    await wait_for(learned)
    hours = [H0, H0 + timedelta(hours=1)]
    for hour in hours:
        assert await running.pricer.handle_readings(received(readings(hour, orgs))) == []

    rate = {
        "org-a": (ids_of["a"], CUSTOMER_RATE, CUSTOMER_UNIT),
        "org-b": (ids_of["gold"], TIER_RATE, TIER_UNIT),
        "org-c": (ids_of["global"], GLOBAL_RATE, GLOBAL_UNIT),
        "org-d": (ids_of["global"], GLOBAL_RATE, GLOBAL_UNIT),
    }
    got = await stored(running)
    assert len(got) == 2 * 4 * 3
    for (hour, _, rid), (revision, price_id, amount) in got.items():
        org = rid.split("-app-")[0]
        want_price, mpu, unit = rate[org]
        assert (revision, price_id, amount) == (1, want_price, Fraction(value_of(hour, orgs, rid) * mpu, unit)), rid
    # The published batches say the same (the catalog's terms of each price they name).
    published = await read_charges(running.kafka, running.charges_topic, 2)
    seen = {pid for _, c in published for pid in (p.id for p in c.prices)}
    assert seen == {ids_of["a"], ids_of["gold"], ids_of["global"]}


async def test_a_bad_assignment_goes_to_the_dlq_with_its_reason(running: Running) -> None:
    topic = running.charges_topic.replace("usage.charges.v3", ASSIGNMENTS)
    good = assignment("org-x", uuid.uuid4(), "gold")
    wrong_id = json.loads(good.model_dump_json()) | {"id": str(uuid.uuid4())}
    no_tier = {k: v for k, v in json.loads(good.model_dump_json()).items() if k != "tier"}
    other = assignment("org-x", uuid.uuid4(), "basic")  # the same org and instant, another customer
    await publish(running.kafka, topic, [(b"org-x", good.model_dump_json().encode()),
                                         (b"org-x", json.dumps(wrong_id).encode()),
                                         (b"org-x", json.dumps(no_tier).encode()),
                                         (b"org-x", other.model_dump_json().encode())])
    consumer = AIOKafkaConsumer(dlq(topic), bootstrap_servers=running.kafka, auto_offset_reset="earliest",
                                group_id=None)
    await consumer.start()
    reasons: list[str] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(reasons) < 3 and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                reasons += [dict(r.headers)["dlq.reason"].decode() for r in recs]
    finally:
        await consumer.stop()
    assert len(reasons) == 3, reasons
    assert any("org_assignment_id" in r for r in reasons)
    assert any("tier" in r and "invalid OrgAssigned" in r for r in reasons)
    assert any(r.startswith("conflict:") and str(good.customer_id) in r for r in reasons)
    async with running.pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, customer_id FROM org_assignments")
    assert [(r["id"], r["customer_id"]) for r in rows] == [(good.id, good.customer_id)]


# -- an assignment after pricing, through the ledger --------------------------------------------------------


async def test_an_assignment_after_pricing_reprices_and_the_ledger_posts_the_tier_price_exactly(
    running: Running, ledger_db: LedgerDB
) -> None:
    db = ledger_db
    r = await running.http.post("/internal/prices", json=price_body(microcredits_per_unit=GLOBAL_RATE,
                                                                     unit=GLOBAL_UNIT))
    global_id = uuid.UUID(r.json()["id"])
    tier = await db.tier()
    r = await running.http.post("/internal/prices", json=price_body(microcredits_per_unit=TIER_RATE, unit=TIER_UNIT,
                                                                     scope={"tier": tier}))
    assert r.status_code == 201, r.text
    tier_id = uuid.UUID(r.json()["id"])
    customer = await db.customer("Tiered", tier)
    other = await db.customer("Plain", await db.tier())

    # Priced before the pricer knows anyone's customer: the global price for both orgs.
    orgs = ["org-t", "org-p"]
    hours = [H0, H0 + timedelta(hours=1), H0 + timedelta(hours=2)]
    for hour in hours:
        assert await running.pricer.handle_readings(received(readings(hour, orgs))) == []
    assert {v[1] for v in (await stored(running)).values()} == {global_id}

    # The ledger's assignments (it publishes them through its outbox, in their transaction).
    await db.service.assign_org("org-t", customer, MONTH_START)
    await db.service.assign_org("org-p", other, MONTH_START)
    rows = await db.fetch("SELECT topic, key, payload FROM outbox WHERE topic = $1 ORDER BY id", ASSIGNMENTS)
    sent = [OrgAssigned.model_validate_json(bytes(r["payload"])) for r in rows]
    assert [(m.org_id, m.customer_id, m.starts_at, m.id) for m in sent] == [
        ("org-t", customer, MONTH_START, org_assignment_id("org-t", MONTH_START)),
        ("org-p", other, MONTH_START, org_assignment_id("org-p", MONTH_START)),
    ]
    assert [m.tier for m in sent] == [tier, (await db.service.get_customer(other))["tier"]]
    assert [bytes(r["key"]) for r in rows] == [b"org-t", b"org-p"]
    await publish(running.kafka, running.charges_topic.replace("usage.charges.v3", ASSIGNMENTS),
                  [(bytes(r["key"]), bytes(r["payload"])) for r in rows])

    # org-t's charges come again as revision 2 with the tier price, exactly; org-p's stay as they were.
    async def repriced() -> bool:
        return all(v[0] == 2 for k, v in (await stored(running)).items() if k[2].startswith("org-t"))

    await wait_for(repriced)
    got = await stored(running)
    for (hour, _, rid), (revision, price_id, amount) in got.items():
        v = value_of(hour, orgs, rid)
        if rid.startswith("org-t"):
            assert (revision, price_id, amount) == (2, tier_id, Fraction(v * TIER_RATE, TIER_UNIT))
        else:
            assert (revision, price_id, amount) == (1, global_id, Fraction(v * GLOBAL_RATE, GLOBAL_UNIT))

    # The ledger applies every batch published (revision 1, then 2): the difference only.
    published: list[Charges] = [c for _, c in await read_charges(running.kafka, running.charges_topic, 100, 5)]
    assert any(2 in c.revision for c in published)
    await db.service.post_charges(published)
    tier_total = sum((Fraction(value_of(h, orgs, f"org-t-app-{i}") * TIER_RATE, TIER_UNIT)
                      for h in hours for i in range(3)), Fraction(0))
    plain_total = sum((Fraction(value_of(h, orgs, f"org-p-app-{i}") * GLOBAL_RATE, GLOBAL_UNIT)
                       for h in hours for i in range(3)), Fraction(0))
    posted = await posted_by_group(db, [customer, other])
    assert posted == {
        (customer, "2026-01", tier_id): floor(tier_total), (other, "2026-01", global_id): floor(plain_total)
    }

    # The statement line names the tier price.
    db.clock.now = datetime(2026, 2, 6, tzinfo=UTC)
    await db.service.close_month(date(2026, 1, 1))
    statement = await db.service.statement(customer, date(2026, 1, 1))
    lines = {(line["meter"], line["resource_kind"], line["price_id"]): line["microcredits"]
             for line in statement["used_by_kind"] if line["microcredits"]}
    assert lines == {("cfapps", "", tier_id): floor(tier_total)}


# -- the ledger's migration 009 ------------------------------------------------------------------------------


async def test_migration_009_publishes_the_existing_assignments_once(database: Any, tmp_path: Path) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for path in sorted(Path(LEDGER_MIGRATIONS).glob("*.sql")):
        if path.name < "009":
            shutil.copy(path, before / path.name)
    pool = await create_pool(database.dsn("ledger"), "ledger", max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "ledger", before)
            await conn.execute("INSERT INTO tiers (name, credits_per_period) VALUES ('gold', 1), ('basic', 1)")
            a, b = uuid.uuid4(), uuid.uuid4()
            await conn.execute("INSERT INTO customers (id, name, tier) VALUES ($1, 'A', 'gold'), ($2, 'B', 'basic')",
                               a, b)
            made = [("org-1", datetime(2026, 1, 1, 5, tzinfo=UTC), a),
                    ("org-1", datetime(2026, 3, 1, 5, 0, 0, 123456, tzinfo=UTC), b),
                    ("org-é", datetime(2025, 11, 1, 4, tzinfo=UTC), b)]
            for org, starts, customer in made:
                await conn.execute("INSERT INTO org_assignments (org_id, starts_at, customer_id) VALUES ($1, $2, $3)",
                                   org, starts, customer)
            created = {(r["org_id"], r["starts_at"]): r["created_at"]
                       for r in await conn.fetch("SELECT org_id, starts_at, created_at FROM org_assignments")}
            await migrate(conn, "ledger", LEDGER_MIGRATIONS)
            rows = await conn.fetch("SELECT topic, key, payload FROM outbox ORDER BY id")
            await migrate(conn, "ledger", LEDGER_MIGRATIONS)  # applied once: nothing more
            assert await conn.fetchval("SELECT count(*) FROM outbox") == len(rows)
    finally:
        await pool.close()
    assert {r["topic"] for r in rows} == {ASSIGNMENTS}
    got = {(m.org_id, m.starts_at): m for m in (OrgAssigned.model_validate_json(bytes(r["payload"])) for r in rows)}
    tiers = {a: "gold", b: "basic"}
    assert got == {
        (org, starts): OrgAssigned(id=org_assignment_id(org, starts), org_id=org, starts_at=starts, customer_id=c,
                                   tier=tiers[c], assigned_at=created[(org, starts)])
        for org, starts, c in made
    }
    assert sorted(bytes(r["key"]) for r in rows) == sorted(org.encode() for org, _, _ in made)


async def test_the_running_ledger_publishes_each_assignment_it_commits_and_only_those(
    database: Any, infra: Any, ledger_topics: str, issuer: Any
) -> None:
    from tests.integration.test_ledger_http import read_topic, settings_for
    from tests.integration.test_ledger_http import running as running_ledger

    async with running_ledger(settings_for(database, infra, ledger_topics, issuer), issuer) as client:
        assert (await client.post("/internal/tiers", json={"name": "gold", "credits_per_period": 5})).status_code == 201
        customer = (await client.post("/internal/customers", json={"name": "A", "tier": "gold"})).json()["id"]
        org = {"org_id": "org-9", "customer_id": customer, "starts_at": "2026-01-01T05:00:00Z"}
        made = await client.post("/internal/org-assignments", json=org)
        assert made.status_code == 201, made.text
        assert (await client.post("/internal/org-assignments", json=org)).status_code == 409  # refused: not sent
        assert (await client.post("/internal/org-assignments", json=org | {"org_id": ""})).status_code == 422
        records = await read_topic(infra.kafka, ledger_topics + ASSIGNMENTS, lambda rs: len(rs) >= 1, timeout=20)
        await asyncio.sleep(1)  # anything more would have arrived by now
        records = await read_topic(infra.kafka, ledger_topics + ASSIGNMENTS, lambda rs: False, timeout=2)
    assert len(records) == 1
    message = OrgAssigned.model_validate_json(records[0].value)
    starts = datetime(2026, 1, 1, 5, tzinfo=UTC)
    assert records[0].key == b"org-9"
    assert (message.id, message.org_id, message.starts_at, str(message.customer_id), message.tier) == (
        org_assignment_id("org-9", starts), "org-9", starts, customer, "gold")
