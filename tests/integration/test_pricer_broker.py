"""The pricer as a running service on the real broker and database: readings in, charges out, bad
messages to the DLQ, two instances sharing one consumer group, and what a crash leaves behind
(committed but unpublished charges) published on the next start."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from starlette.applications import Starlette

from services.pricer import repository, service
from services.pricer.app import MIGRATIONS, create_app
from services.pricer.settings import PricerSettings
from shared import ids
from shared.clock import utcnow
from shared.contracts import ChargeComputed, MeasurementTaken
from shared.db import create_pool, migrate
from shared.kafka import Outgoing, Publisher, encode
from shared.topics import CHARGES, READINGS, dlq

pytestmark = pytest.mark.integration


HOUR = datetime(2026, 5, 4, 10, tzinfo=UTC)
PRICE = {
    "meter": "cfapps", "resource_kind": "", "unit_of_measure": "MB-hour",
    "microcredits_per_unit": 1_000_000, "unit": 730 * 1024, "valid_from": "2026-01-01T00:00:00Z",
}


def settings(database: Any, infra: Any, topic_prefix: str, **extra: Any) -> PricerSettings:
    return PricerSettings(
        database_url=database.dsn("pricer"), KAFKA_BOOTSTRAP_SERVERS=infra.kafka, KAFKA_TOPIC_PREFIX=topic_prefix,
        port=8082, batch_timeout_ms=50, maintenance_interval_seconds=3600, **extra,
    )


def measurement(resource: str, value: int, hour: datetime = HOUR, meter: str = "cfapps", org: str = "org-a") -> MeasurementTaken:
    return MeasurementTaken(
        id=ids.measurement_id(hour, meter, resource), reading_id=ids.reading_id(hour), reading_hour=hour,
        meter=meter, resource_id=resource, org_id=org, value=value, unit="MB", taken_at=hour + timedelta(hours=1),
    )


@contextlib.asynccontextmanager
async def publisher(kafka: str) -> AsyncIterator[Publisher]:
    pub = Publisher(kafka, client_id="pricer-test-producer")
    await pub.start()
    try:
        yield pub
    finally:
        await pub.stop()


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pricer") as http:
            yield http


async def read_topic(kafka: str, topic: str, done: Callable[[list[ConsumerRecord]], bool], timeout: float = 60) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[ConsumerRecord] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done(out) and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


async def topic_ready(kafka: str, topic: str) -> int:
    """Wait until every partition of a just-created topic has a leader in the broker's metadata (a
    consumer that joins earlier may be assigned none of them until its next metadata refresh);
    returns the number of partitions."""
    probe = AIOKafkaProducer(bootstrap_servers=kafka)
    await probe.start()
    try:
        for _ in range(300):
            await probe.client.force_metadata_update()
            every = probe.client.cluster.partitions_for_topic(topic) or set()
            if every and probe.client.cluster.available_partitions_for_topic(topic) == every:
                return len(every)
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {topic} has no metadata")
    finally:
        await probe.stop()


async def wait_for(predicate: Callable[[], Any], timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_readings_become_charges_and_bad_messages_go_to_the_dlq(infra, database, topic_prefix) -> None:
    app = create_app(settings(database, infra, topic_prefix))
    good = [measurement(f"app-{i}", 512 * (i + 1)) for i in range(5)]
    unpriced = measurement("svc-1", 1, meter="cfservices", org="org-b")
    bad = [
        b"{not json",
        encode(measurement("app-neg", 1)).replace(b'"value":1,', b'"value":-1,'),
        encode(measurement("app-v2", 1)).replace(b'"schema_version":1', b'"schema_version":2'),
        encode(measurement("app-id", 1).model_copy(update={"id": ids.measurement_id(HOUR, "cfapps", "other")})),
        encode(measurement("app-half", 1).model_copy(update={"reading_hour": HOUR + timedelta(minutes=30)})),
    ]
    async with running(app) as http:
        assert (await http.post("/internal/prices", json=PRICE)).status_code == 201
        price_id = (await http.get("/internal/prices")).json()["items"][0]["id"]
        async with publisher(infra.kafka) as pub:
            # One key, so one partition and one batch mixing good and bad messages.
            values = [encode(good[0]), bad[0], encode(good[1]), bad[1], bad[2], encode(good[2]), bad[3],
                      encode(unpriced), bad[4], encode(good[3]), encode(good[4])]
            await pub.publish(topic_prefix + READINGS, [Outgoing(b"same-key", v) for v in values])
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: len(got) >= 6)
        dead = await read_topic(infra.kafka, dlq(topic_prefix + READINGS), lambda got: len(got) >= 5)
        metrics = (await http.get("/metrics")).text

    parsed = {c.measurement_id: c for c in (ChargeComputed.model_validate_json(r.value) for r in charges)}
    assert set(parsed) == {m.id for m in [*good, unpriced]}
    for m in good:
        c = parsed[m.id]
        assert c.status == "priced" and str(c.price_id) == price_id and c.revision == 1
        assert Fraction(c.amount_numerator, c.amount_denominator) == Fraction(m.value * 1_000_000, 730 * 1024)
    assert parsed[unpriced.id].status == "unpriced"
    assert {r.key for r in charges} == {b"org-a", b"org-b"}  # keyed by org

    reasons = [dict(r.headers)["dlq.reason"].decode() for r in dead]
    assert [r.value for r in dead] == bad  # the original bytes, in order
    assert "json" in reasons[0].lower()
    assert "value" in reasons[1]
    assert "schema_version" in reasons[2]
    assert "measurement_id" in reasons[3]
    assert "whole UTC hour" in reasons[4]
    assert 'billing_pricer_charges_total{origin="readings",status="priced"}' in metrics
    assert "billing_pricer_unpriced_charges" in metrics


async def test_two_instances_in_one_group_price_every_measurement_exactly_once(infra, database, topic_prefix) -> None:
    partitions = await topic_ready(infra.kafka, topic_prefix + READINGS)
    assert partitions >= 2
    first = create_app(settings(database, infra, topic_prefix, batch_max_records=200))
    second = create_app(settings(database, infra, topic_prefix, batch_max_records=200))
    ms = [measurement(f"app-{i}", i, hour=HOUR + timedelta(hours=i % 5), org=f"org-{i % 40}") for i in range(3000)]
    async with running(first) as http, running(second):
        assert (await http.post("/internal/prices", json=PRICE)).status_code == 201
        consumers = [first.state.runtime.consumers[0], second.state.runtime.consumers[0]]

        async def both_assigned() -> bool:
            parts = [c.assignment() for c in consumers]
            return all(parts) and not (parts[0] & parts[1]) and len(parts[0] | parts[1]) == partitions

        await wait_for(both_assigned)
        async with publisher(infra.kafka) as pub:
            # Every measurement twice (a producer retry, a collector re-send): still one charge each.
            for chunk in (ms[:1500], ms, ms[1500:]):
                await pub.publish(topic_prefix + READINGS, [Outgoing(m.resource_id.encode(), encode(m)) for m in chunk])
        pool = first.state.runtime.pool

        async def all_priced() -> bool:
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT count(*) FROM charges") >= len(ms)

        await wait_for(all_priced)
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: len({r.value for r in got}) >= len(ms))
        await asyncio.sleep(1)  # let any straggling duplicate batch finish before counting
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT measurement_id, revision, amount_numerator, amount_denominator, value FROM charges")
        batches = [c.batches for c in consumers]

    assert len(rows) == len(ms)
    assert {r["measurement_id"] for r in rows} == {m.id for m in ms}
    assert {r["revision"] for r in rows} == {1}
    for r in rows:
        assert Fraction(r["amount_numerator"], r["amount_denominator"]) == Fraction(r["value"] * 1_000_000, 730 * 1024)
    assert all(b > 0 for b in batches), batches  # both instances did work
    published = {ChargeComputed.model_validate_json(r.value).measurement_id for r in charges}
    assert published == {m.id for m in ms}
    # Redelivered duplicates publish the same charge (same id, same content), never a second revision.
    assert {ChargeComputed.model_validate_json(r.value).revision for r in charges} == {1}


async def test_what_a_crash_left_committed_but_unpublished_is_published_on_start(infra, database, topic_prefix) -> None:
    s = settings(database, infra, topic_prefix)
    # 1. A readings batch committed, then the process died before publishing and before committing
    #    offsets: the readings are still on the topic, the charges in the database.
    stored = measurement("app-crashed", 2048)
    # 2. A re-pricing committed (outbox row), then the process died before publishing it.
    repriced_m = measurement("svc-crashed", 3, meter="cfservices", org="org-z")
    pool = await create_pool(database.dsn("pricer"), "pricer")
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "pricer", MIGRATIONS)
            app_price = service.Price(ids.uuid7(), "cfapps", "", "MB-hour", 5, 2, HOUR - timedelta(days=1), None, utcnow())
            await repository.insert_price(conn, app_price)
            catalog = service.Catalog([app_price])
            earlier = utcnow() - timedelta(minutes=5)
            async with conn.transaction():
                batch = service.price_batch([stored, repriced_m], catalog, earlier)
                assert await repository.store_charges(conn, batch.rows, batch.unpriced) == (2, 1)
            svc_price = service.Price(ids.uuid7(), "cfservices", "", "instance-hour", 1_000_000, 730, HOUR - timedelta(days=1), None, utcnow())
            await repository.insert_price(conn, svc_price)
            async with conn.transaction():
                (row,) = await repository.covered_unpriced(conn, None, 10)
                again = service.reprice_document(orjson.loads(row["charge"]), row["reading_hour"], service.Catalog([svc_price]), earlier)
                assert again is not None
                await repository.store_repriced(conn, [again.row], [(again.row[1], again.row[2], again.org_id, again.payload)])
    finally:
        await pool.close()
    async with publisher(infra.kafka) as pub:
        await pub.publish(topic_prefix + READINGS, [Outgoing(stored.resource_id.encode(), encode(stored))])

    app = create_app(s)
    async with running(app):
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: len(got) >= 2)
        async with app.state.runtime.pool.acquire() as conn:
            outbox = await conn.fetchval("SELECT count(*) FROM charge_outbox")
            revisions = await conn.fetchval("SELECT count(*) FROM charges")
    parsed = {c.measurement_id: c for c in (ChargeComputed.model_validate_json(r.value) for r in charges)}
    assert set(parsed) == {stored.id, repriced_m.id}
    # The stored revision is what gets published, priced when it was first priced — not priced anew.
    assert parsed[stored.id].revision == 1 and parsed[stored.id].priced_at == earlier
    assert Fraction(parsed[stored.id].amount_numerator, parsed[stored.id].amount_denominator) == Fraction(2048 * 5, 2)
    assert parsed[repriced_m.id].revision == 2 and parsed[repriced_m.id].status == "priced"
    assert parsed[repriced_m.id].price_id == svc_price.id
    assert outbox == 0 and revisions == 3
