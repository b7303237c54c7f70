"""The pricer as a running service on the real broker and database: reading batches in (and v1 single
readings), charge batches out, bad messages and bad items to the DLQ, a measurement counted once however it
arrives, two instances sharing one consumer group, and what a crash leaves behind (a re-priced batch in the
outbox, readings stored but not published) published on the next start, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from starlette.applications import Starlette

from services.pricer.app import MIGRATIONS, create_app
from services.pricer.schemas import PriceIn
from services.pricer.service import Pricer
from services.pricer.settings import PricerSettings
from shared import ids
from shared.batches import (
    Charges,
    Item,
    Measurements,
    decode_charges,
    encode_measurements,
    measurement_batches,
    read_as_written,
    shard_key,
    shard_of,
)
from shared.contracts import MeasurementsTaken, MeasurementTaken
from shared.db import create_pool, migrate
from shared.kafka import Outgoing, Publisher, Received
from shared.topics import CHARGES, READINGS, READINGS_V1, dlq
from tests.support.documents import unpacked
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 5, 4, 10, tzinfo=UTC)
APP_PRICE = (1_000_000, 730 * 1024)
PRICE = {
    "meter": "cfapps", "resource_kind": "", "unit_of_measure": "MB-hour",
    "microcredits_per_unit": APP_PRICE[0], "unit": APP_PRICE[1], "valid_from": "2026-01-01T00:00:00Z",
}
Key = tuple[datetime, str, str]  # a measurement: reading hour, meter, resource


def settings(database: Any, infra: Any, topic_prefix: str, issuer: LocalIssuer, **extra: Any) -> PricerSettings:
    return PricerSettings(
        oidc_issuer=issuer.url, database_url=database.dsn("pricer"), kafka_bootstrap_servers=infra.kafka,
        topic_prefix=topic_prefix,
        port=8082, batch_timeout_ms=50, maintenance_interval_seconds=3600, **extra,
    )


def reading(
    readings: Iterable[tuple[str, int]], hour: datetime = HOUR, meter: str = "cfapps", org: str = "org-a",
    kind: str = "", max_items: int = 5000,
) -> list[Measurements]:
    """(resource, value) pairs of one hour and meter as the collector batches them."""
    items = [Item(r, f"name of {r}", org, f"Org {org}", "space-1", "dev", kind, v) for r, v in readings]
    unit = "MB" if meter == "cfapps" else "instance"
    return measurement_batches(hour, meter, unit, items, reading_id=ids.reading_id(hour),
                               taken_at=hour + timedelta(hours=1), max_items=max_items)


def outgoing(batches: Iterable[Measurements]) -> list[Outgoing]:
    return [Outgoing(shard_key(b.shard), encode_measurements(b)) for b in batches]


def v1(resource: str, value: int, hour: datetime = HOUR, meter: str = "cfapps", org: str = "org-a") -> MeasurementTaken:
    """The measurement ``reading`` makes, on v1 (without its names: labels, not content)."""
    return MeasurementTaken(
        id=ids.measurement_id(hour, meter, resource), reading_id=ids.reading_id(hour), reading_hour=hour,
        meter=meter, resource_id=resource, org_id=org, space_id="space-1", value=value,
        unit="MB" if meter == "cfapps" else "instance", taken_at=hour + timedelta(hours=1),
    )


def v1_out(ms: Iterable[MeasurementTaken]) -> list[Outgoing]:
    return [Outgoing(m.resource_id.encode(), m.model_dump_json().encode()) for m in ms]


@contextlib.asynccontextmanager
async def publisher(kafka: str) -> AsyncIterator[Publisher]:
    pub = Publisher(kafka, client_id="pricer-test-producer")
    await pub.start()
    try:
        yield pub
    finally:
        await pub.stop()


@contextlib.asynccontextmanager
async def running(app: Starlette, issuer: LocalIssuer) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pricer", headers=issuer.bearer()) as http:
            yield http


async def read_topic(
    kafka: str, topic: str, done: Callable[[list[ConsumerRecord]], bool], timeout: float = 60
) -> list[ConsumerRecord]:
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


def charges_of(records: Iterable[ConsumerRecord]) -> list[tuple[ConsumerRecord, Charges]]:
    out = []
    for r in records:
        decoded = decode_charges(r.value)
        assert decoded.rejected == [] and decoded.message is not None, decoded.rejected
        out.append((r, decoded.message))
    return out


def items(c: Charges) -> dict[Key, tuple[int, Any, Fraction]]:
    """(revision, price id or None, exact amount) per measurement of a charges batch."""
    return {
        (c.reading_hour, c.meter, rid): (
            c.revision[i], None if c.price[i] < 0 else c.prices[c.price[i]].id,
            Fraction(c.amount_numerator[i], c.amount_denominator[i]),
        )
        for i, rid in enumerate(c.resource_id)
    }


def measurements_in(records: Iterable[ConsumerRecord]) -> set[Key]:
    return {k for _, c in charges_of(records) for k in items(c)}


async def stored_items(pool: Any) -> list[tuple[Key, int]]:
    """Every (measurement, revision) the pricer stored, with repeats if any."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT message FROM charge_batches")
        messages = await unpacked(conn, "pricer", [r["message"] for r in rows])
    out: list[tuple[Key, int]] = []
    for message in messages:
        c = decode_charges(message).message
        assert c is not None
        out.extend((k, v[0]) for k, v in items(c).items())
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


def same_shard(n: int, prefix: str) -> list[str]:
    """``n`` resource ids of one shard."""
    names = [f"{prefix}-{i}" for i in range(30 * n)]
    shard = shard_of(names[0])
    return [r for r in names if shard_of(r) == shard][:n]


def with_bad_item(b: Measurements, position: int, column: str, value: Any) -> bytes:
    doc = json.loads(encode_measurements(b))
    doc[column][position] = value
    return json.dumps(doc).encode()


async def test_batches_become_charges_and_bad_messages_and_bad_items_go_to_the_dlq(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    app = create_app(settings(database, infra, topic_prefix, issuer))
    topic = topic_prefix + READINGS
    apps = reading((f"app-{i}", 512 * (i + 1)) for i in range(40))
    services = reading([("svc-1", 1), ("svc-2", 3)], meter="cfservices", org="org-b", kind="plan")
    # A batch with malformed items (a negative value; a resource of another shard): the good items go on,
    # each bad one to the DLQ alone.
    (mixed,) = reading([(r, 7) for r in same_shard(4, "mixed")], hour=HOUR + timedelta(hours=1))
    stranger = next(r for r in (f"stray-{i}" for i in range(100)) if shard_of(r) != mixed.shard)
    mixed_doc = json.loads(with_bad_item(mixed, 1, "value", -1))
    mixed_doc["resource_id"][2] = stranger
    mixed_raw = json.dumps(mixed_doc).encode()
    # A batch with an item whose charge would exceed 2**62: refused by the pricer itself, item by item.
    (huge,) = reading([("big-1", 2**30)], meter="cfbig")
    half_hour = reading([("app-half", 1)], hour=HOUR + timedelta(minutes=30))[0]
    whole_bad = [
        b"{not json",
        encode_measurements(apps[0]).replace(b'"schema_version":2', b'"schema_version":1'),
        encode_measurements(apps[1])[:-1] + b',"surprise":1}',
        encode_measurements(half_hour),
    ]
    good = [*apps, *services]
    async with running(app, issuer) as http:
        assert (await http.post("/internal/prices", json=PRICE)).status_code == 201
        big = {**PRICE, "meter": "cfbig", "microcredits_per_unit": 2**40, "unit": 1}
        assert (await http.post("/internal/prices", json=big)).status_code == 201
        price_id = (await http.get("/internal/prices", params={"meter": "cfapps"})).json()["items"][0]["id"]
        async with publisher(infra.kafka) as pub:
            await pub.publish(topic, outgoing(good))
            await pub.publish(topic, [Outgoing(b"shard-0", raw) for raw in whole_bad])
            await pub.publish(topic, [Outgoing(shard_key(mixed.shard), mixed_raw), *outgoing([huge])])
        expected = {(b.reading_hour, b.meter, r) for b in good for r in b.resource_id}
        mixed_good = {(mixed.reading_hour, "cfapps", r) for i, r in enumerate(mixed.resource_id) if i in (0, 3)}
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES,
                                   lambda got: measurements_in(got) >= expected | mixed_good)
        dead = await read_topic(infra.kafka, dlq(topic), lambda got: len(got) >= 7)
        metrics = (await http.get("/metrics")).text

        # A redelivery (the same batches again) publishes the stored charge batches again, byte for byte.
        async with publisher(infra.kafka) as pub:
            await pub.publish(topic, outgoing(good))
        first_good = [r for r, c in charges_of(charges) if set(items(c)) <= expected]
        again = await read_topic(infra.kafka, topic_prefix + CHARGES,
                                 lambda got: len(got) >= len(charges) + len(first_good))
        stored = await stored_items(app.state.runtime.pool)

    parsed = charges_of(charges)
    got: dict[Key, tuple[int, Any, Fraction]] = {}
    for record, c in parsed:
        assert record.key == b"shard-%d" % c.shard and record.partition == c.shard % 4
        for k, v in items(c).items():
            assert got.setdefault(k, v) == v
    assert set(got) == expected | mixed_good
    for b in apps:
        for r, value in zip(b.resource_id, b.value, strict=True):
            assert got[(HOUR, "cfapps", r)] == (1, uuid.UUID(price_id), Fraction(value * APP_PRICE[0], APP_PRICE[1]))
    assert got[(HOUR, "cfservices", "svc-1")] == got[(HOUR, "cfservices", "svc-2")] == (1, None, 0)
    assert sorted(stored) == sorted((k, 1) for k in got)  # one revision 1 per measurement, nothing else

    # Redelivered: the same bytes as the first time, no new batch stored.
    assert len(again) == len(charges) + len(first_good)
    later = [r.value for r in again if (r.partition, r.offset) not in {(c.partition, c.offset) for c in charges}]
    assert sorted(later) == sorted(r.value for r in first_good)

    headers = [dict(r.headers) for r in dead]
    for h in headers:
        assert h["dlq.topic"] == topic.encode() and h["dlq.group"] == (topic_prefix + "pricer").encode()
        assert int(h["dlq.partition"]) >= 0 and int(h["dlq.offset"]) >= 0
    whole = {r.value: dict(r.headers)["dlq.reason"].decode() for r in dead if "dlq.items" not in dict(r.headers)}
    assert set(whole) == set(whole_bad)  # the original bytes
    assert "json" in whole[whole_bad[0]].lower()
    assert "schema_version" in whole[whole_bad[1]]
    assert "surprise" in whole[whole_bad[2]]
    assert "whole UTC hour" in whole[whole_bad[3]]
    by_item = {int(dict(r.headers)["dlq.items"]): (dict(r.headers), r.value)
               for r in dead if "dlq.items" in dict(r.headers) and json.loads(r.value)["meter"] == "cfapps"}
    assert set(by_item) == {1, 2}
    for position, (_, value) in by_item.items():
        # Its value is a batch of just that item: the envelope of its batch, that one item.
        split = read_as_written(value, Measurements)
        assert (split.id, split.reading_hour, split.shard) == (mixed.id, mixed.reading_hour, mixed.shard)
        assert split.resource_id == [mixed_doc["resource_id"][position]]
        assert split.value == [mixed_doc["value"][position]]
    assert by_item[1][0]["dlq.reason"] == b"item 1: value must be an integer from 0 to 2**62"
    assert by_item[2][0]["dlq.reason"].decode() == f"item 2: resource {stranger} belongs to shard " \
        f"{shard_of(stranger)}, not {mixed.shard}"
    alone = MeasurementsTaken.model_validate_json(by_item[2][1])  # a valid contract batch of that one item
    assert alone.resource_id == [stranger] and alone.value == [7] and alone.id == mixed.id
    (too_big,) = [(dict(r.headers), r.value) for r in dead if "dlq.items" in dict(r.headers)
                  and json.loads(r.value)["meter"] == "cfbig"]
    assert too_big[0]["dlq.items"] == b"0" and "exceeds 2**62" in too_big[0]["dlq.reason"].decode()
    assert too_big[1] == encode_measurements(huge)  # valid: only the pricer refuses it, as it came
    assert 'billing_pricer_charges_total{origin="readings",status="priced"}' in metrics
    assert "billing_pricer_unpriced_charges" in metrics


async def test_v1_readings_are_still_priced_exactly_and_bad_ones_go_to_their_dlq(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    app = create_app(settings(database, infra, topic_prefix, issuer))
    topic = topic_prefix + READINGS_V1
    good = [v1(f"app-{i}", 512 * (i + 1)) for i in range(5)]
    unpriced = v1("svc-1", 1, meter="cfservices", org="org-b")
    bad = [
        b"{not json",
        v1("app-neg", 1).model_dump_json().encode().replace(b'"value":1,', b'"value":-1,'),
        v1("app-v2", 1).model_dump_json().encode().replace(b'"schema_version":1', b'"schema_version":2'),
        v1("app-id", 1).model_copy(update={"id": ids.measurement_id(HOUR, "cfapps", "x")}).model_dump_json().encode(),
        v1("app-half", 1).model_copy(update={"reading_hour": HOUR + timedelta(minutes=30)}).model_dump_json().encode(),
        # reading hours outside [2000-01-01, now + a day]: never priced, whatever their ids
        v1("app-2100", 1, hour=datetime(2100, 1, 1, tzinfo=UTC)).model_dump_json().encode(),
        v1("app-1999", 1, hour=datetime(1999, 12, 31, 23, tzinfo=UTC)).model_dump_json().encode(),
    ]
    async with running(app, issuer) as http:
        assert (await http.post("/internal/prices", json=PRICE)).status_code == 201
        price_id = uuid.UUID((await http.get("/internal/prices")).json()["items"][0]["id"])
        async with publisher(infra.kafka) as pub:
            # One key, so one partition and one batch mixing good and bad messages, in this order.
            def raw(ms: list[MeasurementTaken]) -> list[bytes]:
                return [o.value for o in v1_out(ms)]

            values = [*raw(good[:1]), bad[0], *raw(good[1:3]), *bad[1:3], *raw([unpriced]), *bad[3:], *raw(good[3:])]
            await pub.publish(topic, [Outgoing(b"same-key", v) for v in values])
        expected = {(m.reading_hour, m.meter, m.resource_id) for m in [*good, unpriced]}
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: measurements_in(got) >= expected)
        dead = await read_topic(infra.kafka, dlq(topic), lambda got: len(got) >= len(bad))
        stored = await stored_items(app.state.runtime.pool)

    got = {k: v for _, c in charges_of(charges) for k, v in items(c).items()}
    assert set(got) == expected
    for m in good:
        assert got[(HOUR, "cfapps", m.resource_id)] == (1, price_id, Fraction(m.value * APP_PRICE[0], APP_PRICE[1]))
    assert got[(HOUR, "cfservices", "svc-1")] == (1, None, 0)
    assert sorted(stored) == sorted((k, 1) for k in expected)
    assert [r.value for r in dead] == bad  # the original bytes, in order
    reasons = [dict(r.headers)["dlq.reason"].decode() for r in dead]
    assert "json" in reasons[0].lower()
    assert "value" in reasons[1]
    assert "schema_version" in reasons[2]
    assert "measurement_id" in reasons[3]
    assert "whole UTC hour" in reasons[4]
    assert reasons[5].startswith("reading_hour 2100-01-01T00:00:00Z is later than the pricer's clock plus 1 day")
    assert reasons[6] == "reading_hour 1999-12-31T23:00:00Z is before 2000-01-01T00:00:00Z"
    assert all("dlq.items" not in dict(r.headers) for r in dead)


async def test_a_measurement_counts_once_however_it_arrives(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    """Twice in one batch, in two batches, re-batched into other parts, once on v1 and once on v2 (either
    order): exactly one charge revision 1 is stored, and every message carrying it is the same bytes."""
    app = create_app(settings(database, infra, topic_prefix, issuer))
    h1, h2 = HOUR, HOUR + timedelta(hours=1)
    names = same_shard(6, "once") + [f"other-{i}" for i in range(6)]
    values = {r: 512 * (n + 1) for n, r in enumerate(names)}
    expected = {(h, "cfapps", r) for h in (h1, h2) for r in names}

    def doubled(b: Measurements) -> bytes:
        doc = json.loads(encode_measurements(b))
        for column in ("resource_id", "resource_name", "org", "space", "kind", "value", "estimated"):
            doc[column] = doc[column] + doc[column]
        return json.dumps(doc).encode()

    async with running(app, issuer) as http:
        assert (await http.post("/internal/prices", json=PRICE)).status_code == 201
        pool = app.state.runtime.pool

        def stored_hour(hour: datetime) -> Callable[[], Any]:
            async def check() -> bool:
                want = {k for k in expected if k[0] == hour}
                return {k for k, _ in await stored_items(pool) if k[0] == hour} == want

            return check

        async with publisher(infra.kafka) as pub:
            # Hour 1: v2 first, every item twice in its batch, then re-batched in parts of 2, then on v1.
            first = reading([(r, values[r]) for r in names], hour=h1)
            await pub.publish(topic_prefix + READINGS, [Outgoing(shard_key(b.shard), doubled(b)) for b in first])
            await wait_for(stored_hour(h1))
            await pub.publish(topic_prefix + READINGS, outgoing(reading([(r, values[r]) for r in names], hour=h1,
                                                                        max_items=2)))
            await pub.publish(topic_prefix + READINGS_V1, v1_out(v1(r, values[r], hour=h1) for r in names))
            # Hour 2: v1 first, then v2 twice, grouped differently.
            await pub.publish(topic_prefix + READINGS_V1, v1_out(v1(r, values[r], hour=h2) for r in names))
            await wait_for(stored_hour(h2))
            await pub.publish(topic_prefix + READINGS, outgoing(reading([(r, values[r]) for r in names], hour=h2)))
            await pub.publish(topic_prefix + READINGS, outgoing(reading([(r, values[r]) for r in names[::-1]],
                                                                        hour=h2, max_items=4)))
        rows_before = await pool.fetchval("SELECT count(*) FROM charge_batches")

        async def all_answered() -> bool:
            # Every delivery of hour 1 and 2 was answered with charges (the first ones, then the copies).
            lag = [s.consumer.highwater(tp) - (await s.consumer.committed(tp) or 0)
                   for s in app.state.runtime.publisher.subscriptions if s.consumer is not None
                   for tp in s.consumer.assignment()]
            return sum(lag) == 0

        await wait_for(all_answered)
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: measurements_in(got) >= expected)
        stored = await stored_items(pool)
        assert await pool.fetchval("SELECT count(*) FROM charge_batches") == rows_before

    assert sorted(stored) == sorted((k, 1) for k in expected)
    carried: dict[Key, set[bytes]] = {}
    for record, c in charges_of(charges):
        for k, v in items(c).items():
            assert v == (1, v[1], Fraction(values[k[2]] * APP_PRICE[0], APP_PRICE[1]))
            carried.setdefault(k, set()).add(record.value)
    assert set(carried) == expected
    assert all(len(messages) == 1 for messages in carried.values()), "a measurement was published twice as new"


async def test_a_measurement_stored_with_other_content_is_refused_and_the_stored_copy_kept(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    """Identity means content: a copy of a stored measurement with the same content (even under other
    names, which are labels) is a redelivery; with another value, org or space it is refused to the DLQ
    with a reason naming the stored copy, on v2 and on v1, and what was stored (and published) stays."""
    app = create_app(settings(database, infra, topic_prefix, issuer))
    names = same_shard(4, "conflict")
    values = {r: 1024 * (n + 1) for n, r in enumerate(names)}
    (original,) = reading([(r, values[r]) for r in names])
    mids = {r: ids.measurement_id(HOUR, "cfapps", r) for r in names}

    def altered(changes: dict[int, tuple[str, Any]], names_too: bool = False) -> bytes:
        doc = json.loads(encode_measurements(original))
        if names_too:
            doc["resource_name"] = [f"renamed {r}" for r in doc["resource_id"]]
            doc["orgs"] = [{**o, "name": "Renamed org"} for o in doc["orgs"]]
        for position, (column, value) in changes.items():
            if column == "org":
                doc["orgs"].append({"id": value, "name": ""})
                value = len(doc["orgs"]) - 1
            doc[column][position] = value
        return json.dumps(doc).encode()

    conflicting = altered({1: ("value", values[names[1]] + 1), 2: ("org", "org-z")})
    async with running(app, issuer) as http:
        assert (await http.post("/internal/prices", json=PRICE)).status_code == 201
        conflicts_before = conflicts_counted((await http.get("/metrics")).text)
        pool = app.state.runtime.pool
        async with publisher(infra.kafka) as pub:
            await pub.publish(topic_prefix + READINGS, outgoing([original]))
            first = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: len(got) >= 1)
            stored_before = await stored_items(pool)
            batches_before = await pool.fetch("SELECT shard, seq FROM charge_batches ORDER BY 1, 2")
            # The same measurements under other names; then two of them with other content, on v2 and v1.
            await pub.publish(topic_prefix + READINGS, [Outgoing(shard_key(original.shard), altered({}, True))])
            await pub.publish(topic_prefix + READINGS, [Outgoing(shard_key(original.shard), conflicting)])
            await pub.publish(topic_prefix + READINGS_V1, v1_out([v1(names[3], values[names[3]] * 2)]))
            dead = await read_topic(infra.kafka, dlq(topic_prefix + READINGS), lambda got: len(got) >= 2)
            dead_v1 = await read_topic(infra.kafka, dlq(topic_prefix + READINGS_V1), lambda got: len(got) >= 1)

        async def all_answered() -> bool:
            lag = [s.consumer.highwater(tp) - (await s.consumer.committed(tp) or 0)
                   for s in app.state.runtime.publisher.subscriptions if s.consumer is not None
                   for tp in s.consumer.assignment()]
            return sum(lag) == 0

        await wait_for(all_answered)
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: len(got) >= 4, timeout=5)
        assert await stored_items(pool) == stored_before
        assert await pool.fetch("SELECT shard, seq FROM charge_batches ORDER BY 1, 2") == batches_before
        metrics = (await http.get("/metrics")).text

    (stored_batch,) = charges_of(first)
    # Published again, byte for byte, for the renamed copy and for the two unchanged items of the conflicting
    # message; never anything else.
    assert [r.value for r in charges] == [first[0].value] * 3
    assert len(dead) == 2 and len(dead_v1) == 1  # nothing more: the renamed copy went nowhere
    by_item = {int(dict(r.headers)["dlq.items"]): r for r in dead}
    assert set(by_item) == {1, 2}
    for position, fact in ((1, f"value {values[names[1]] + 1} (stored: {values[names[1]]})"),
                           (2, "org 'org-z' (stored: 'org-a')")):
        reason = dict(by_item[position].headers)["dlq.reason"].decode()
        rid = names[position]
        assert reason == (
            f"conflict: measurement {mids[rid]} (2026-05-04T10:00:00Z, cfapps, resource {rid}) is stored with other "
            f"content: {fact}; the stored copy is kept (charges batch {stored_batch[1].id}, charge "
            f"{ids.charge_id(mids[rid], 1)} at revision 1)"
        )
        alone = read_as_written(by_item[position].value, Measurements)
        assert alone.resource_id == [rid]
    v1_reason = dict(dead_v1[0].headers)["dlq.reason"].decode()
    assert v1_reason.startswith(f"conflict: measurement {mids[names[3]]} ")
    assert f"value {values[names[3]] * 2} (stored: {values[names[3]]})" in v1_reason
    assert json.loads(dead_v1[0].value)["value"] == values[names[3]] * 2  # the v1 message as it came
    # The counter is the process's: other tests in this run may have counted before this one.
    assert conflicts_counted(metrics) - conflicts_before == 3


async def test_two_instances_in_one_group_price_every_measurement_exactly_once(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    partitions = await topic_ready(infra.kafka, topic_prefix + READINGS)
    await topic_ready(infra.kafka, topic_prefix + READINGS_V1)
    assert partitions >= 2
    first = create_app(settings(database, infra, topic_prefix, issuer, batch_max_records=20))
    second = create_app(settings(database, infra, topic_prefix, issuer, batch_max_records=20))
    hours = [HOUR + timedelta(hours=h) for h in range(5)]
    names = [f"app-{i}" for i in range(300)]
    expected = {(h, "cfapps", r) for h in hours for r in names}
    value = {r: 64 * (n + 1) for n, r in enumerate(names)}
    async with running(first, issuer) as http, running(second, issuer):
        assert (await http.post("/internal/prices", json=PRICE)).status_code == 201
        streams = [first.state.runtime.publisher, second.state.runtime.publisher]

        async def both_assigned() -> bool:
            consumers = [sub.consumer for s in streams for sub in s.broker.subscribers
                         if sub.consumer is not None and topic_prefix + READINGS in sub.consumer.subscription()]
            parts = [c.assignment() for c in consumers]
            return (len(parts) == 2 and all(parts) and not (parts[0] & parts[1])
                    and len(parts[0] | parts[1]) == partitions)

        await wait_for(both_assigned)
        async with publisher(infra.kafka) as pub:
            # Every measurement at least twice (a producer retry, a collector re-send, a v1 producer), grouped
            # differently each time: still one charge each.
            for h in hours:
                await pub.publish(topic_prefix + READINGS, outgoing(reading([(r, value[r]) for r in names], hour=h)))
            for h in hours:
                await pub.publish(topic_prefix + READINGS, outgoing(reading([(r, value[r]) for r in names[::3]],
                                                                            hour=h, max_items=3)))
                await pub.publish(topic_prefix + READINGS_V1, v1_out(v1(r, value[r], hour=h) for r in names[1::3]))
        pool = first.state.runtime.pool

        async def all_priced() -> bool:
            return {k for k, _ in await stored_items(pool)} >= expected

        await wait_for(all_priced)
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES, lambda got: measurements_in(got) >= expected)
        await asyncio.sleep(1)  # let any straggling duplicate batch finish before counting
        stored = await stored_items(pool)
        work = [sum(sub.batches for sub in s.subscriptions) for s in streams]

    assert sorted(stored) == sorted((k, 1) for k in expected)
    assert all(n > 0 for n in work), work  # both instances did work
    carried: dict[Key, set[bytes]] = {}
    for record, c in charges_of(charges):
        for k, v in items(c).items():
            assert v[0] == 1 and v[2] == Fraction(value[k[2]] * APP_PRICE[0], APP_PRICE[1])
            carried.setdefault(k, set()).add(record.value)
    assert set(carried) == expected
    assert all(len(messages) == 1 for messages in carried.values())


class CrashingStream:
    """A broker that dies on every publish: what a crash between the commit and the publish leaves."""

    async def publish(self, topic: str, messages: Sequence[Outgoing]) -> int:
        raise ConnectionResetError("killed between commit and publish")


async def test_what_a_crash_left_committed_but_unpublished_is_published_on_start(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    s = settings(database, infra, topic_prefix, issuer)
    app_readings = reading([("app-crashed", 2048)])
    svc_readings = reading([("svc-crashed", 3)], meter="cfservices", org="org-z")
    pool = await create_pool(database.dsn("pricer"), "pricer")
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "pricer", MIGRATIONS)
        crashed = Pricer(pool, CrashingStream(), topic_prefix + CHARGES)  # type: ignore[arg-type]
        app_price = PriceIn(meter="cfapps", unit_of_measure="MB-hour", microcredits_per_unit=5, unit=2,
                            valid_from=HOUR - timedelta(days=1))
        await crashed.add_price(app_price)
        # 1. A readings batch committed, then the process died before publishing and before committing
        #    offsets: the readings are still on the topic, the charges in the database.
        with pytest.raises(ConnectionResetError):
            await crashed.handle_readings([Received(b, shard_key(b.shard), 0, 0) for b in app_readings + svc_readings])
        # 2. A re-pricing committed (the outbox: a batch stored unpublished), then the process died.
        svc_price = PriceIn(meter="cfservices", unit_of_measure="instance-hour", microcredits_per_unit=1_000_000,
                            unit=730, valid_from=HOUR - timedelta(days=1))
        with pytest.raises(ConnectionResetError):
            await crashed.add_price(svc_price)
        async with pool.acquire() as conn:
            rows = await conn.fetch("""SELECT NOT EXISTS (SELECT FROM unpublished_batches u
                                      WHERE (u.reading_hour, u.meter, u.shard, u.seq)
                                          = (b.reading_hour, b.meter, b.shard, b.seq)) AS published,
                          message
                     FROM charge_batches b ORDER BY created_at, seq""")
            stored = set(await unpacked(conn, "pricer", [r["message"] for r in rows]))
    finally:
        await pool.close()
    assert [r["published"] for r in rows] == [True, True, False]
    async with publisher(infra.kafka) as pub:
        await pub.publish(topic_prefix + READINGS, outgoing(app_readings))

    app = create_app(s)
    async with running(app, issuer):
        app_key = (HOUR, "cfapps", "app-crashed")
        charges = await read_topic(infra.kafka, topic_prefix + CHARGES,
                                   lambda got: app_key in measurements_in(got) and len(got) >= 2)
        async with app.state.runtime.pool.acquire() as conn:
            after = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM charge_batches) AS stored,
                          (SELECT count(*) FROM unpublished_batches) AS outbox"""
            )
    # What is published is what was stored, byte for byte: the readings' charges priced when they were first
    # priced, not priced anew; the re-priced revision from the outbox.
    assert {r.value for r in charges} <= stored and len(charges) == 2
    got = {k: v for _, c in charges_of(charges) for k, v in items(c).items()}
    assert got[app_key][::2] == (1, Fraction(2048 * 5, 2))
    revision, price, amount = got[(HOUR, "cfservices", "svc-crashed")]
    assert (revision, amount) == (2, Fraction(3 * 1_000_000, 730)) and price is not None
    assert (after["stored"], after["outbox"]) == (3, 0)  # the outbox is empty: the re-priced batch went out


def conflicts_counted(metrics: str) -> float:
    """The value of the pricer's conflict counter in a /metrics text."""
    (line,) = [ln for ln in metrics.splitlines() if ln.startswith("billing_pricer_conflicting_measurements_total ")]
    return float(line.split()[1])
