"""Kafka plumbing written once for every service: an idempotent producer (acks=all) and a batch consumer
that decodes with a contract model, dead-letters what it cannot process with the reason, and commits
offsets only after the handler's database commit and the publish of its outputs.

Why aiokafka directly rather than a FastStream subscriber: FastStream acknowledges before the handler by
default and cannot hold a rebalance until a batch is committed; here a revoke waits for the batch in
hand (eager rebalance protocol), and a failed message can never be skipped by a later commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError

from shared.contracts import MAX_MESSAGE_BYTES
from shared.metrics import (
    BATCH_SECONDS,
    CONSUMER_LAG,
    MESSAGES_CONSUMED,
    MESSAGES_DEAD_LETTERED,
    MESSAGES_PUBLISHED,
)
from shared.topics import dlq
from shared.wire import decoder_for

__all__ = [
    "murmur2", "FETCH_CHUNK", "Publisher", "BatchConsumer", "Received", "Rejected", "Outgoing", "encode", "describe_error",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Records a consumer parses and decodes before it lets the event loop run again (see BatchConsumer._fetch).
FETCH_CHUNK = 250

# Errors worth retrying as they are: the database or the broker is away for a moment.
TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    KafkaError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.AdminShutdownError,
)


def _retry_delay(attempt: int) -> float:
    """Seconds before retrying a transient failure for the ``attempt``-th time: doubling, at most 30."""
    return min(30.0, 0.2 * 2 ** min(attempt, 8))


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of a key (as ``org.apache.kafka.common.utils.Utils.murmur2``), which picks a
    keyed message's partition in every Kafka client; a word at a time, faster than aiokafka's."""
    m, r, mask = 0x5BD1E995, 24, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    end = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:end]):
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    extra = length & 3
    if extra:
        tail = data[end:]
        if extra == 3:
            h ^= tail[2] << 16
        if extra >= 2:
            h ^= tail[1] << 8
        h ^= tail[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h  # unsigned; Java returns it signed, and both mask it with 0x7FFFFFFF


def encode(model: BaseModel) -> bytes:
    """A contract model as the JSON bytes sent on a topic."""
    return model.__pydantic_serializer__.to_json(model)


class Outgoing(NamedTuple):
    """A message to publish (a tuple: built once per message on the hot paths, where a frozen dataclass
    costs three times as much)."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class Publisher:
    """An idempotent producer (``enable_idempotence`` ⇒ acks=all): ``publish`` returns once every
    message is acknowledged by the broker, so a caller may then commit its input offsets."""

    def __init__(self, bootstrap_servers: str, client_id: str) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=512 * 1024,
            max_request_size=4 * 1024 * 1024,
            request_timeout_ms=30_000,
        )
        self._partitions: dict[str, list[int]] = {}
        # Per topic: two topics may have different partition counts, so a key's partition is the topic's.
        self._partition_cache: dict[str, dict[bytes, int]] = {}

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, topic: str, messages: Iterable[Outgoing]) -> int:
        """Send ``messages`` and wait until the broker has acknowledged every one.

        Messages are appended to per-partition batches (partition = Kafka's default murmur2 of the key,
        as every Kafka client computes it, so one key keeps one partition and its order), which costs a
        fraction of a per-message ``send``."""
        producer = self._producer
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await producer.partitions_for(topic))
        n_parts = len(partitions)
        cache = self._partition_cache.setdefault(topic, {})
        if len(cache) > 1_000_000:
            cache.clear()
        batches: dict[int, BatchBuilder] = {}
        futures: list[asyncio.Future[Any]] = []
        count = 0
        for m in messages:
            if m.key is None:
                part = partitions[count % n_parts]
            else:
                part = cache.get(m.key, -1)
                if part < 0:
                    part = cache[m.key] = partitions[(murmur2(m.key) & 0x7FFFFFFF) % n_parts]
            batch = batches.get(part)
            if batch is None:
                batch = batches[part] = producer.create_batch()
            headers = list(m.headers)
            if batch.append(key=m.key, value=m.value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(batch, topic, partition=part))
                batch = batches[part] = producer.create_batch()
                if batch.append(key=m.key, value=m.value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"message of {len(m.value)} bytes does not fit in a batch")
            count += 1
        for part, batch in batches.items():
            if batch.record_count():
                futures.append(await producer.send_batch(batch, topic, partition=part))
        if futures:
            await asyncio.gather(*futures)
            MESSAGES_PUBLISHED.labels(topic).inc(count)
        return count

    async def ping(self) -> None:
        """Raise unless the broker answers a metadata request."""
        await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout=3)


@dataclass(slots=True)  # not frozen: one is built per message, and a frozen one takes 3x as long (~0.45 us)
class Received(Generic[M]):
    """A decoded, valid message with where it came from (handlers read it, never change it)."""

    message: M
    key: bytes | None
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message the consumer will not process, and why."""

    record: ConsumerRecord  # type: ignore[type-arg]
    reason: str


def describe_error(exc: ValidationError) -> str:
    """A short, readable reason from a pydantic validation error."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "message"
        parts.append(f"{loc}: {err.get('msg')}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


@dataclass
class _Fetched(Generic[M]):
    """A fetched batch, decoded: the records by partition, the valid messages, the rejected ones."""

    records: dict[TopicPartition, list[ConsumerRecord]]  # type: ignore[type-arg]
    valid: list[Received[M]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def only(self, assigned: set[TopicPartition]) -> _Fetched[M]:
        keep = {tp.partition for tp in assigned if tp in self.records}
        return _Fetched(
            {tp: r for tp, r in self.records.items() if tp in assigned},
            [v for v in self.valid if v.partition in keep],
            [r for r in self.rejected if r.record.partition in keep],
        )


# The handler receives the batch's valid messages, does its work in one database transaction, publishes
# its outputs, and returns the messages it rejects on business grounds (they go to the DLQ).
Handler = Callable[[list[Received[M]]], Awaitable[Sequence[tuple[Received[M], str]] | None]]


class _CommitBeforeRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the batch in hand to be processed and committed before giving partitions away.
        async with self._lock:
            pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})


class BatchConsumer(Generic[M]):
    """Consume ``topic`` in ``group_id`` in batches of up to ``max_records``.

    For each batch (taken from the client ``FETCH_CHUNK`` records at a time, while the previous batch is
    handled): decode every record with ``model`` (through its fast mirror in ``shared.wire`` when
    it has one; invalid ones are rejected with the model's reason), call
    ``handler`` with the valid ones, publish the rejected ones to ``<topic>.dlq`` with the reason in the
    ``dlq.reason`` header and the original bytes as value, then commit the batch's offsets. A handler
    error is retried with backoff while it looks transient; otherwise the batch is replayed one message
    at a time and the message that fails goes to the DLQ with the error, so the consumer keeps going.
    """

    def __init__(
        self,
        *,
        topic: str,
        group_id: str,
        bootstrap_servers: str,
        model: type[M],
        handler: Handler[M],
        publisher: Publisher,
        max_records: int = 5000,
        timeout_ms: int = 200,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        client_id: str | None = None,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        self._model = model
        self._decode_value = decoder_for(model)
        self._handler = handler
        self._publisher = publisher
        self._max_records = max_records
        self._timeout_ms = timeout_ms
        self._max_bytes = max_message_bytes
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            client_id=client_id or group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            session_timeout_ms=30_000,
            heartbeat_interval_ms=3_000,
            max_poll_interval_ms=300_000,
        )

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_CommitBeforeRevoke(self._lock))
        self._task = asyncio.create_task(self._run(), name=f"consume:{self.topic}:{self.group_id}")

    async def stop(self) -> None:
        """Finish the batch in hand, commit it, and leave the group."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=60)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        await self._consumer.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    async def _run(self) -> None:
        # The next batch is fetched and decoded while the handler of this one waits on the database.
        prefetch = asyncio.create_task(self._fetch())
        try:
            while not self._stopping.is_set():
                fetched = await prefetch
                prefetch = asyncio.create_task(self._fetch())
                if fetched is None:
                    continue
                async with self._lock:
                    # A rebalance may have taken partitions while this batch waited: leave theirs to
                    # the new owner (it re-reads them from the committed offsets).
                    assigned = self._consumer.assignment()
                    if any(tp not in assigned for tp in fetched.records):
                        fetched = fetched.only(assigned)
                    if fetched.records:
                        await self._process(fetched)
        except Exception:
            # A bug in this loop (handler errors never get here): without it the process would keep its
            # place in the group, holding its partitions unread until max_poll_interval_ms throws it out.
            # Stop the service instead (its supervisor restarts it); the batch in hand was not committed.
            if not self._stopping.is_set():
                log.critical("consumer loop failed; stopping the service", exc_info=True, extra={"topic": self.topic})
                os.kill(os.getpid(), signal.SIGTERM)
            raise
        finally:
            prefetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, KafkaError):
                await prefetch

    async def _fetch(self) -> _Fetched[M] | None:
        """The next batch, up to ``max_records``, decoded. It runs while the handler of the batch in hand
        waits on the database, so it takes the records a chunk at a time and lets the event loop run
        between chunks: parsing and decoding a whole batch at once would hold the handler's next statement
        back by as long (tens of ms for a batch of the ledger's size)."""
        try:
            chunk = min(self._max_records, FETCH_CHUNK)
            records = await self._consumer.getmany(timeout_ms=self._timeout_ms, max_records=chunk)
        except KafkaError as exc:
            log.warning("fetch failed; retrying", extra={"error": str(exc)})
            await asyncio.sleep(1)
            return None
        if not records:
            return None
        fetched: _Fetched[M] = _Fetched({})
        got = self._add(fetched, records)
        while got < self._max_records:
            await asyncio.sleep(0)
            try:
                # Only what the consumer already holds: the batch does not wait for more.
                chunk = min(self._max_records - got, FETCH_CHUNK)
                records = await self._consumer.getmany(timeout_ms=0, max_records=chunk)
            except KafkaError:
                break  # what was taken stays in this batch (the consumer's position is past it)
            if not records:
                break
            got += self._add(fetched, records)
        return fetched

    def _add(self, fetched: _Fetched[M], records: dict[TopicPartition, list[ConsumerRecord]]) -> int:  # type: ignore[type-arg]
        """Decode a chunk of records into ``fetched``; a partition's records stay in offset order."""
        count = 0
        for tp, recs in records.items():
            fetched.records.setdefault(tp, []).extend(recs)
            count += len(recs)
            for rec in recs:
                item = self._decode(rec)
                if isinstance(item, Rejected):
                    fetched.rejected.append(item)
                else:
                    fetched.valid.append(item)
        return count

    def _decode(self, record: ConsumerRecord) -> Received[M] | Rejected:  # type: ignore[type-arg]
        value = record.value
        if value is None:
            return Rejected(record, "empty message (no value)")
        if len(value) > self._max_bytes:
            return Rejected(record, f"message too large: {len(value)} bytes > {self._max_bytes}")
        try:
            msg = self._decode_value(value)
        except ValidationError as exc:
            return Rejected(record, f"invalid {self._model.__name__}: {describe_error(exc)}")
        return Received(msg, record.key, record.partition, record.offset)

    async def _process(self, fetched: _Fetched[M]) -> None:
        started = time.perf_counter()
        records, valid, rejected = fetched.records, fetched.valid, list(fetched.rejected)
        if valid:
            business = await self._handle(valid)
            if business is None:
                return  # stopping before the batch could be handled: commit nothing
            if business:
                raw = {(rec.partition, rec.offset): rec for recs in records.values() for rec in recs}
                rejected.extend(Rejected(raw[(r.partition, r.offset)], why) for r, why in business)
        if rejected:
            await self._dead_letter(rejected)
        await self._commit(records)
        n = sum(len(v) for v in records.values())
        MESSAGES_CONSUMED.labels(self.topic, self.group_id).inc(n)
        BATCH_SECONDS.labels(self.topic, self.group_id).observe(time.perf_counter() - started)
        self.batches += 1
        assigned = self._consumer.assignment()  # the commit may have met a rebalance that took some
        for tp, recs in records.items():
            hw = self._consumer.highwater(tp) if tp in assigned else None
            if hw is not None:
                CONSUMER_LAG.labels(self.topic, self.group_id, str(tp.partition)).set(max(0, hw - recs[-1].offset - 1))

    async def _handle(self, valid: list[Received[M]]) -> list[tuple[Received[M], str]] | None:
        """Run the handler until it succeeds; None if asked to stop first."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return list(await self._handler(valid) or [])
            except TRANSIENT as exc:
                delay = _retry_delay(attempt)
                log.warning("batch failed (transient); retrying", extra={"error": repr(exc), "attempt": attempt, "retry_in_s": delay})
            except Exception as exc:
                if len(valid) > 1 and attempt >= 2:
                    log.error("batch keeps failing; isolating the bad message", extra={"error": repr(exc)})
                    return await self._one_by_one(valid)
                if len(valid) == 1 and attempt >= 2:
                    return [(valid[0], f"processing failed: {exc!r}"[:1000])]
                delay = 0.5
                log.exception("batch failed; retrying once", extra={"attempt": attempt})
            if self._stopping.is_set():
                return None
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                return None
            except TimeoutError:
                pass

    async def _one_by_one(self, valid: list[Received[M]]) -> list[tuple[Received[M], str]] | None:
        out: list[tuple[Received[M], str]] = []
        for item in valid:
            result = await self._handle([item])
            if result is None:
                return None
            out.extend(result)
        return out

    async def _dead_letter(self, rejected: list[Rejected]) -> None:
        """Publish ``rejected`` to the DLQ, retrying while the broker is away (the batch's offsets are
        committed only after this)."""
        target = dlq(self.topic)
        messages = [
            Outgoing(
                key=r.record.key,
                value=r.record.value or b"",
                headers=(
                    ("dlq.reason", r.reason.encode()[:4000]),
                    ("dlq.topic", self.topic.encode()),
                    ("dlq.partition", str(r.record.partition).encode()),
                    ("dlq.offset", str(r.record.offset).encode()),
                    ("dlq.group", self.group_id.encode()),
                ),
            )
            for r in rejected
        ]
        attempt = 0
        while True:
            try:
                await self._publisher.publish(target, messages)
                break
            except TRANSIENT as exc:
                attempt += 1
                if self._stopping.is_set():
                    raise
                delay = _retry_delay(attempt)
                log.warning("dead-lettering failed (transient); retrying", extra={"error": repr(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
        MESSAGES_DEAD_LETTERED.labels(self.topic, self.group_id).inc(len(rejected))
        for r in rejected[:20]:
            log.warning(
                "message dead-lettered",
                extra={"topic": self.topic, "partition": r.record.partition, "offset": r.record.offset, "reason": r.reason},
            )

    async def _commit(self, records: dict[TopicPartition, list[ConsumerRecord]]) -> None:  # type: ignore[type-arg]
        offsets = {tp: recs[-1].offset + 1 for tp, recs in records.items() if recs}
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # The group rebalanced under us: the new owner re-reads these records, and the
            # handlers' deduplication makes that harmless.
            log.warning("offset commit failed; the batch will be re-read", extra={"error": repr(exc)})


async def group_lag(bootstrap_servers: str, group_id: str, topic: str) -> int:
    """Messages of ``topic`` not yet committed by ``group_id`` (end offsets minus committed offsets);
    a group that never committed counts the whole topic. Raises if the topic does not exist."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await admin.start()
    await probe.start()
    try:
        described = await admin.describe_topics([topic])
        if not described or described[0].get("error_code") or not described[0].get("partitions"):
            raise LookupError(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p["partition"]) for p in described[0]["partitions"]]
        ends = await probe.end_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=tps)
        lag = 0
        for tp, end in ends.items():
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lag += max(0, end - done)
        return lag
    finally:
        await probe.stop()
        await admin.close()
