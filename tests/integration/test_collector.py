"""The collector against the simulator over real HTTP, with real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from services.collector.app import MIGRATIONS
from services.collector.cf_client import CFClient
from services.collector.service import Collector
from shared import ids
from shared.contracts import MeasurementTaken
from shared.db import create_pool, migrate
from shared.kafka import Publisher
from shared.topics import READINGS
from simulator import FaultConfig, Foundation, SimConfig
from tests.sim_server import running_sim

pytestmark = pytest.mark.integration

T0 = datetime(2026, 10, 1, tzinfo=UTC)
H = timedelta(hours=1)
WORLD = dict(seed=7, orgs=3, spaces_per_org=2, apps=120, services=40, plans=4)


@dataclass
class Env:
    pool: asyncpg.Pool
    publisher: Publisher
    topic: str
    kafka: str
    base_url: str = ""

    def collector(self, base_url: str, **kw) -> Collector:
        cf = CFClient(base_url, base_url, "billing-collector", "sim-secret", per_page=kw.pop("per_page", 25),
                      attempts=kw.pop("attempts", 2), refresh_margin=kw.pop("refresh_margin", 0), timeout=kw.pop("timeout", 5))
        return Collector(self.pool, cf, self.publisher, self.topic, sim_time=True, **kw)


@pytest.fixture
async def env(infra, database, topic_prefix) -> AsyncIterator[Env]:
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


async def published(kafka: str, topic: str, at_least: int, timeout: float = 30) -> list[MeasurementTaken]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[MeasurementTaken] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        idle = 0
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            got = [MeasurementTaken.model_validate_json(r.value) for recs in batch.values() for r in recs]
            out.extend(got)
            idle = idle + 1 if not got else 0
            if len(out) >= at_least and idle >= 2:
                break
    finally:
        await consumer.stop()
    return out


def expected(world: Foundation, hour: datetime) -> dict[tuple[str, str], tuple[str, str, str, int]]:
    return {(e.meter, e.resource_guid): (e.resource_kind, e.org_guid, e.space_guid, e.value) for e in world.expected_usage(hour)}


async def stored(pool: asyncpg.Pool, hour: datetime, estimated: bool | None = None) -> dict[tuple[str, str], tuple[str, str, str, int]]:
    rows = await pool.fetch(
        "SELECT meter, resource_id, resource_kind, org_id, space_id, value FROM measurements WHERE hour = $1"
        + ("" if estimated is None else f" AND estimated = {str(estimated).lower()}"),
        hour,
    )
    return {(r["meter"], r["resource_id"]): (r["resource_kind"], r["org_id"], r["space_id"], r["value"]) for r in rows}


async def test_a_reading_persists_and_publishes_exactly_what_the_seed_implies_across_pages(env):
    world = Foundation(**WORLD)
    hour = T0 + 5 * H
    async with running_sim(SimConfig(**WORLD)) as (url, sim):
        collector = env.collector(url, per_page=25)
        outcome = await collector.take_reading(hour)
        await collector.cf.close()
    want = expected(world, hour)
    assert len(want) > 100  # several pages of 25
    assert outcome.status == "taken" and outcome.measurements == len(want) and outcome.errors == []
    assert await stored(env.pool, hour) == want
    messages = await published(env.kafka, env.topic, len(want))
    assert len(messages) == len(want)
    assert {(m.meter, m.resource_id): (m.resource_kind, m.org_id, m.space_id, m.value) for m in messages} == want
    assert all(m.id == ids.measurement_id(hour, m.meter, m.resource_id) and m.reading_hour == hour for m in messages)
    assert all(m.org_name and m.space_name and m.resource_name for m in messages)


class CrashingPublisher:
    async def publish(self, topic, messages):
        raise ConnectionResetError("killed between commit and publish")


async def test_a_crash_between_commit_and_publish_loses_nothing_after_restart(env):
    world = Foundation(**WORLD)
    hour = T0 + 9 * H
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        crashed = env.collector(url)
        crashed.publisher = CrashingPublisher()  # type: ignore[assignment]
        with pytest.raises(ConnectionResetError):
            await crashed.take_reading(hour)
        await crashed.cf.close()
    # Committed, not published.
    assert await stored(env.pool, hour) == expected(world, hour)
    assert await env.pool.fetchval("SELECT published_at FROM readings WHERE hour = $1", hour) is None
    # The restarted collector's relay sends what is owed.
    restarted = env.collector("http://127.0.0.1:1")
    sent = await restarted.relay()
    await restarted.cf.close()
    assert sent == len(expected(world, hour))
    messages = await published(env.kafka, env.topic, sent)
    counts = Counter(m.id for m in messages)
    assert set(counts.values()) == {1}
    assert {(m.meter, m.resource_id) for m in messages} == set(expected(world, hour))
    assert await restarted.relay() == 0


@pytest.mark.parametrize("policy", ["previous", "linear", "none"])
async def test_an_outage_window_is_estimated_on_recovery_by_policy(env, policy):
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
    assert outcomes[5].estimated == (0 if policy == "none" else 3 * len(both))
    if policy != "none":
        # Estimated measurements are published too, flagged.
        msgs = await published(env.kafka, env.topic, sum(o.measurements for o in outcomes) + 3 * len(both))
        flagged = [m for m in msgs if m.estimated]
        assert len({m.id for m in flagged}) == 3 * len(both)


async def test_a_gap_longer_than_the_maximum_is_reported_not_filled(env):
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        collector = env.collector(url, max_gap_hours=2)
        await collector.take_reading(T0)
        outcome = await collector.take_reading(T0 + 4 * H)  # 3 missing hours > 2
        await collector.cf.close()
    assert outcome.estimated == 0
    assert any("exceeds the maximum of 2" in e for e in outcome.errors)
    assert await env.pool.fetchval("SELECT count(*) FROM measurements WHERE estimated") == 0


async def test_token_expiry_in_the_middle_of_a_paginated_reading_is_handled(env):
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


async def test_two_periodic_readings_in_one_hour_persist_one(env, database):
    hour = T0 + 7 * H
    other_pool = await create_pool(database.dsn("collector"), "collector", max_size=2)
    try:
        async with running_sim(SimConfig(**WORLD)) as (url, _):
            a = env.collector(url)
            b = Collector(other_pool, CFClient(url, url, "billing-collector", "sim-secret", per_page=25), env.publisher, env.topic, sim_time=True)
            results = await asyncio.gather(a.take_reading(hour), b.take_reading(hour))
            again = await a.take_reading(hour, kind="manual")
            await a.cf.close()
            await b.cf.close()
    finally:
        await other_pool.close()
    assert sorted(r.status for r in results) == ["exists", "taken"]
    assert again.status == "exists"
    assert await env.pool.fetchval("SELECT count(*) FROM readings WHERE hour = $1", hour) == 1
    n = await env.pool.fetchval("SELECT count(*) FROM measurements WHERE hour = $1", hour)
    assert n == len(Foundation(**WORLD).expected_usage(hour))


async def test_a_manual_reading_through_the_internal_endpoint_is_a_noop_in_a_taken_hour(infra, database, topic_prefix):
    import httpx

    from services.collector.app import create_app
    from services.collector.settings import CollectorSettings

    hour = datetime(2026, 10, 2, 3, tzinfo=UTC)
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        settings = CollectorSettings(
            database_url=database.dsn("collector"), kafka_bootstrap_servers=infra.kafka, topic_prefix=topic_prefix,
            cf_api_url=url, uaa_url=url, schedule_enabled=False, sim_time_header=True, per_page=50,
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector") as c:
                first = await c.post("/internal/readings", json={"hour": hour.isoformat()})
                again = await c.post("/internal/readings", json={"hour": hour.isoformat()})
                bad = await c.post("/internal/readings", json={"hour": "yesterday"})
                future = await c.post("/internal/readings", json={"hour": "2999-01-01T00:00:00Z"})
                listed = await c.get("/internal/readings", params={"from": "2026-10-02T00:00:00Z", "to": "2026-10-03T00:00:00Z"})
    assert first.status_code == 201 and first.json()["status"] == "taken"
    assert first.json()["measurements"] == len(Foundation(**WORLD).expected_usage(hour))
    assert again.status_code == 200 and again.json()["status"] == "exists" and "nothing was done" in again.json()["detail"]
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert future.status_code == 422
    assert [r["hour"] for r in listed.json()["items"]] == [hour.isoformat()]
