"""The shared Kafka helpers against a real broker: the idempotent producer, and a batch consumer that
dead-letters what it cannot process and keeps going."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer

from shared import ids
from shared.contracts import MeasurementTaken
from shared.kafka import BatchConsumer, Outgoing, Publisher, Received, encode
from shared.wire import Measurement, decoder_for

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 10, 1, 5, tzinfo=UTC)


def measurement(resource: str, value: int = 256) -> MeasurementTaken:
    return MeasurementTaken(
        id=ids.measurement_id(HOUR, "cfapps", resource),
        reading_id=ids.reading_id(HOUR),
        reading_hour=HOUR,
        meter="cfapps",
        resource_id=resource,
        value=value,
        unit="MB",
        taken_at=HOUR,
    )


async def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 20) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


async def test_publisher_is_idempotent_with_acks_all(infra, make_topic):
    topic = await make_topic()
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    try:
        m = measurement("app-1")
        sent = await pub.publish(topic, [Outgoing(key=b"app-1", value=encode(m))])
        assert sent == 1
        # aiokafka keeps these private: acks=all is -1, and an idempotent producer got a producer id.
        producer = pub._producer
        assert producer._sender._acks == -1
        assert producer._txn_manager is not None and producer._txn_manager.producer_id >= 0
    finally:
        await pub.stop()
    records = await read_all(infra.kafka, topic, 1)
    assert len(records) == 1
    assert records[0].key == b"app-1"
    assert MeasurementTaken.model_validate_json(records[0].value) == m


async def test_a_key_goes_to_its_murmur2_partition_in_each_topic_whatever_their_partition_counts(infra, make_topic):
    """One publisher, the same keys, two topics of 3 and 5 partitions: each record lands where every Kafka
    client would put it in that topic (murmur2 of the key modulo the topic's partition count)."""
    from aiokafka.partitioner import murmur2 as reference_murmur2

    small, large = await make_topic(partitions=3), await make_topic(partitions=5)
    keys = [f"org-{i}".encode() for i in range(40)]
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    try:
        for topic in (small, large, small):
            await pub.publish(topic, [Outgoing(k, encode(measurement(k.decode()))) for k in keys])
    finally:
        await pub.stop()
    for topic, n, copies in ((small, 3, 2), (large, 5, 1)):
        records = await read_all(infra.kafka, topic, copies * len(keys))
        assert len(records) == copies * len(keys)
        assert all(r.partition == (reference_murmur2(r.key) & 0x7FFFFFFF) % n for r in records)
        assert {r.partition for r in records} == set(range(n))


async def test_malformed_messages_go_to_the_dlq_with_reason_and_consumer_keeps_going(infra, make_topic):
    topic = await make_topic()
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    handled: list[Measurement] = []

    async def handler(batch: list[Received[Measurement]]):
        handled.extend(r.message for r in batch)
        return None

    good_before, good_after = measurement("app-a"), measurement("app-b")
    negative = encode(measurement("app-c")).replace(b'"value":256', b'"value":-5')
    wrong_version = encode(measurement("app-d")).replace(b'"schema_version":1', b'"schema_version":2')
    consumer = BatchConsumer(
        topic=topic,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        bootstrap_servers=infra.kafka,
        model=MeasurementTaken,
        handler=handler,
        publisher=pub,
        max_records=100,
        timeout_ms=100,
    )
    await consumer.start()
    try:
        # All on one key, so one partition, in this order.
        await pub.publish(
            topic,
            [
                Outgoing(b"k", encode(good_before)),
                Outgoing(b"k", b"{not json"),
                Outgoing(b"k", negative),
                Outgoing(b"k", wrong_version),
                Outgoing(b"k", encode(good_after)),
            ],
        )
        dead = await read_all(infra.kafka, topic + ".dlq", 3)
        for _ in range(100):
            if len(handled) >= 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
        await pub.stop()

    # The handler gets the fast mirror (shared.wire) holding the contract's values.
    assert [MeasurementTaken(**msgspec.structs.asdict(m)) for m in handled] == [good_before, good_after]
    assert len(dead) == 3
    reasons = [dict(r.headers)["dlq.reason"].decode() for r in dead]
    assert "Invalid JSON" in reasons[0] or "json" in reasons[0].lower()
    assert "value" in reasons[1] and "greater than or equal to 0" in reasons[1]
    assert "schema_version" in reasons[2]
    assert [r.value for r in dead] == [b"{not json", negative, wrong_version]
    assert all(dict(r.headers)["dlq.topic"].decode() == topic for r in dead)


async def test_a_message_the_handler_cannot_process_is_isolated_and_dead_lettered(infra, make_topic):
    topic = await make_topic(partitions=1)
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    handled: list[str] = []

    async def handler(batch: list[Received[MeasurementTaken]]):
        if any(r.message.resource_id == "poison" for r in batch):
            raise ValueError("cannot process poison")
        handled.extend(r.message.resource_id for r in batch)
        return None

    consumer = BatchConsumer(
        topic=topic, group_id=f"g-{uuid.uuid4().hex[:8]}", bootstrap_servers=infra.kafka,
        model=MeasurementTaken, handler=handler, publisher=pub, timeout_ms=100,
    )
    await pub.publish(topic, [Outgoing(b"k", encode(measurement(r))) for r in ("a", "poison", "b")])
    await consumer.start()
    try:
        dead = await read_all(infra.kafka, topic + ".dlq", 1)
        for _ in range(100):
            if len(handled) >= 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
        await pub.stop()
    assert handled == ["a", "b"]
    assert len(dead) == 1
    assert "cannot process poison" in dict(dead[0].headers)["dlq.reason"].decode()


async def test_offsets_are_committed_only_after_the_handler_succeeds(infra, make_topic):
    """A consumer stopped while its handler keeps failing commits nothing: the next one re-reads all."""
    topic = await make_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    attempts = 0

    async def failing(batch):
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError("database is down")

    await pub.publish(topic, [Outgoing(b"k", encode(measurement(f"r{i}"))) for i in range(5)])
    first = BatchConsumer(topic=topic, group_id=group, bootstrap_servers=infra.kafka, model=MeasurementTaken,
                          handler=failing, publisher=pub, timeout_ms=100)
    await first.start()
    for _ in range(100):
        if attempts >= 2:
            break
        await asyncio.sleep(0.1)
    await first.stop()
    assert attempts >= 2

    seen: list[str] = []

    async def ok(batch):
        seen.extend(r.message.resource_id for r in batch)

    second = BatchConsumer(topic=topic, group_id=group, bootstrap_servers=infra.kafka, model=MeasurementTaken,
                           handler=ok, publisher=pub, timeout_ms=100)
    await second.start()
    try:
        for _ in range(150):
            if len(seen) >= 5:
                break
            await asyncio.sleep(0.1)
    finally:
        await second.stop()
        await pub.stop()
    assert seen == [f"r{i}" for i in range(5)]


async def test_stop_finishes_the_batch_in_hand_and_commits_it(infra, make_topic):
    """What SIGTERM does to a service: the batch being handled completes and is committed."""
    topic = await make_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    started, done = asyncio.Event(), []

    async def slow(batch):
        started.set()
        await asyncio.sleep(1.0)
        done.extend(r.message.resource_id for r in batch)

    await pub.publish(topic, [Outgoing(b"k", encode(measurement(f"r{i}"))) for i in range(3)])
    first = BatchConsumer(topic=topic, group_id=group, bootstrap_servers=infra.kafka, model=MeasurementTaken,
                          handler=slow, publisher=pub, timeout_ms=100)
    await first.start()
    await asyncio.wait_for(started.wait(), 20)
    await first.stop()  # while the handler sleeps
    assert done == ["r0", "r1", "r2"]

    again: list[str] = []

    async def record(batch):
        again.extend(r.message.resource_id for r in batch)

    await pub.publish(topic, [Outgoing(b"k", encode(measurement("after")))])
    second = BatchConsumer(topic=topic, group_id=group, bootstrap_servers=infra.kafka, model=MeasurementTaken,
                           handler=record, publisher=pub, timeout_ms=100)
    await second.start()
    try:
        for _ in range(100):
            if again:
                break
            await asyncio.sleep(0.1)
    finally:
        await second.stop()
        await pub.stop()
    assert again == ["after"]  # nothing of the first batch was read twice


async def test_group_lag_counts_what_a_group_has_not_committed(infra, make_topic):
    from shared.kafka import group_lag

    topic = await make_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    await pub.publish(topic, [Outgoing(f"k{i}".encode(), encode(measurement(f"r{i}"))) for i in range(7)])
    assert await group_lag(infra.kafka, group, topic) == 7
    seen: list[str] = []

    async def record(batch):
        seen.extend(r.message.resource_id for r in batch)

    consumer = BatchConsumer(topic=topic, group_id=group, bootstrap_servers=infra.kafka, model=MeasurementTaken,
                             handler=record, publisher=pub, timeout_ms=100)
    await consumer.start()
    try:
        for _ in range(100):
            if len(seen) >= 7 and await group_lag(infra.kafka, group, topic) == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
        await pub.stop()
    assert await group_lag(infra.kafka, group, topic) == 0
    with pytest.raises(LookupError):
        await group_lag(infra.kafka, group, "no.such.topic." + uuid.uuid4().hex)


async def test_a_batch_whose_partition_a_rebalance_took_does_not_stop_the_consumer(infra, make_topic):
    """A commit that meets a rebalance (the partition went to another member) is logged and the batch left
    to the new owner; the consumer loop itself keeps running. (It used to die computing the lag of the
    partition it no longer had, which left its other partitions unread until the group expelled it.)"""
    from aiokafka import ConsumerRecord, TopicPartition

    from shared.kafka import _Fetched

    topic = await make_topic(partitions=2)
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    handled: list[str] = []

    async def handler(batch: list[Received[Measurement]]):
        handled.extend(r.message.resource_id for r in batch)
        return None

    consumer = BatchConsumer(
        topic=topic, group_id=f"g-{uuid.uuid4().hex[:8]}", bootstrap_servers=infra.kafka,
        model=MeasurementTaken, handler=handler, publisher=pub, timeout_ms=100,
    )
    await consumer.start()
    try:
        for _ in range(100):
            if consumer.assignment():
                break
            await asyncio.sleep(0.1)
        gone = TopicPartition(topic, 5)  # not this member's
        value = encode(measurement("taken"))
        record = ConsumerRecord(topic, 5, 0, 0, 0, b"k", value, None, 1, len(value), [])
        fetched = _Fetched({gone: [record]}, [Received(decode(value), b"k", 5, 0)], [])
        async with consumer._lock:
            await consumer._process(fetched)
        await pub.publish(topic, [Outgoing(b"k", encode(measurement("after")))])
        for _ in range(100):
            if "after" in handled:
                break
            await asyncio.sleep(0.1)
        assert consumer.running
    finally:
        await consumer.stop()
        await pub.stop()
    assert handled == ["taken", "after"]


decode = decoder_for(MeasurementTaken)


async def test_a_batch_spans_many_fetch_chunks_in_offset_order(infra, make_topic):
    """The consumer takes a batch from the client a chunk at a time (so that decoding the next batch does
    not hold up the handler of this one): a batch still reaches ``max_records`` when that much is waiting,
    every message arrives once, each partition's in offset order, and everything is committed."""
    from shared.kafka import FETCH_CHUNK, group_lag

    topic = await make_topic(partitions=2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    total, max_records = 5 * FETCH_CHUNK + 17, 2 * FETCH_CHUNK + 3
    pub = Publisher(infra.kafka, client_id="test")
    await pub.start()
    await pub.publish(topic, [Outgoing(f"k{i % 7}".encode(), encode(measurement(f"r{i}"))) for i in range(total)])
    batches: list[list[tuple[int, int]]] = []

    async def record(batch: list[Received[Measurement]]):
        batches.append([(r.partition, r.offset) for r in batch])

    consumer = BatchConsumer(topic=topic, group_id=group, bootstrap_servers=infra.kafka, model=MeasurementTaken,
                             handler=record, publisher=pub, max_records=max_records, timeout_ms=100)
    await consumer.start()
    try:
        for _ in range(200):
            if sum(map(len, batches)) >= total and await group_lag(infra.kafka, group, topic) == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
        await pub.stop()
    seen = [po for batch in batches for po in batch]
    assert len(seen) == total and len(set(seen)) == total
    for partition in (0, 1):
        offsets = [o for p, o in seen if p == partition]
        assert offsets == list(range(len(offsets)))
    assert max(map(len, batches)) == max_records
    assert await group_lag(infra.kafka, group, topic) == 0
