"""The completeness report through the whole pipeline: the simulator, the collector, the pricer, the ledger
and the api, each its real app (lifespan, pool, migrations, consumers) on a fresh database and topic set,
served over real HTTP, so the api fans out to the owners' internal routes as in production.

The scenario: six hours; hours 0, 1 and 3 read, hour 2 missed (estimated when hour 3 is read), hour 4
read during a Cloud Foundry outage (both meters fail, nothing estimates it), hour 5 never read. One org
has no customer (held), one service plan has no price (unpriced), the app memory price arrives after the
readings (every app charge re-priced to revision 2), one measurement is corrupted on its way to the
pricer (dead-lettered there), garbage lands on both topics (unattributed), and a charge the pricer never
made is refused by the ledger. Every figure of the report is compared with what the simulator's oracle
and the test's own actions imply, not with what the report said before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from services.collector.app import create_app as collector_app
from services.collector.settings import CollectorSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings
from shared import ids
from shared.batches import (
    Charges,
    Ref,
    charges_id,
    decode_charges,
    decode_measurements,
    encode_charges,
    encode_measurements,
    hour_text,
    shard_key,
    shard_of,
    subset,
)
from shared.kafka import Outgoing, group_lag
from shared.topics import CHARGES, READINGS
from simulator import FaultConfig, Foundation, SimConfig
from tests.sim_server import running_sim, serve_app
from tests.support.api_harness import running_api
from tests.support.documents import packed, unpacked
from tests.support.openapi_checks import response_schema, violations

pytestmark = pytest.mark.integration

H = timedelta(hours=1)
T0 = datetime(2026, 10, 6, 4, tzinfo=UTC)
HOURS = [T0 + k * H for k in range(6)]
WORLD: dict[str, int] = {"seed": 11, "orgs": 3, "spaces_per_org": 2, "apps": 36, "services": 18, "plans": 3}
COUNTED = (
    "read",
    "estimated",
    "published",
    "priced",
    "unpriced",
    "dead_lettered_at_pricer",
    "posted",
    "held",
    "dead_lettered_at_ledger",
)


class CorruptingPublisher:
    """Publishes like the collector's publisher, but turns one measurement of one hour into an invalid item
    (a negative value) on its way: the pricer must dead-letter that item alone, and the report must count
    it there."""

    def __init__(self, inner: Any, hour: datetime, target: str) -> None:
        self.inner, self.hour, self.target, self.corrupted = inner, hour, target, 0

    async def publish(self, topic: str, messages: Any) -> int:
        out = []
        for m in messages:
            doc = orjson.loads(m.value)
            if datetime.fromisoformat(doc["reading_hour"]) == self.hour and self.target in doc["resource_id"]:
                doc["value"][doc["resource_id"].index(self.target)] = -1
                m = Outgoing(m.key, orjson.dumps(doc), m.headers)
                self.corrupted += 1
            out.append(m)
        return int(await self.inner.publish(topic, out))

    async def ping(self) -> None:
        await self.inner.ping()


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    async with app.router.lifespan_context(app), serve_app(app) as url:
        yield url


@dataclass
class Pipeline:
    api: Any  # tests.support.api_harness.ApiHarness
    collector: Any  # services.collector.service.Collector of the running collector app
    pricer_url: str
    ledger_url: str
    kafka: str
    prefix: str

    async def report(self, start: datetime, end: datetime) -> dict[str, Any]:
        resp = await self.api.client.get(
            "/admin/completeness",
            params={"from": start.isoformat(), "to": end.isoformat()},
            headers=self.api.admin,
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        assert violations(body, response_schema("/admin/completeness", "get", 200)) == []
        return body

    async def caught_up(self, timeout: float = 90) -> None:
        """Both consumer groups have committed everything (the group is prefixed, or named bare by older
        runtimes: the smaller lag is the real group's)."""

        async def lag(group: str, topic: str) -> int:
            return min([await group_lag(self.kafka, g, self.prefix + topic) for g in (self.prefix + group, group)])

        deadline = asyncio.get_running_loop().time() + timeout
        while await lag("pricer", READINGS) or await lag("ledger", CHARGES):
            assert asyncio.get_running_loop().time() < deadline, "the pricer and the ledger did not catch up"
            await asyncio.sleep(0.3)


@pytest.fixture
async def pipeline(infra, database, topic_prefix, issuer) -> AsyncIterator[tuple[Pipeline, Any]]:
    common: dict[str, Any] = {
        "oidc_issuer": issuer.url,  # the api forwards its caller's token: the owners verify it
        "kafka_bootstrap_servers": infra.kafka,
        "topic_prefix": topic_prefix,
        "port": 1,
        "batch_timeout_ms": 50,
    }
    faults = FaultConfig(outage=[(HOURS[4], HOURS[5])])
    async with running_sim(SimConfig(**WORLD, faults=faults)) as (sim_url, _):
        collector = collector_app(
            CollectorSettings(
                database_url=database.dsn("collector"),
                cf_api_url=sim_url,
                uaa_url=sim_url,
                schedule_enabled=False,
                sim_time_header=True,
                per_page=50,
                retry_attempts=1,
                request_timeout_seconds=10,
                **common,
            )
        )
        pricer = pricer_app(PricerSettings(database_url=database.dsn("pricer"), **common))
        ledger = ledger_app(
            LedgerSettings(
                database_url=database.dsn("ledger"), auto_close_months=False, periodic_interval_seconds=0, **common
            )
        )
        async with served(collector) as collector_url, served(pricer) as pricer_url, served(ledger) as ledger_url:
            overrides = {"collector_url": collector_url, "pricer_url": pricer_url, "ledger_url": ledger_url}
            async with running_api(infra, database, topic_prefix, issuer, **overrides) as api:
                yield (
                    Pipeline(
                        api,
                        collector.state.runtime.state["collector"],
                        pricer_url,
                        ledger_url,
                        infra.kafka,
                        topic_prefix,
                    ),
                    database,
                )


def oracle(world: Foundation, hour: datetime) -> dict[tuple[str, str], Any]:
    return {(e.meter, e.resource_guid): e for e in world.expected_usage(hour)}


async def test_the_report_counts_every_stage_and_flags_what_does_not_reconcile(pipeline):
    p, database = pipeline
    world = Foundation(**WORLD)
    unassigned_org = world.orgs()[-1].guid
    unpriced_plan = world.plans()[-1].guid
    async with httpx.AsyncClient(timeout=30, headers=p.api.issuer.bearer()) as http:
        # The ledger: every org but the last has a customer from before the first hour.
        assert (
            await http.post(f"{p.ledger_url}/internal/tiers", json={"name": "std", "credits_per_period": 10**9})
        ).status_code == 201
        customer = (
            await http.post(f"{p.ledger_url}/internal/customers", json={"name": "Agency", "tier": "std"})
        ).json()["id"]
        for org in world.orgs()[:-1]:
            body = {"org_id": org.guid, "customer_id": customer, "starts_at": "2026-10-01T00:00:00Z"}
            assert (await http.post(f"{p.ledger_url}/internal/org-assignments", json=body)).status_code == 201
        # The pricer: every service plan but the last has a price; app memory gets one only later.
        for plan in world.plans()[:-1]:
            price = {
                "meter": "cfservices",
                "resource_kind": plan.guid,
                "unit_of_measure": "instance-hour",
                "microcredits_per_unit": 2_000_000,
                "unit": 730,
                "valid_from": "2026-10-01T00:00:00Z",
            }
            assert (await http.post(f"{p.pricer_url}/internal/prices", json=price)).status_code == 201

        # One measurement of hour 1 is corrupted on its way to the pricer.
        victim = min(k for k in oracle(world, HOURS[1]) if k[0] == "cfservices")
        corrupting = CorruptingPublisher(p.collector.publisher, HOURS[1], victim[1])
        p.collector.publisher = corrupting
        outcomes = [await p.collector.take_reading(HOURS[k], kind="periodic") for k in (0, 1, 3, 4)]
        assert [bool(o.errors) for o in outcomes] == [False, False, False, True]
        assert corrupting.corrupted == 1

        # Garbage on both topics (no hour, no meter), and a charge the pricer never made (unpriced with an
        # amount: every consumer refuses the item) for the hour before the first reading.
        intruder_hour = HOURS[0] - H
        shard = shard_of("intruder-app")
        intruder = Charges(
            id=charges_id(intruder_hour, "cfapps", shard, ["intruder-app"], [1]),
            reading_hour=intruder_hour, meter="cfapps", unit="MB", shard=shard, priced_at=intruder_hour,
            orgs=[Ref(world.orgs()[0].guid)], spaces=[Ref("")], kinds=[""], prices=[],
            resource_id=["intruder-app"], resource_name=[""], org=[0], space=[0], kind=[0], value=[64],
            estimated=[False], revision=[1], price=[-1], amount_numerator=[5], amount_denominator=[1],
        )
        publisher = p.api.publisher
        await publisher.publish(p.prefix + READINGS, [Outgoing(b"x", b"this is not a measurement")])
        await publisher.publish(
            p.prefix + CHARGES,
            [Outgoing(b"x", b"\x00 nor a charge"), Outgoing(shard_key(shard), encode_charges(intruder))],
        )
        await p.caught_up()

        # App memory is priced now: every app charge becomes revision 2, and the ledger applies it.
        price = {
            "meter": "cfapps",
            "unit_of_measure": "MB-hour",
            "microcredits_per_unit": 1_000_000,
            "unit": 747_520,
            "valid_from": "2026-10-01T00:00:00Z",
        }
        created = await http.post(f"{p.pricer_url}/internal/prices", json=price)
        assert created.status_code == 201
    apps_charged = sum(sum(1 for k in oracle(world, h) if k[0] == "cfapps") for h in (HOURS[0], HOURS[1], HOURS[3]))
    # the estimated hour 2: resources on both sides of the gap (hours 1 and 3)
    estimated = {k: e for k, e in oracle(world, HOURS[1]).items() if k in oracle(world, HOURS[3])}
    apps_charged += sum(1 for k in estimated if k[0] == "cfapps")
    assert created.json()["repriced_charges"] == apps_charged
    await p.caught_up()

    # What the report must say, from the oracle and from what this test did.
    want = {(h, m): dict.fromkeys(COUNTED, 0) for h in HOURS[:4] for m in ("cfapps", "cfservices")}
    for hour, source, kind in (
        (HOURS[0], oracle(world, HOURS[0]), "read"),
        (HOURS[1], oracle(world, HOURS[1]), "read"),
        (HOURS[2], estimated, "estimated"),
        (HOURS[3], oracle(world, HOURS[3]), "read"),
    ):
        for (meter, resource), e in source.items():
            row = want[(hour, meter)]
            row[kind] += 1
            row["published"] += 1
            if hour == HOURS[1] and (meter, resource) == victim:
                row["dead_lettered_at_pricer"] += 1
                continue
            row["unpriced" if e.resource_kind == unpriced_plan and meter == "cfservices" else "priced"] += 1
            row["held" if e.org_guid == unassigned_org else "posted"] += 1
    want[(intruder_hour, "cfapps")] = dict.fromkeys(COUNTED, 0) | {"dead_lettered_at_ledger": 1}
    assert all(w["unpriced"] for (_, m), w in want.items() if m == "cfservices" and w["read"] + w["estimated"])
    assert all(w["held"] for w in want.values() if w["read"] + w["estimated"])

    report = await p.report(HOURS[0] - 2 * H, HOURS[5] + H)
    rows = {(datetime.fromisoformat(r["hour"]), r["meter"]): r for r in report["rows"]}
    got = {k: {c: r[c] for c in COUNTED} for k, r in rows.items() if k[0] < HOURS[4]}
    assert got == want
    assert report["totals"]["dead_lettered_at_pricer"] == 1 and report["totals"]["unpublished"] == 0
    dead = {d["topic"]: d for d in report["dead_letters"]}
    assert dead[p.prefix + READINGS + ".dlq"]["unattributed"] == 1
    # the api's group dead-lettered the garbage charge too: it is counted once, as the ledger's
    assert dead[p.prefix + CHARGES + ".dlq"]["unattributed"] == 1
    assert dead[p.prefix + CHARGES + ".dlq"]["counted"] == 2
    assert all(d["complete"] for d in report["dead_letters"])

    # Flagged: the intruder's row, and both meters of hours 4 (failed) and 5 (never read). Nothing else:
    # re-priced charges count once, at revision 2, and the ledger has them.
    flagged = {k: [(x["rule"], x["detail"]) for x in r["problems"]] for k, r in rows.items() if not r["reconciles"]}
    assert set(flagged) == {(intruder_hour, "cfapps")} | {(h, m) for h in HOURS[4:] for m in ("cfapps", "cfservices")}
    assert flagged[(intruder_hour, "cfapps")] == [
        ("posted", "priced 0 + unpriced 0 = 0 charges, the ledger has posted 0 + held 0 + dead-lettered 1 = 1")
    ]
    for h, status in ((HOURS[4], "failed"), (HOURS[5], "none")):
        for m in ("cfapps", "cfservices"):
            assert [rule for rule, _ in flagged[(h, m)]] == ["reading"] and rows[(h, m)]["reading"] == status
            assert rows[(h, m)]["expected"] is True
    assert not rows[(intruder_hour, "cfapps")]["expected"]  # before the first reading
    assert Counter(r["reading"] for k, r in rows.items() if k[0] < HOURS[4]) == Counter(
        {"ok": 6, "estimated": 2, "none": 1}  # hours 0, 1, 3 read; hour 2 estimated; the intruder's hour
    )
    assert report["flagged"] == 5 and report["missing_readings"] == 4 and report["reconciles"] is False

    # The hours that went through reconcile.
    clean = await p.report(HOURS[0], HOURS[4])
    assert clean["reconciles"] is True and clean["flagged"] == 0 and clean["hours"] == 4
    assert len(clean["rows"]) == 8 and all(r["revisions_behind"] == 0 for r in clean["rows"])

    # A deliberately un-posted hour: the ledger loses three charges of hour 3's apps (taken out of one
    # shard's applied charges, with its counts).
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        row = await conn.fetchrow(
            """SELECT shard, items FROM ledger.shard_state
                WHERE reading_hour = $1 AND meter = 'cfapps' AND posted >= 3 ORDER BY shard LIMIT 1""",
            HOURS[3],
        )
        [raw] = await unpacked(conn, "ledger", [row["items"]])
        doc = orjson.loads(raw)
        lost = doc["v"][:3]
        kept = {k: v[3:] for k, v in doc.items()}
        await conn.execute(
            """UPDATE ledger.shard_state SET items = $3, posted = posted - 3, revisions = revisions - $4
                WHERE reading_hour = $1 AND meter = 'cfapps' AND shard = $2""",
            HOURS[3], row["shard"], packed(orjson.dumps(kept)), sum(lost),
        )
    finally:
        await conn.close()
    assert len(lost) == 3
    after = await p.report(HOURS[0], HOURS[4])
    w = want[(HOURS[3], "cfapps")]
    bad = [r for r in after["rows"] if not r["reconciles"]]
    assert [(r["hour"], r["meter"], r["posted"]) for r in bad] == [
        (HOURS[3].isoformat().replace("+00:00", "Z"), "cfapps", w["posted"] - 3)
    ]
    assert [x["rule"] for x in bad[0]["problems"]] == ["posted"]
    assert bad[0]["problems"][0]["detail"] == (
        f"priced {w['priced']} + unpriced 0 = {w['priced']} charges, the ledger has posted {w['posted'] - 3} "
        f"+ held {w['held']} + dead-lettered 0 = {w['posted'] + w['held'] - 3}"
    )
    assert after["reconciles"] is False


async def test_bad_ranges_are_422_problems_and_readers_are_refused(pipeline):
    p, _ = pipeline
    h = p.api
    cases = [
        {},
        {"from": "2026-10-06T04:00:00Z"},
        {"from": "2026-10-06T04:00:00", "to": "2026-10-06T05:00:00Z"},
        {"from": "2026-10-06T05:00:00Z", "to": "2026-10-06T04:00:00Z"},
        {"from": "2026-10-06T04:10:00Z", "to": "2026-10-06T04:50:00Z"},  # no whole hour
        {"from": "2026-10-01T00:00:00Z", "to": "2026-11-01T01:00:00Z"},  # 745 hours
        {"from": "1970-01-01T00:00:00Z", "to": "9998-01-01T00:00:00Z"},
        {"from": "2026-10-06T04:00:00Z", "to": "2026-10-06T05:00:00Z", "meter": "cfapps"},
    ]
    for params in cases:
        resp = await h.client.get("/admin/completeness", params=params, headers=h.admin)
        assert resp.status_code == 422, (params, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"
    # 31 days is the limit, and it is answered (the services are up)
    month = await h.client.get(
        "/admin/completeness",
        params={"from": "2026-10-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"},
        headers=h.admin,
        timeout=60,
    )
    assert month.status_code == 200 and month.json()["hours"] == 744
    assert (
        await h.client.get(
            "/admin/completeness",
            params={"from": "2026-10-06T04:00:00Z", "to": "2026-10-06T05:00:00Z"},
            headers=h.headers(),
        )
    ).status_code == 403


async def _read_all(kafka: str, topic: str, at_least: int = 0, timeout: float = 60) -> list[Any]:
    """Every record of ``topic`` from the beginning, waiting until there are ``at_least`` (then one more
    short poll, so that what is there is read)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        quiet = 0
        while asyncio.get_running_loop().time() < deadline and (len(out) < at_least or quiet < 3):
            got = await consumer.getmany(timeout_ms=300)
            quiet = 0 if got else quiet + 1
            for records in got.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def test_a_conflicting_duplicate_is_refused_kept_out_and_flags_its_hour(pipeline):
    """A reading goes through; then a copy of one of its measurements with another value reaches the
    pricer, and a copy of one of its charges with another amount (same revision) reaches the ledger and the
    api. The originals stay priced and posted exactly as before, each copy is in its DLQ with a reason that
    names the stored one, the report flags the hour (rule ``conflict``, counted apart from the dead
    letters), and an identical copy of the same messages changes nothing and goes nowhere."""
    p, database = pipeline
    world = Foundation(**WORLD)
    hour = HOURS[0]
    async with httpx.AsyncClient(timeout=30, headers=p.api.issuer.bearer()) as http:
        assert (
            await http.post(f"{p.ledger_url}/internal/tiers", json={"name": "std", "credits_per_period": 10**9})
        ).status_code == 201
        customer = (
            await http.post(f"{p.ledger_url}/internal/customers", json={"name": "Agency", "tier": "std"})
        ).json()["id"]
        for org in world.orgs():
            body = {"org_id": org.guid, "customer_id": customer, "starts_at": "2026-10-01T00:00:00Z"}
            assert (await http.post(f"{p.ledger_url}/internal/org-assignments", json=body)).status_code == 201
        prices = [{"meter": "cfapps", "unit_of_measure": "MB-hour", "microcredits_per_unit": 1_000_000,
                   "unit": 747_520}]
        prices += [{"meter": "cfservices", "resource_kind": plan.guid, "unit_of_measure": "instance-hour",
                    "microcredits_per_unit": 2_000_000, "unit": 730} for plan in world.plans()]
        for price in prices:
            price["valid_from"] = "2026-10-01T00:00:00Z"
            assert (await http.post(f"{p.pricer_url}/internal/prices", json=price)).status_code == 201
    assert not (await p.collector.take_reading(hour, kind="periodic")).errors
    await p.caught_up()

    async def books() -> tuple[list[Any], list[Any]]:
        conn = await asyncpg.connect(database.admin_dsn)
        try:
            groups = await conn.fetch("SELECT price_id, sum_num, sum_den, posted FROM ledger.month_usage ORDER BY 1")
            batches = await conn.fetch(
                "SELECT reading_hour, meter, shard, seq FROM pricer.charge_batches ORDER BY 1, 2, 3, 4"
            )
        finally:
            await conn.close()
        return [tuple(g) for g in groups], [tuple(b) for b in batches]

    before = await books()
    report_before = await p.report(hour, hour + H)
    assert report_before["reconciles"] is True

    # The collector's message of an app shard with two items or more, and the charges of a service shard.
    readings = await _read_all(p.kafka, p.prefix + READINGS, 1)
    original = next(m for m in (decode_measurements(r.value).message for r in readings)
                    if m is not None and m.meter == "cfapps" and m.reading_hour == hour and len(m.resource_id) >= 2)
    charges = [decode_charges(r.value).message for r in await _read_all(p.kafka, p.prefix + CHARGES, 1)]
    priced = next(c for c in charges if c is not None and c.meter == "cfservices" and c.reading_hour == hour)
    [stored_charges] = [c for c in charges if c is not None and c.meter == "cfapps"
                        and original.resource_id[0] in c.resource_id]
    forged_reading = msgspec.structs.replace(subset(original, [0]), value=[original.value[0] + 1])
    forged_charge = msgspec.structs.replace(subset(priced, [0]), amount_numerator=[priced.amount_numerator[0] + 1])
    publisher = p.api.publisher
    readings_key, charges_key = shard_key(original.shard), shard_key(priced.shard)
    for _ in range(2):  # the identical copies, twice
        await publisher.publish(p.prefix + READINGS, [Outgoing(readings_key, encode_measurements(original))])
        await publisher.publish(p.prefix + CHARGES, [Outgoing(charges_key, encode_charges(priced))])
    await publisher.publish(p.prefix + READINGS, [Outgoing(readings_key, encode_measurements(forged_reading))])
    await publisher.publish(p.prefix + CHARGES, [Outgoing(charges_key, encode_charges(forged_charge))])
    await p.caught_up()
    dead_readings = await _read_all(p.kafka, p.prefix + READINGS + ".dlq", 1)
    dead_charges = await _read_all(p.kafka, p.prefix + CHARGES + ".dlq", 2)  # the ledger's and the api's

    assert await books() == before  # nothing re-priced, nothing posted: the originals as they were
    rid = original.resource_id[0]
    mid = ids.measurement_id(hour, "cfapps", rid)
    [refused] = dead_readings  # the identical copies went nowhere
    assert dict(refused.headers)["dlq.reason"].decode() == (
        f"conflict: measurement {mid} ({hour_text(hour)}, cfapps, resource {rid}) is stored with other content: "
        f"value {original.value[0] + 1} (stored: {original.value[0]}); the stored copy is kept (charges batch "
        f"{stored_charges.id}, charge {ids.charge_id(mid, 1)} at revision 1)"
    )
    assert decode_measurements(refused.value).message == forged_reading
    by_group = {dict(r.headers)["dlq.group"].decode(): r for r in dead_charges}
    assert set(by_group) == {p.prefix + "ledger", p.prefix + "api"}
    charge_mid = ids.measurement_id(hour, "cfservices", priced.resource_id[0])
    amount = f"amount {priced.amount_numerator[0] + 1}/{priced.amount_denominator[0]}"
    for group, stored in (("ledger", "applied"), ("api", "stored")):
        reason = dict(by_group[p.prefix + group].headers)["dlq.reason"].decode()
        assert reason.startswith(f"conflict: charge {ids.charge_id(charge_mid, 1)} (measurement {charge_mid}: ")
        assert f"{amount} ({stored}: {priced.amount_numerator[0]}/{priced.amount_denominator[0]})" in reason
        assert decode_charges(by_group[p.prefix + group].value).message == forged_charge

    report = await p.report(hour, hour + H)
    rows = {r["meter"]: r for r in report["rows"]}
    old = {r["meter"]: r for r in report_before["rows"]}
    for meter, (at_pricer, at_ledger) in (("cfapps", (1, 0)), ("cfservices", (0, 1))):
        row = rows[meter]
        assert (row["conflicts_at_pricer"], row["conflicts_at_ledger"]) == (at_pricer, at_ledger)
        assert {k: v for k, v in row.items() if k in COUNTED} == {k: v for k, v in old[meter].items() if k in COUNTED}
        assert [x["rule"] for x in row["problems"]] == ["conflict"] and not row["reconciles"]
    assert report["totals"]["conflicts_at_pricer"] == report["totals"]["conflicts_at_ledger"] == 1
    assert report["totals"]["dead_lettered_at_pricer"] == report["totals"]["dead_lettered_at_ledger"] == 0
    assert report["flagged"] == 2 and report["reconciles"] is False
