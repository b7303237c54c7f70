"""The collector against the simulator over real HTTP, with real Kafka and PostgreSQL: a reading is stored
as the batches it publishes (reading_batches, one per hour, meter, shard and part) before they are
published, one periodic reading per hour, gaps estimated by policy, the relay publishing after a crash, the
same batch re-published byte for byte, and the counts of the completeness report."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from services.collector.app import MIGRATIONS
from services.collector.cf_client import CFClient
from services.collector.completeness import facts
from services.collector.service import Collector
from shared import ids
from shared.batches import Measurements, decode_measurements, measurements_id, shard_key, shard_of
from shared.contracts import MeasurementsTaken
from shared.db import create_pool, migrate
from shared.kafka import Outgoing, Publisher
from shared.topics import READINGS
from simulator import FaultConfig, Foundation, SimConfig
from tests.sim_server import running_sim
from tests.support.documents import unpacked
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

T0 = datetime(2026, 10, 1, tzinfo=UTC)
H = timedelta(hours=1)
WORLD: dict[str, Any] = {"seed": 7, "orgs": 3, "spaces_per_org": 2, "apps": 120, "services": 40, "plans": 4}
Facts = dict[tuple[str, str], tuple[str, str, str, int]]  # (meter, resource) -> (kind, org, space, value)


@dataclass
class Env:
    pool: asyncpg.Pool
    publisher: Publisher
    topic: str
    kafka: str

    def collector(self, base_url: str, **kw: Any) -> Collector:
        cf = CFClient(base_url, base_url, "billing-collector", "sim-secret", per_page=kw.pop("per_page", 25),
                      attempts=kw.pop("attempts", 2), refresh_margin=kw.pop("refresh_margin", 0),
                      timeout=kw.pop("timeout", 5))
        return Collector(self.pool, cf, self.publisher, self.topic, sim_time=True, **kw)


@pytest.fixture
async def env(infra: Any, database: Any, topic_prefix: str) -> AsyncIterator[Env]:
    pool = await create_pool(database.dsn("collector"), "collector", max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn, "collector", MIGRATIONS)
    pub = Publisher(infra.kafka, client_id="test-collector")
    await pub.start()
    try:
        yield Env(pool, pub, topic_prefix + READINGS, infra.kafka)
    finally:
        await pub.stop()
        await pool.close()


async def published(kafka: str, topic: str, at_least: int, timeout: float = 30) -> list[ConsumerRecord]:
    """The records of the readings topic once ``at_least`` measurements arrived and nothing more comes."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[ConsumerRecord] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        idle = 0
        while loop.time() < deadline:
            got = [r for recs in (await consumer.getmany(timeout_ms=300)).values() for r in recs]
            out.extend(got)
            idle = idle + 1 if not got else 0
            if sum(len(batch_of(r.value).resource_id) for r in out) >= at_least and idle >= 2:
                break
    finally:
        await consumer.stop()
    return out


def batch_of(raw: bytes) -> Measurements:
    """A readings batch as every consumer reads it: all its items good."""
    decoded = decode_measurements(raw)
    assert decoded.rejected == [] and decoded.message is not None, decoded.rejected
    return decoded.message


def facts_of(batches: Sequence[Measurements], estimated: bool | None = None) -> Facts:
    out: Facts = {}
    for b in batches:
        for i, rid in enumerate(b.resource_id):
            if estimated is not None and b.estimated[i] != estimated:
                continue
            key = (b.meter, rid)
            assert key not in out, f"{key} twice"
            out[key] = (b.kinds[b.kind[i]], b.orgs[b.org[i]].id, b.spaces[b.space[i]].id, b.value[i])
    return out


def expected(world: Foundation, hour: datetime) -> Facts:
    return {
        (e.meter, e.resource_guid): (e.resource_kind, e.org_guid, e.space_guid, e.value)
        for e in world.expected_usage(hour)
    }


async def stored_rows(pool: asyncpg.Pool, hour: datetime) -> list[dict[str, Any]]:
    """The hour's stored batches, each message as published (stored compressed)."""
    rows = await pool.fetch("SELECT * FROM reading_batches WHERE hour = $1 ORDER BY meter, shard, part", hour)
    messages = await unpacked(pool, "collector", [r["message"] for r in rows])
    return [dict(r) | {"message": m} for r, m in zip(rows, messages, strict=True)]


async def owed(pool: asyncpg.Pool) -> int:
    """Batches the relay still owes the broker."""
    return int(await pool.fetchval("SELECT count(*) FROM reading_outbox"))


async def stored(pool: asyncpg.Pool, hour: datetime, estimated: bool | None = None) -> Facts:
    return facts_of([batch_of(bytes(r["message"])) for r in await stored_rows(pool, hour)], estimated)


async def test_a_reading_stores_and_publishes_exactly_what_the_seed_implies_across_pages(env: Env) -> None:
    world = Foundation(**WORLD)
    hour = T0 + 5 * H
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        collector = env.collector(url, per_page=25)
        outcome = await collector.take_reading(hour)
        await collector.cf.close()
    want = expected(world, hour)
    assert len(want) > 100  # several pages of 25
    assert outcome.status == "taken" and outcome.measurements == len(want) and outcome.errors == []
    assert await stored(env.pool, hour) == want
    rows = await stored_rows(env.pool, hour)
    assert all(r["reading_id"] == ids.reading_id(hour) for r in rows)
    assert await owed(env.pool) == 0
    records = await published(env.kafka, env.topic, len(want))
    # What is published is what was stored, byte for byte, one message per stored batch, keyed by its shard.
    assert sorted(r.value for r in records) == sorted(bytes(r["message"]) for r in rows)
    batches = [batch_of(r.value) for r in records]
    assert facts_of(batches) == want
    for record, b in zip(records, batches, strict=True):
        MeasurementsTaken.model_validate_json(record.value)
        assert record.key == shard_key(b.shard)
        assert b.id == measurements_id(hour, b.meter, b.shard, b.resource_id) and b.reading_hour == hour
        assert all(shard_of(r) == b.shard for r in b.resource_id)
        assert all(b.orgs[o].name for o in b.org) and all(b.spaces[s].name for s in b.space) and all(b.resource_name)
    assert {(b.meter, b.shard) for b in batches} == {(r["meter"], r["shard"]) for r in rows}
    assert len(batches) == len({(b.meter, b.shard) for b in batches})  # one batch per meter and shard


class CrashingPublisher:
    async def publish(self, topic: str, messages: Sequence[Outgoing]) -> int:
        raise ConnectionResetError("killed between commit and publish")


async def test_a_crash_between_commit_and_publish_loses_nothing_after_restart(env: Env) -> None:
    world = Foundation(**WORLD)
    hour = T0 + 9 * H
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        crashed = env.collector(url)
        crashed.publisher = CrashingPublisher()  # type: ignore[assignment]
        with pytest.raises(ConnectionResetError):
            await crashed.take_reading(hour)
        await crashed.cf.close()
    # Stored before published: committed, not published.
    assert await stored(env.pool, hour) == expected(world, hour)
    rows = await stored_rows(env.pool, hour)
    assert rows and await owed(env.pool) == len(rows)
    assert [r["published_at"] for r in await env.collector("http://127.0.0.1:1").readings(hour, hour + H)] == [None]
    # The restarted collector's relay sends what is owed, the stored bytes.
    restarted = env.collector("http://127.0.0.1:1")
    sent = await restarted.relay()
    assert sent == len(rows)
    records = await published(env.kafka, env.topic, len(expected(world, hour)))
    assert sorted(r.value for r in records) == sorted(bytes(r["message"]) for r in rows)
    assert set(Counter(r.value for r in records).values()) == {1}
    assert await restarted.relay() == 0
    assert await owed(env.pool) == 0
    assert (await restarted.readings(hour, hour + H))[0]["published_at"] is not None
    await restarted.cf.close()


async def test_a_batch_published_again_is_the_same_bytes(env: Env) -> None:
    """What re-publishing the same reading yields (a relay that lost its acknowledgement, an operator's
    re-send): byte-identical messages, so every consumer sees the same batch ids and items."""
    hour = T0 + 11 * H
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        collector = env.collector(url)
        await collector.take_reading(hour)
        await collector.cf.close()
    first = await published(env.kafka, env.topic, len(expected(Foundation(**WORLD), hour)))
    await env.pool.execute(  # owed again, as if the broker's acknowledgement had been lost
        "INSERT INTO reading_outbox SELECT hour, meter, shard, part FROM reading_batches WHERE hour = $1", hour
    )
    again = env.collector("http://127.0.0.1:1")
    assert await again.relay() == len(first)
    await again.cf.close()
    both = await published(env.kafka, env.topic, 2 * len(expected(Foundation(**WORLD), hour)))
    assert len(both) == 2 * len(first)
    assert Counter(r.value for r in both) == Counter({r.value: 2 for r in first})
    assert Counter(r.key for r in both) == Counter({k: 2 * n for k, n in Counter(r.key for r in first).items()})


@pytest.mark.parametrize("policy", ["previous", "linear", "none"])
async def test_an_outage_window_is_estimated_on_recovery_by_policy(env: Env, policy: str) -> None:
    world = Foundation(**WORLD)
    outage = (T0 + 2 * H, T0 + 5 * H)  # hours 2, 3, 4 are down
    async with running_sim(SimConfig(**WORLD, faults=FaultConfig(outage=[outage]))) as (url, _):
        collector = env.collector(url, gap_policy=policy)
        outcomes = [await collector.take_reading(T0 + k * H) for k in range(6)]
        await collector.cf.close()
    assert [bool(o.errors) for o in outcomes] == [False, False, True, True, True, False]
    before, after = expected(world, T0 + 1 * H), expected(world, T0 + 5 * H)
    both = sorted(set(before) & set(after))
    assert both
    for k, hour in enumerate([T0 + 2 * H, T0 + 3 * H, T0 + 4 * H], start=1):
        got = await stored(env.pool, hour, estimated=True)
        assert await stored(env.pool, hour, estimated=False) == {}
        if policy == "none":
            assert got == {}
            continue
        want = {}
        for key in both:
            kind, org, space, a = before[key]
            b = after[key][3]
            # Oracle: previous repeats a; linear interpolates a -> b over 4 steps, rounded half up.
            value = a if policy == "previous" else math.floor(a + Fraction(b - a) * k / 4 + Fraction(1, 2))
            want[key] = (kind, org, space, value)
        assert got == want
        rows = await stored_rows(env.pool, hour)
        assert all(r["reading_id"] == ids.reading_id(hour) and r["estimated"] == r["measurements"] for r in rows)
    assert outcomes[5].estimated == (0 if policy == "none" else 3 * len(both))
    if policy != "none":
        # Estimated measurements are published too, flagged, as the batches stored for their hours.
        total = sum(o.measurements for o in outcomes) + 3 * len(both)
        records = await published(env.kafka, env.topic, total)
        flagged = [(b.reading_hour, b.meter, r) for b in map(batch_of, (r.value for r in records))
                   for i, r in enumerate(b.resource_id) if b.estimated[i]]
        assert len(flagged) == len(set(flagged)) == 3 * len(both)


async def test_a_gap_longer_than_the_maximum_is_reported_not_filled(env: Env) -> None:
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        collector = env.collector(url, max_gap_hours=2)
        await collector.take_reading(T0)
        outcome = await collector.take_reading(T0 + 4 * H)  # 3 missing hours > 2
        await collector.cf.close()
    assert outcome.estimated == 0
    assert any("exceeds the maximum of 2" in e for e in outcome.errors)
    assert await env.pool.fetchval("SELECT count(*) FROM reading_batches WHERE estimated > 0") == 0
    assert await env.pool.fetchval("SELECT count(*) FROM readings") == 2


async def test_token_expiry_in_the_middle_of_a_paginated_reading_is_handled(env: Env) -> None:
    world = Foundation(**WORLD)
    hour = T0 + 3 * H
    config = SimConfig(**WORLD, token_ttl_seconds=1, faults=FaultConfig(slow_page_seconds=0.15))
    async with running_sim(config) as (url, _):
        # refresh_margin=0 and a 1 s token: pages take 0.15 s each, so the token dies mid-walk and the
        # client must notice the 401 (or the expiry) and fetch another.
        collector = env.collector(url, per_page=10, refresh_margin=0)
        outcome = await collector.take_reading(hour)
        fetches = collector.cf.token_fetches
        await collector.cf.close()
    assert outcome.errors == []
    assert fetches >= 2
    assert await stored(env.pool, hour) == expected(world, hour)


async def test_two_periodic_readings_in_one_hour_persist_one(env: Env, database: Any) -> None:
    hour = T0 + 7 * H
    other_pool = await create_pool(database.dsn("collector"), "collector", max_size=2)
    try:
        async with running_sim(SimConfig(**WORLD)) as (url, _):
            a = env.collector(url)
            cf = CFClient(url, url, "billing-collector", "sim-secret", per_page=25)
            b = Collector(other_pool, cf, env.publisher, env.topic, sim_time=True)
            results = await asyncio.gather(a.take_reading(hour), b.take_reading(hour))
            again = await a.take_reading(hour, kind="manual")
            await a.cf.close()
            await b.cf.close()
    finally:
        await other_pool.close()
    assert sorted(r.status for r in results) == ["exists", "taken"]
    assert again.status == "exists"
    assert await env.pool.fetchval("SELECT count(*) FROM readings WHERE hour = $1", hour) == 1
    assert await stored(env.pool, hour) == expected(Foundation(**WORLD), hour)  # one set of batches, no doubles


async def test_completeness_counts_what_was_read_estimated_and_published(env: Env) -> None:
    world = Foundation(**WORLD)
    outage = (T0 + 1 * H, T0 + 2 * H)  # hour 1 is down: estimated from hours 0 and 2
    async with running_sim(SimConfig(**WORLD, faults=FaultConfig(outage=[outage]))) as (url, _):
        collector = env.collector(url, gap_policy="previous")
        for k in range(3):
            await collector.take_reading(T0 + k * H)
        crashed = env.collector(url)
        crashed.publisher = CrashingPublisher()  # type: ignore[assignment]
        with pytest.raises(ConnectionResetError):
            await crashed.take_reading(T0 + 3 * H)  # stored, not published
        answer = await facts(collector, None, T0, T0 + 4 * H)
        await collector.cf.close()
        await crashed.cf.close()
    counts = {(c.hour, c.meter): (c.read, c.estimated, c.published, c.meter_run) for c in answer.items}
    per_meter = {
        k: Counter(m for m, _ in expected(world, T0 + k * H)) for k in range(4)
    }
    both = Counter(m for m, _ in set(expected(world, T0)) & set(expected(world, T0 + 2 * H)))
    for meter in ("cfapps", "cfservices"):
        assert counts[(T0, meter)] == (per_meter[0][meter], 0, per_meter[0][meter], "ok")
        assert counts[(T0 + H, meter)] == (0, both[meter], both[meter], "failed")
        assert counts[(T0 + 2 * H, meter)] == (per_meter[2][meter], 0, per_meter[2][meter], "ok")
        assert counts[(T0 + 3 * H, meter)] == (per_meter[3][meter], 0, 0, "ok")  # the relay still owes them
    assert set(answer.meters) == {"cfapps", "cfservices"} and answer.expected_since["cfapps"] == T0


async def test_a_manual_reading_through_the_internal_endpoint_is_a_noop_in_a_taken_hour(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    import httpx

    from services.collector.app import create_app
    from services.collector.settings import CollectorSettings

    hour = datetime(2026, 10, 2, 3, tzinfo=UTC)
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        settings = CollectorSettings(
            database_url=database.dsn("collector"), kafka_bootstrap_servers=infra.kafka, topic_prefix=topic_prefix,
            cf_api_url=url, uaa_url=url, schedule_enabled=False, sim_time_header=True, per_page=50,
            oidc_issuer=issuer.url,
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = issuer.bearer()
            async with httpx.AsyncClient(transport=transport, base_url="http://collector", headers=headers) as c:
                first = await c.post("/internal/readings", json={"hour": hour.isoformat()})
                again = await c.post("/internal/readings", json={"hour": hour.isoformat()})
                bad = await c.post("/internal/readings", json={"hour": "yesterday"})
                future = await c.post("/internal/readings", json={"hour": "2999-01-01T00:00:00Z"})
                params = {"from": "2026-10-02T00:00:00Z", "to": "2026-10-03T00:00:00Z"}
                listed = await c.get("/internal/readings", params=params)
    assert first.status_code == 201 and first.json()["status"] == "taken"
    assert first.json()["measurements"] == len(Foundation(**WORLD).expected_usage(hour))
    assert again.status_code == 200 and again.json()["status"] == "exists"
    assert "nothing was done" in again.json()["detail"]
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert future.status_code == 422
    assert [datetime.fromisoformat(r["hour"]) for r in listed.json()["items"]] == [hour]
    assert listed.json()["items"][0]["published_at"] is not None
