"""The shared Kafka plumbing (shared/kafka.py, on FastStream) against a real broker: the idempotent producer
and its partitioner, and the batch subscribers: what cannot be decoded (a whole message, or one item of a
batch) goes to the DLQ with its reason; a message the handler keeps failing on is isolated; transient errors
are retried; offsets are committed only after the handler and the DLQ publish, never past a batch that
failed (nothing is skipped); a stop finishes and commits the batch in hand; a rebalance between two members
loses and repeats nothing; group_lag counts what a group has not committed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.partitioner import murmur2 as reference_murmur2
from pydantic import BaseModel

from shared import ids
from shared.batches import (
    BatchRejected,
    Item,
    Measurements,
    decode_measurements,
    encode_measurements,
    measurement_batches,
    shard_key,
    shard_of,
)
from shared.contracts import MeasurementsTaken, MeasurementTaken
from shared.kafka import Decoder, Outgoing, Publisher, Received, Stream, group_lag, model_decoder
from shared.wire import Measurement, decoder_for

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 10, 1, 5, tzinfo=UTC)
V1: Decoder = model_decoder(decoder_for(MeasurementTaken), MeasurementTaken)


def v2(raw: bytes) -> tuple[Any, list[BatchRejected]]:
    decoded = decode_measurements(raw)
    return decoded.message, decoded.rejected


def measurement(resource: str, value: int = 256) -> bytes:
    return MeasurementTaken(
        id=ids.measurement_id(HOUR, "cfapps", resource), reading_id=ids.reading_id(HOUR), reading_hour=HOUR,
        meter="cfapps", resource_id=resource, value=value, unit="MB", taken_at=HOUR,
    ).model_dump_json().encode()


def resource_of(r: Received[Any]) -> str:
    rid: str = r.message.resource_id
    return rid


async def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 20) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[ConsumerRecord] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


@contextlib.asynccontextmanager
async def producing(kafka: str) -> AsyncIterator[Publisher]:
    pub = Publisher(kafka, client_id="test")
    await pub.start()
    try:
        yield pub
    finally:
        await pub.stop()


def subscriber(
    kafka: str, topic: str, group: str, handler: Callable[[list[Received[Any]]], Awaitable[Any]], *,
    decode: Decoder = V1, model: type[BaseModel] = MeasurementTaken, max_records: int = 100,
) -> Stream:
    stream = Stream(kafka, client_id="test-consumer")
    stream.subscribe(topic, group_id=group, model=model, decode=decode, handler=handler, title=topic,
                     description="test", max_records=max_records, timeout_ms=100)
    return stream


@contextlib.asynccontextmanager
async def consuming(stream: Stream) -> AsyncIterator[Stream]:
    await stream.connect()
    await stream.start()
    try:
        yield stream
    finally:
        await stream.stop()


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if await result if asyncio.iscoroutine(result) else result:
            return
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


def group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------------ producing


async def test_publisher_is_idempotent_with_acks_all(infra: Any, make_topic: Any) -> None:
    topic = await make_topic()
    async with producing(infra.kafka) as pub:
        assert await pub.publish(topic, [Outgoing(key=b"app-1", value=measurement("app-1"))]) == 1
        # aiokafka keeps these private: acks=all is -1, and an idempotent producer got a producer id.
        producer = pub._stream.broker.config.producer._producer.producer  # type: ignore[attr-defined]
        assert producer._sender._acks == -1
        assert producer._txn_manager is not None and producer._txn_manager.producer_id >= 0
    (record,) = await read_all(infra.kafka, topic, 1)
    assert (record.key, record.value) == (b"app-1", measurement("app-1"))


async def test_shard_keys_go_to_shard_mod_partitions_and_other_keys_to_their_murmur2_partition(
    infra: Any, make_topic: Any
) -> None:
    """One publisher, the same keys, two topics of 3 and 5 partitions: a batch keyed ``shard-<n>`` lands in
    partition n mod partitions, any other key where every Kafka client would put it (murmur2)."""
    small, large = await make_topic(partitions=3), await make_topic(partitions=5)
    keys = [shard_key(n) for n in range(24)] + [f"org-{i}".encode() for i in range(40)]
    async with producing(infra.kafka) as pub:
        for topic in (small, large, small):
            await pub.publish(topic, [Outgoing(k, k) for k in keys])
    for topic, n, copies in ((small, 3, 2), (large, 5, 1)):
        records = await read_all(infra.kafka, topic, copies * len(keys))
        assert len(records) == copies * len(keys)
        for r in records:
            if r.key.startswith(b"shard-"):
                assert r.partition == int(r.key[6:]) % n
            else:
                assert r.partition == (reference_murmur2(r.key) & 0x7FFFFFFF) % n
        assert {r.partition for r in records} == set(range(n))


# ------------------------------------------------------------------------------------------ dead letters


def batch(resources: Sequence[str]) -> Measurements:
    (b,) = measurement_batches(HOUR, "cfapps", "MB", [Item(r, r, "o", "O", "s", "S", "", 512) for r in resources],
                               reading_id=ids.reading_id(HOUR), taken_at=HOUR)
    return b


def one_shard(n: int) -> list[str]:
    names = [f"r-{i}" for i in range(40 * n)]
    return [r for r in names if shard_of(r) == shard_of(names[0])][:n]


async def test_bad_messages_and_bad_items_go_to_the_dlq_with_reasons_and_the_consumer_keeps_going(
    infra: Any, make_topic: Any
) -> None:
    topic = await make_topic()
    handled: list[Measurements] = []

    async def handler(received: list[Received[Measurements]]) -> None:
        handled.extend(r.message for r in received)

    good_before, good_after = batch(one_shard(2)), batch(one_shard(3)[2:])
    with_bad_item = json.loads(encode_measurements(batch(one_shard(3))))
    with_bad_item["value"][1] = -5
    bad_item_raw = json.dumps(with_bad_item).encode()
    wrong_version = encode_measurements(good_before).replace(b'"schema_version":2', b'"schema_version":1')
    stream = subscriber(infra.kafka, topic, group(), handler, decode=v2, model=MeasurementsTaken)
    async with consuming(stream), producing(infra.kafka) as pub:
        # All on one key, so one partition, in this order.
        values = (encode_measurements(good_before), b"{not json", bad_item_raw, wrong_version,
                  encode_measurements(good_after))
        await pub.publish(topic, [Outgoing(b"k", v) for v in values])
        dead = await read_all(infra.kafka, topic + ".dlq", 3)
        await until(lambda: len(handled) >= 3)
    # The handler got the good messages, and the good items of the one with a bad item.
    kept = [with_bad_item["resource_id"][i] for i in (0, 2)]
    assert [m.resource_id for m in handled] == [good_before.resource_id, kept, good_after.resource_id]
    assert len(dead) == 3
    headers = [dict(r.headers) for r in dead]
    assert [h["dlq.offset"] for h in headers] == [b"1", b"2", b"3"]
    assert all(h["dlq.topic"] == topic.encode() and h["dlq.partition"] == str(dead[0].partition).encode()
               for h in headers)
    assert "json" in headers[0]["dlq.reason"].decode().lower() and dead[0].value == b"{not json"
    # The bad item alone: its position, its reason, and a batch of just that item as the value.
    assert headers[1]["dlq.items"] == b"1"
    assert headers[1]["dlq.reason"] == b"item 1: value must be an integer from 0 to 2**62"
    alone = json.loads(dead[1].value)
    assert alone["resource_id"] == [with_bad_item["resource_id"][1]] and alone["value"] == [-5]
    assert {k: v for k, v in alone.items() if not isinstance(v, list) or k in ("orgs", "spaces", "kinds")} == {
        k: v for k, v in with_bad_item.items() if not isinstance(v, list) or k in ("orgs", "spaces", "kinds")}
    assert "schema_version" in headers[2]["dlq.reason"].decode() and dead[2].value == wrong_version
    assert "dlq.items" not in headers[0] and "dlq.items" not in headers[2]


async def test_a_message_the_handler_cannot_process_is_isolated_and_dead_lettered(
    infra: Any, make_topic: Any
) -> None:
    topic = await make_topic(partitions=1)
    handled: list[str] = []

    async def handler(received: list[Received[Measurement]]) -> None:
        if any(resource_of(r) == "poison" for r in received):
            raise ValueError("cannot process poison")
        handled.extend(resource_of(r) for r in received)

    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(b"k", measurement(r)) for r in ("a", "poison", "b")])
    async with consuming(subscriber(infra.kafka, topic, group(), handler)):
        dead = await read_all(infra.kafka, topic + ".dlq", 1)
        await until(lambda: len(handled) >= 2)
    assert handled == ["a", "b"]
    assert len(dead) == 1 and dead[0].value == measurement("poison")
    assert "cannot process poison" in dict(dead[0].headers)["dlq.reason"].decode()


async def test_transient_errors_are_retried_until_the_batch_goes_through(infra: Any, make_topic: Any) -> None:
    topic = await make_topic(partitions=1)
    g = group()
    attempts: list[list[str]] = []
    handled: list[str] = []

    async def flaky(received: list[Received[Measurement]]) -> None:
        attempts.append([resource_of(r) for r in received])
        if len(attempts) <= 3:
            raise ConnectionRefusedError("database is down")
        handled.extend(resource_of(r) for r in received)

    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(b"k", measurement(f"r{i}")) for i in range(5)])
    async with consuming(subscriber(infra.kafka, topic, g, flaky)):
        await until(lambda: len(handled) >= 5)
        await until(lambda: _no_lag(infra.kafka, g, topic))
    assert handled == [f"r{i}" for i in range(5)]
    assert attempts[:4] == [[f"r{i}" for i in range(5)]] * 4  # the same batch, retried as it was
    assert await read_all(infra.kafka, topic + ".dlq", 1, timeout=1) == []  # never dead-lettered


async def _no_lag(kafka: str, g: str, topic: str) -> bool:
    return await group_lag(kafka, g, topic) == 0


# ------------------------------------------------------------------------------------------ commits


async def test_a_failing_batch_is_never_committed_past_and_nothing_after_it_is_skipped(
    infra: Any, make_topic: Any
) -> None:
    """AckPolicy.MANUAL: while a batch keeps failing, neither it nor anything after it is committed (a
    plain ACK policy would acknowledge the failed batch and the next commit would skip it); the next
    consumer of the group reads on from the failed batch."""
    topic = await make_topic(partitions=2)
    g = group()
    names = [f"r{i}" for i in range(12)]
    handled: list[str] = []
    stuck = asyncio.Event()

    async def failing_on_r6(received: list[Received[Measurement]]) -> None:
        if any(resource_of(r) == "r6" for r in received):
            stuck.set()
            raise ConnectionRefusedError("database is down")
        handled.extend(resource_of(r) for r in received)

    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(f"k{i % 2}".encode(), measurement(r)) for i, r in enumerate(names)])
    first = subscriber(infra.kafka, topic, g, failing_on_r6, max_records=3)
    async with consuming(first):
        await asyncio.wait_for(stuck.wait(), 20)
        await asyncio.sleep(2)  # retries go on; nothing moves
        lag_while_stuck = await group_lag(infra.kafka, g, topic)
    assert "r6" not in handled
    assert lag_while_stuck == len(names) - len(handled) > 0

    seen: list[str] = []

    async def ok(received: list[Received[Measurement]]) -> None:
        seen.extend(resource_of(r) for r in received)

    async with consuming(subscriber(infra.kafka, topic, g, ok)):
        await until(lambda: _no_lag(infra.kafka, g, topic))
    assert "r6" in seen
    assert sorted(set(handled) | set(seen)) == sorted(names)  # nothing skipped
    assert not set(handled) & set(seen)  # and what the first committed is not read again


async def test_offsets_are_committed_only_after_the_handler_and_the_dlq_publish(infra: Any, make_topic: Any) -> None:
    topic = await make_topic(partitions=1)
    g = group()
    handler_gate, dlq_gate = asyncio.Event(), asyncio.Event()
    in_handler, in_dlq = asyncio.Event(), asyncio.Event()
    handled: list[str] = []

    async def slow(received: list[Received[Measurement]]) -> None:
        in_handler.set()
        await handler_gate.wait()
        handled.extend(resource_of(r) for r in received)

    stream = subscriber(infra.kafka, topic, g, slow)
    publish_retrying = stream.publish_retrying

    async def held(target: str, messages: Sequence[Outgoing]) -> None:
        in_dlq.set()
        await dlq_gate.wait()
        await publish_retrying(target, messages)

    stream.publish_retrying = held  # type: ignore[method-assign,assignment]
    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(b"k", v) for v in (measurement("a"), b"{bad", measurement("b"))])
    async with consuming(stream):
        await asyncio.wait_for(in_handler.wait(), 20)
        await asyncio.sleep(0.5)
        assert await group_lag(infra.kafka, g, topic) == 3  # the handler has not finished: nothing committed
        handler_gate.set()
        await asyncio.wait_for(in_dlq.wait(), 20)
        await asyncio.sleep(0.5)
        assert handled == ["a", "b"]
        assert await group_lag(infra.kafka, g, topic) == 3  # handled, but the DLQ has not acknowledged yet
        dlq_gate.set()
        await until(lambda: _no_lag(infra.kafka, g, topic))
    dead = await read_all(infra.kafka, topic + ".dlq", 1)
    assert [r.value for r in dead] == [b"{bad"]


async def test_stop_finishes_the_batch_in_hand_and_commits_it(infra: Any, make_topic: Any) -> None:
    """What SIGTERM does to a service: the batch being handled completes and is committed."""
    topic = await make_topic(partitions=1)
    g = group()
    started, done = asyncio.Event(), list[str]()

    async def slow(received: list[Received[Measurement]]) -> None:
        started.set()
        await asyncio.sleep(1.0)
        done.extend(resource_of(r) for r in received)

    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(b"k", measurement(f"r{i}")) for i in range(3)])
        async with consuming(subscriber(infra.kafka, topic, g, slow)):
            await asyncio.wait_for(started.wait(), 20)
        # stopped while the handler slept
        assert done == ["r0", "r1", "r2"]
        assert await group_lag(infra.kafka, g, topic) == 0
        await pub.publish(topic, [Outgoing(b"k", measurement("after"))])

    again: list[str] = []

    async def record(received: list[Received[Measurement]]) -> None:
        again.extend(resource_of(r) for r in received)

    async with consuming(subscriber(infra.kafka, topic, g, record)):
        await until(lambda: bool(again))
    assert again == ["after"]  # nothing of the first batch was read twice


async def test_group_lag_counts_what_a_group_has_not_committed(infra: Any, make_topic: Any) -> None:
    topic = await make_topic(partitions=3)
    g = group()
    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(f"k{i}".encode(), measurement(f"r{i}")) for i in range(7)])
    assert await group_lag(infra.kafka, g, topic) == 7
    seen: list[str] = []

    async def record(received: list[Received[Measurement]]) -> None:
        seen.extend(resource_of(r) for r in received)

    async with consuming(subscriber(infra.kafka, topic, g, record)):
        await until(lambda: _no_lag(infra.kafka, g, topic))
    assert sorted(seen) == sorted(f"r{i}" for i in range(7))
    with pytest.raises(LookupError):
        await group_lag(infra.kafka, g, "no.such.topic." + uuid.uuid4().hex)


async def test_a_rebalance_between_two_members_loses_and_repeats_nothing(infra: Any, make_topic: Any) -> None:
    """A second member joins while the first is busy: the first finishes and commits its batch before giving
    partitions away, so every message is handled once, each partition in offset order."""
    topic = await make_topic(partitions=4)
    g = group()
    handled: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}

    def handler(member: str) -> Callable[[list[Received[Measurement]]], Awaitable[None]]:
        async def handle(received: list[Received[Measurement]]) -> None:
            await asyncio.sleep(0.05)
            handled[member].extend((r.partition, r.offset) for r in received)

        return handle

    total = 600
    a = subscriber(infra.kafka, topic, g, handler("a"), max_records=10)
    b = subscriber(infra.kafka, topic, g, handler("b"), max_records=10)

    def assigned(stream: Stream) -> set[Any]:
        consumers = [c for sub in stream.broker.subscribers if (c := getattr(sub, "consumer", None)) is not None]
        return set(consumers[0].assignment()) if consumers else set()

    async with producing(infra.kafka) as pub:
        first_wave = [Outgoing(f"k{i % 40}".encode(), measurement(f"r{i}")) for i in range(total // 2)]
        await pub.publish(topic, first_wave)
        async with consuming(a):
            await until(lambda: len(handled["a"]) >= 50)
            async with consuming(b):  # joins while the first member is busy
                await until(lambda: bool(assigned(a)) and bool(assigned(b)) and not assigned(a) & assigned(b))
                second_wave = [Outgoing(f"k{i % 40}".encode(), measurement(f"r{i}")) for i in range(total // 2, total)]
                await pub.publish(topic, second_wave)
                await until(lambda: len(handled["a"]) + len(handled["b"]) >= total, timeout=60)
                await until(lambda: _no_lag(infra.kafka, g, topic))
                assignments = [assigned(a), assigned(b)]
    every = handled["a"] + handled["b"]
    assert len(every) == len(set(every)) == total  # once each
    assert handled["b"], "the second member got no partition"
    assert assignments[0] and assignments[1] and not assignments[0] & assignments[1]
    for member in handled.values():
        for p in range(4):
            offsets = [o for q, o in member if q == p]
            assert offsets == sorted(offsets)


async def test_batches_hold_up_to_max_records_each_partition_in_offset_order(infra: Any, make_topic: Any) -> None:
    topic = await make_topic(partitions=2)
    g = group()
    total, max_records = 230, 50
    batches: list[list[tuple[int, int]]] = []

    async def record(received: list[Received[Measurement]]) -> None:
        batches.append([(r.partition, r.offset) for r in received])

    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(f"k{i % 7}".encode(), measurement(f"r{i}")) for i in range(total)])
    async with consuming(subscriber(infra.kafka, topic, g, record, max_records=max_records)):
        await until(lambda: sum(map(len, batches)) >= total)
        await until(lambda: _no_lag(infra.kafka, g, topic))
    seen = [po for b in batches for po in b]
    assert len(seen) == total and len(set(seen)) == total
    for partition in (0, 1):
        offsets = [o for p, o in seen if p == partition]
        assert offsets == list(range(len(offsets)))
    assert max(map(len, batches)) == max_records


async def test_a_long_reason_is_cut_to_valid_utf8_and_the_message_still_dead_lettered(
    infra: Any, make_topic: Any
) -> None:
    """The reason names the offending field; an unknown field's name is the producer's text: cut to the
    header's 4000 bytes, it must stay UTF-8 (it was cut inside a character, the publish failed, and the
    message was neither dead-lettered nor kept: the next batch's commit went past it)."""
    topic = await make_topic(partitions=1)
    g = group()
    handled: list[str] = []

    async def record(received: list[Received[Measurement]]) -> None:
        handled.extend(resource_of(r) for r in received)

    doc = json.loads(measurement("a"))
    odd = json.dumps({**doc, "x" + "é" * 2500: 1}, ensure_ascii=False).encode()
    even = json.dumps({**doc, "é" * 2500: 1}, ensure_ascii=False).encode()
    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(b"k", v) for v in (odd, even, measurement("after"))])
    async with consuming(subscriber(infra.kafka, topic, g, record)):
        dead = await read_all(infra.kafka, topic + ".dlq", 2)
        await until(lambda: _no_lag(infra.kafka, g, topic))
    assert [r.value for r in dead] == [odd, even]
    for r in dead:
        reason = dict(r.headers)["dlq.reason"]
        assert len(reason) <= 4000 and reason.decode().startswith("invalid MeasurementTaken: ")
    assert handled == ["after"]


async def test_an_error_outside_the_handler_is_not_committed_past(infra: Any, make_topic: Any) -> None:
    """Whatever fails while a batch is processed (here the decoder, as a bug would), the batch is read
    again and nothing after it is committed: the group's next consumer still gets it."""
    topic = await make_topic(partitions=1)
    g = group()
    handled: list[str] = []
    raised = asyncio.Event()

    def buggy(raw: bytes) -> tuple[Any, list[BatchRejected]]:
        if b'"r3"' in raw:
            raised.set()
            raise RuntimeError("a bug in decoding")
        return V1(raw)

    async def record(received: list[Received[Measurement]]) -> None:
        handled.extend(resource_of(r) for r in received)

    async with producing(infra.kafka) as pub:
        await pub.publish(topic, [Outgoing(b"k", measurement(f"r{i}")) for i in range(8)])
    async with consuming(subscriber(infra.kafka, topic, g, record, decode=buggy, max_records=2)):
        await asyncio.wait_for(raised.wait(), 20)
        await asyncio.sleep(2)
        lag = await group_lag(infra.kafka, g, topic)
    assert handled == ["r0", "r1"] and lag == 6

    seen: list[str] = []

    async def ok(received: list[Received[Measurement]]) -> None:
        seen.extend(resource_of(r) for r in received)

    async with consuming(subscriber(infra.kafka, topic, g, ok)):
        await until(lambda: _no_lag(infra.kafka, g, topic))
    assert seen == [f"r{i}" for i in range(2, 8)]
