"""Kafka for every service, on FastStream: one ``KafkaBroker`` per process that publishes (idempotent,
acks=all) and runs the service's batch subscribers, plus what FastStream leaves to us, written once here:

- decoding with the service's own decoder, item by item for the batched topics (``shared.batches``):
  what cannot be processed goes to ``<topic>.dlq`` with the reason in the ``dlq.reason`` header and the
  original bytes (or, for refused items of a batch, those items as a batch of their own) as value;
- retries with backoff while the database or the broker is away, and isolating a message that keeps
  failing instead of blocking its partition;
- offsets committed only after the handler's database commit and the publish of its outputs
  (``AckPolicy.MANUAL``: FastStream's ``ACK`` would also acknowledge a failed batch, which skips it), the
  exact offsets handled, under a lock that a rebalance waits for, so that the batch in hand is finished
  and committed before its partitions change hands;
- a partitioner that sends a batch keyed ``shard-<n>`` to partition ``n mod partitions``;
- the AsyncAPI document of the subscribers and publishers (``Stream.asyncapi``): a handler's first
  parameter is annotated with the topic's contract model, which documents the payload; decoding is
  ours (``_Documented`` passes the decoded value through instead of validating it again).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from fast_depends.library.serializer import OptionItem, Serializer, SerializerProto
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.middlewares import AckPolicy
from faststream.specification import AsyncAPI
from pydantic import BaseModel, ValidationError, create_model

from shared.batches import BatchRejected, describe_error
from shared.contracts import MAX_MESSAGE_BYTES
from shared.db import OUT_OF_RANGE_TEXT, out_of_range
from shared.metrics import (
    BATCH_SECONDS,
    CONSUMER_LAG,
    MESSAGES_CONSUMED,
    MESSAGES_DEAD_LETTERED,
    MESSAGES_PUBLISHED,
)
from shared.topics import dlq

__all__ = [
    "TRANSIENT",
    "Decoder",
    "Handler",
    "Outgoing",
    "Publisher",
    "Received",
    "Stream",
    "describe_error",
    "encode",
    "group_lag",
    "model_decoder",
    "retry_delay",
]

log = logging.getLogger(__name__)

M = TypeVar("M")

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


def retry_delay(attempt: int) -> float:
    """Seconds before retrying a transient failure for the ``attempt``-th time: doubling, at most 30."""
    return min(30.0, 0.2 * 2.0 ** min(attempt, 8))


def encode(model: BaseModel) -> bytes:
    """A contract model as the JSON bytes sent on a topic."""
    return model.__pydantic_serializer__.to_json(model)


class Outgoing(NamedTuple):
    """A message to publish."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(slots=True)
class Received(Generic[M]):
    """A decoded message (or the good items of a batch) with where it came from."""

    message: M
    key: bytes | None
    partition: int
    offset: int


# A decoder turns a record's value into (message or None, what it refuses); a handler processes the batch's
# valid messages in one database transaction, publishes its outputs, and returns the messages it refuses
# on business grounds (they go to the DLQ with their original bytes).
Decoder = Callable[[bytes], tuple[Any, list[BatchRejected]]]
# A business refusal is a reason (the message goes to the DLQ as it came) or a BatchRejected (items of it).
Handler = Callable[[list[Received[Any]]], Awaitable[Sequence[tuple[Received[Any], str | BatchRejected]] | None]]


def model_decoder(decode: Callable[[bytes], Any], model: type[BaseModel]) -> Decoder:
    """A decoder for a topic of single messages: ``decode`` (e.g. ``model.model_validate_json`` or a
    faster mirror) raises pydantic's ValidationError for a message it refuses."""

    def run(raw: bytes) -> tuple[Any, list[BatchRejected]]:
        try:
            return decode(raw), []
        except ValidationError as exc:
            return None, [BatchRejected(f"invalid {model.__name__}: {describe_error(exc)}")]

    return run


class _Documented(Serializer):
    """Handler arguments as they come (our decoders validated them), with a pydantic model of the
    handler's parameters that FastStream's AsyncAPI generator reads."""

    def __init__(self, *, name: str, options: list[OptionItem], response_type: Any) -> None:
        super().__init__(name=name, options=options, response_type=response_type)
        fields: dict[str, Any] = {o.field_name: (o.field_type, o.default_value) for o in options}
        self.model = create_model(name, **fields)

    def __call__(self, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        return call_kwargs


class _DocumentedSerializer(SerializerProto):
    def __call__(self, *, name: str, options: list[OptionItem], response_type: Any) -> Serializer:
        return _Documented(name=name, options=options, response_type=response_type)

    @staticmethod
    def encode(message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        raise TypeError("publish bytes: messages are encoded by the services")


class _ShardPartitioner:
    """Keys ``shard-<n>`` go to partition ``n mod partitions`` (even spread of the batched topics' 24
    shards); any other key by Kafka's default murmur2, as every Kafka client computes it."""

    def __init__(self) -> None:
        self._default = DefaultPartitioner()

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is not None and key.startswith(b"shard-") and key[6:].isdigit():
            return sorted(all_partitions)[int(key[6:]) % len(all_partitions)]
        return int(self._default(key, all_partitions, available))


class _FinishBeforeRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait until the batch in hand is processed and committed before giving partitions away.
        async with self._lock:
            pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


def _passthrough(message: Any) -> Any:
    return message.body


def _rewind(consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
    """Seek each partition of ``records`` that this member still owns back to its first record."""
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    assigned = consumer.assignment()
    for tp, offset in first.items():
        if tp in assigned:
            consumer.seek(tp, offset)


class _Subscription:
    """One topic's consumer: decode, handle, dead-letter, commit."""

    def __init__(
        self, stream: Stream, topic: str, group_id: str, decode: Decoder, handler: Handler, max_bytes: int
    ) -> None:
        self.stream, self.topic, self.group_id = stream, topic, group_id
        self._decode, self._handler, self._max_bytes = decode, handler, max_bytes
        self.lock = asyncio.Lock()
        self.batches = 0
        self.consumer: AIOKafkaConsumer | None = None

    async def __call__(self, message: KafkaMessage) -> None:
        records: tuple[ConsumerRecord[bytes, bytes], ...] = message.raw_message
        consumer: AIOKafkaConsumer = message.consumer
        self.consumer = consumer
        if not records:
            return
        async with self.lock:
            # A rebalance may have taken partitions while this batch waited for the lock: their records
            # are the new owner's (it reads them from the committed offsets).
            assigned = consumer.assignment()
            gone = {(r.topic, r.partition) for r in records} - {(tp.topic, tp.partition) for tp in assigned}
            if gone:
                records = tuple(r for r in records if (r.topic, r.partition) not in gone)
            try:
                if records and not await self._process(consumer, records):
                    await message.nack()  # stopping: rewind, so that nothing after this batch is committed
            except Exception:
                # Not the handler's failure (it retries and isolates on its own): decoding, the DLQ. With
                # nothing acknowledged, the next batch's commit would go past this one: read it again instead.
                log.exception("batch failed outside its handler; reading it again", extra={"topic": self.topic})
                await self.stream.sleep_unless_stopping(1.0)
                _rewind(consumer, records)

    async def _process(self, consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]]) -> bool:
        """Handle, dead-letter and commit one batch; False when the service stopped before it was handled."""
        started = time.perf_counter()
        valid: list[Received[Any]] = []
        rejected: list[tuple[ConsumerRecord[bytes, bytes], BatchRejected]] = []
        for rec in records:
            value = rec.value
            if value is None:
                rejected.append((rec, BatchRejected("empty message (no value)")))
                continue
            if len(value) > self._max_bytes:
                rejected.append((rec, BatchRejected(f"message too large: {len(value)} bytes > {self._max_bytes}")))
                continue
            msg, refused = self._decode(value)
            rejected.extend((rec, r) for r in refused)
            if msg is not None:
                valid.append(Received(msg, rec.key, rec.partition, rec.offset))
        if valid:
            business = await self._handle(valid)
            if business is None:
                return False
            if business:
                by_place = {(r.partition, r.offset): r for r in records}
                rejected.extend(
                    (by_place[(r.partition, r.offset)], why if isinstance(why, BatchRejected) else BatchRejected(why))
                    for r, why in business
                )
        if rejected:
            await self._dead_letter(rejected)
        await self._commit(consumer, records)
        MESSAGES_CONSUMED.labels(self.topic, self.group_id).inc(len(records))
        BATCH_SECONDS.labels(self.topic, self.group_id).observe(time.perf_counter() - started)
        self.batches += 1
        self.stream.last_batch_at = time.time()
        assigned = consumer.assignment()
        last: dict[TopicPartition, int] = {}
        for r in records:
            last[TopicPartition(r.topic, r.partition)] = r.offset
        for tp, offset in last.items():
            hw = consumer.highwater(tp) if tp in assigned else None
            if hw is not None:
                CONSUMER_LAG.labels(self.topic, self.group_id, str(tp.partition)).set(max(0, hw - offset - 1))
        return True

    async def _handle(self, valid: list[Received[Any]]) -> list[tuple[Received[Any], str | BatchRejected]] | None:
        """Run the handler until it succeeds; None if the service stops first."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return list(await self._handler(valid) or [])
            except Exception as exc:
                if out_of_range(exc):  # asyncpg's refusal of an int is an InterfaceError: before TRANSIENT
                    return await self._out_of_range(valid, exc)
                if not isinstance(exc, TRANSIENT):
                    if attempt >= 2 and len(valid) > 1:
                        log.error("batch keeps failing; isolating the bad message", extra={"error": repr(exc)})
                        return await self._one_by_one(valid)
                    if attempt >= 2:
                        return [(valid[0], f"processing failed: {exc!r}"[:1000])]
                    delay = 0.5
                    log.exception("batch failed; retrying once", extra={"topic": self.topic, "attempt": attempt})
                else:
                    delay = retry_delay(attempt)
                    log.warning(
                        "batch failed (transient); retrying",
                        extra={"topic": self.topic, "error": repr(exc), "attempt": attempt, "retry_in_s": delay},
                    )
            if await self.stream.sleep_unless_stopping(delay):
                return None

    async def _out_of_range(
        self, valid: list[Received[Any]], exc: Exception
    ) -> list[tuple[Received[Any], str | BatchRejected]] | None:
        """Amounts past what the database holds: content, not the weather. Told apart message by message at
        once and refused with that reason (each attempt rolled back: nothing of it was stored)."""
        if len(valid) > 1:
            return await self._one_by_one(valid)
        return [(valid[0], f"{OUT_OF_RANGE_TEXT}: {exc}"[:1000])]

    async def _one_by_one(self, valid: list[Received[Any]]) -> list[tuple[Received[Any], str | BatchRejected]] | None:
        out: list[tuple[Received[Any], str | BatchRejected]] = []
        for item in valid:
            result = await self._handle([item])
            if result is None:
                return None
            out.extend(result)
        return out

    async def _dead_letter(self, rejected: list[tuple[ConsumerRecord[bytes, bytes], BatchRejected]]) -> None:
        """Publish the refused messages (or items) to the DLQ, retrying while the broker is away: the
        batch's offsets are committed only after this."""
        target = dlq(self.topic)
        messages = []
        for rec, why in rejected:
            headers = [
                # at most 4000 bytes, cut between characters (a header is text)
                ("dlq.reason", why.reason.encode()[:4000].decode(errors="ignore").encode()),
                ("dlq.topic", self.topic.encode()),
                ("dlq.partition", str(rec.partition).encode()),
                ("dlq.offset", str(rec.offset).encode()),
                ("dlq.group", self.group_id.encode()),
            ]
            if why.positions:
                headers.append(("dlq.items", ",".join(map(str, why.positions)).encode()))
            value = why.value if why.value is not None else (rec.value or b"")
            messages.append(Outgoing(rec.key, value, tuple(headers)))
        await self.stream.publish_retrying(target, messages)
        MESSAGES_DEAD_LETTERED.labels(self.topic, self.group_id).inc(len(rejected))
        for rec, why in rejected[:20]:
            log.warning(
                "message dead-lettered",
                extra={"topic": self.topic, "partition": rec.partition, "offset": rec.offset, "reason": why.reason},
            )

    async def _commit(self, consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # The group rebalanced under us: the new owner re-reads these records, and the handlers'
            # deduplication makes that harmless.
            log.warning("offset commit failed; the batch will be re-read", extra={"error": repr(exc)})


class Stream:
    """The process's broker: publishing, the service's subscribers, their DLQs, the AsyncAPI document."""

    def __init__(
        self,
        bootstrap_servers: str,
        client_id: str,
        *,
        title: str = "billing",
        version: str = "0.1.0",
        description: str = "",
        graceful_timeout: float = 60.0,
    ) -> None:
        self.broker = KafkaBroker(
            bootstrap_servers,
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=1024 * 1024,
            max_request_size=4 * 1024 * 1024,
            request_timeout_ms=30_000,
            partitioner=_ShardPartitioner(),
            allow_auto_create_topics=False,
            graceful_timeout=graceful_timeout,
            serializer=_DocumentedSerializer(),
            logger=log,
            log_level=logging.DEBUG,
            description=description,
        )
        self.bootstrap_servers = bootstrap_servers
        self.title, self.version, self.description = title, version, description
        self.subscriptions: list[_Subscription] = []
        self._publishers: dict[str, Any] = {}
        self._stopping = asyncio.Event()
        self.started = False
        self.last_batch_at: float | None = None

    # -- declaring --------------------------------------------------------------------------------

    def subscribe(
        self,
        topic: str,
        *,
        group_id: str,
        model: type[BaseModel],
        decode: Decoder,
        handler: Handler,
        title: str,
        description: str,
        max_records: int = 500,
        timeout_ms: int = 100,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        """Consume ``topic`` in ``group_id`` in batches of up to ``max_records`` messages, documented as
        carrying ``model``; register before ``start``."""
        sub = _Subscription(self, topic, group_id, decode, handler, max_message_bytes)
        listener = _FinishBeforeRevoke(sub.lock)

        async def consume(body: Any, message: KafkaMessage) -> None:
            await sub(message)

        # The first parameter's annotation is what the AsyncAPI document shows as the payload.
        consume.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model),
                inspect.Parameter("message", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=KafkaMessage),
            ]
        )
        consume.__annotations__ = {"body": model, "message": KafkaMessage, "return": None}
        consume.__name__ = f"consume_{topic.replace('.', '_').replace('-', '_')}"
        self.broker.subscriber(
            topic,
            group_id=group_id,
            batch=True,
            max_records=max_records,
            batch_timeout_ms=timeout_ms,
            ack_policy=AckPolicy.MANUAL,
            auto_offset_reset="earliest",
            listener=listener,
            decoder=_passthrough,
            max_partition_fetch_bytes=1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # A member that died holds its partitions until its session expires (a restarted one waits
            # for that rebalance too): 10 s rather than 30. Heartbeats are aiokafka's own task, so a
            # long batch does not miss them; only an event loop blocked for 10 s would.
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            max_poll_interval_ms=300_000,
            title=topic,
            description=description,
        )(consume)
        self.subscriptions.append(sub)

    def publishes(self, topic: str, model: type[BaseModel] | None, description: str) -> None:
        """Declare (and document) that this service publishes ``model`` messages to ``topic``."""
        self._publishers[topic] = self.broker.publisher(topic, schema=model, title=topic, description=description)

    def asyncapi(self) -> dict[str, Any]:
        """The AsyncAPI 3.0 document FastStream generates from the declared subscribers and publishers."""
        spec = AsyncAPI(self.broker, title=self.title, version=self.version, description=self.description)
        doc: dict[str, Any] = spec.to_specification().to_jsonable()
        return doc

    # -- running ----------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect the producer (publishing works from here on; nothing is consumed yet)."""
        await self.broker.connect()

    async def start(self) -> None:
        """Start the subscribers."""
        await self.broker.start()
        self.started = True

    async def stop_consuming(self) -> None:
        """Finish the batches in hand (each commits) and leave the groups; publishing still works."""
        self._stopping.set()
        for sub in self.broker.subscribers:
            await sub.stop()

    async def stop(self) -> None:
        """Stop consuming, then flush and close the producer."""
        self._stopping.set()
        await self.broker.stop()
        self.started = False

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def sleep_unless_stopping(self, seconds: float) -> bool:
        """Sleep ``seconds``; True (at once) if the service is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
            return True
        except TimeoutError:
            return False

    @property
    def running(self) -> bool:
        return self.started and all(s.running for s in self.broker.subscribers)

    async def publish(self, topic: str, messages: Iterable[Outgoing]) -> int:
        """Send ``messages`` and wait until the broker has acknowledged every one (so that a caller may
        then commit its input offsets or delete its outbox rows)."""
        target = self._publishers.get(topic)
        futures = []
        for m in messages:
            headers = {k: v.decode() for k, v in m.headers} or None
            if target is not None:
                fut = await target.publish(m.value, key=m.key, headers=headers, no_confirm=True)
            else:
                fut = await self.broker.publish(m.value, topic, key=m.key, headers=headers, no_confirm=True)
            futures.append(fut)
        if futures:
            await asyncio.gather(*futures)
            MESSAGES_PUBLISHED.labels(topic).inc(len(futures))
        return len(futures)

    async def publish_retrying(self, topic: str, messages: Sequence[Outgoing]) -> None:
        """``publish``, retried with backoff while the broker is away (not once the service stops)."""
        attempt = 0
        while True:
            try:
                await self.publish(topic, messages)
                return
            except TRANSIENT as exc:
                attempt += 1
                if self.stopping:
                    raise
                delay = retry_delay(attempt)
                log.warning(
                    "publish failed (transient); retrying",
                    extra={"topic": topic, "error": repr(exc), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)

    async def ping(self) -> None:
        """Raise unless the broker answers a metadata request."""
        if not await self.broker.ping(timeout=3):
            raise ConnectionError("the Kafka broker does not answer")


class Publisher:
    """A producer alone, for tools, benchmarks and tests: a ``Stream`` without subscribers."""

    def __init__(self, bootstrap_servers: str, client_id: str) -> None:
        self._stream = Stream(bootstrap_servers, client_id)

    async def start(self) -> None:
        await self._stream.connect()

    async def stop(self) -> None:
        await self._stream.stop()

    async def publish(self, topic: str, messages: Iterable[Outgoing]) -> int:
        return await self._stream.publish(topic, messages)

    async def ping(self) -> None:
        await self._stream.ping()


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
