"""Dead-lettered measurements, counted per reading hour and meter for the completeness report.

A DLQ (``<topic>.dlq``, see ``shared.kafka``) holds the original bytes of each refused message, with the
reason and the consumer group that refused it in headers. It is read here from the beginning to the end
offsets it had when the count started, without a consumer group (nothing is committed, nothing joins a
group). Best effort by nature: a message is attributed to (hour, meter) from its JSON's ``reading_hour``
and ``meter`` (floored to the hour); one that is not JSON, or lacks them, is unattributed. A batch (the
v2 topics; refused items come as a batch of their own) counts each of its items. Each measurement counts
once (by (hour, meter, resource id); without a resource id, by the original record's topic, partition and
offset, so the same record dead-lettered again after a redelivery counts once).

A record whose ``dlq.reason`` starts with ``conflict:`` (``shared.batches.CONFLICT``) is a measurement
that arrived again with other content than the copy the consumer stores: it is counted apart, per
measurement, in ``conflicts_by_row`` (the stored copy is counted by its stage; the report flags the row).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.api.completeness import DeadLetterCounts, Key
from shared.batches import CONFLICT
from shared.clock import hour_floor
from shared.topics import CHARGES, CHARGES_V2, READINGS, READINGS_V1, dlq

__all__ = ["attribute", "count_for_report", "tally"]

log = logging.getLogger(__name__)


def attribute(value: bytes | None) -> tuple[Key, list[str | None]] | None:
    """((reading hour, meter), the resource id of each measurement it carries, None where it names none)
    of a dead-lettered value, or None when it names no reading hour with a zone and no meter."""
    if not value:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    hour_text, meter = doc.get("reading_hour"), doc.get("meter")
    if not isinstance(hour_text, str) or not isinstance(meter, str) or not meter or len(meter) > 64:
        return None
    try:
        moment = datetime.fromisoformat(hour_text)
        hour = hour_floor(moment)  # refuses a naive time
    except (ValueError, OverflowError):
        return None
    ids = doc.get("resource_id")
    if isinstance(ids, list):  # a batch: one measurement per item
        return (hour, meter), [r if isinstance(r, str) and len(r) <= 64 else None for r in ids[:100_000]]
    return (hour, meter), [ids if isinstance(ids, str) and len(ids) <= 64 else None]


def _position(record: Any) -> tuple[str, ...]:
    headers = {k: v for k, v in (record.headers or ())}
    original = tuple(headers.get(h, b"").decode(errors="replace") for h in ("dlq.topic", "dlq.partition", "dlq.offset"))
    if all(original):
        return ("record", *original)
    return ("dlq", str(record.partition), str(record.offset))


async def tally(
    bootstrap_servers: str,
    topic: str,
    groups: Iterable[str],
    start: datetime,
    end: datetime,
    timeout: float = 20.0,
) -> DeadLetterCounts:
    """Count the messages ``groups`` dead-lettered on ``topic``: distinct measurements per (hour, meter)
    for the hours in [start, end); the unattributed ones over the whole topic. Never raises for the
    broker: a topic that cannot be read (completely) comes back with ``complete`` False."""
    counts = DeadLetterCounts(topic=topic, groups=tuple(sorted(set(groups))))
    try:
        await asyncio.wait_for(_read(bootstrap_servers, topic, start, end, counts), timeout)
    except (TimeoutError, KafkaError, OSError) as exc:
        counts.complete = False
        counts.error = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc)[:200] or type(exc).__name__
        log.warning("dead-letter topic not read completely", extra={"topic": topic, "error": counts.error})
    return counts


async def _read(bootstrap_servers: str, topic: str, start: datetime, end: datetime, counts: DeadLetterCounts) -> None:
    partitions = await _partitions(bootstrap_servers, topic)
    if not partitions:
        return  # no such topic: nothing was dead-lettered there
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="api-completeness",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > begins[tp]}
        if not pending:
            return
        await consumer.seek_to_beginning(*pending)
        seen: set[tuple[str, ...]] = set()
        wanted = set(counts.groups)
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        counts.records += 1
                        _count(record, wanted, start, end, seen, counts)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()


async def _partitions(bootstrap_servers: str, topic: str) -> list[int]:
    """The topic's partitions ([] when it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="api-completeness")
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if not described or described[0].get("error_code"):
        return []
    return sorted(p["partition"] for p in described[0].get("partitions", []))


def _count(
    record: Any,
    wanted: set[str],
    start: datetime,
    end: datetime,
    seen: set[tuple[str, ...]],
    counts: DeadLetterCounts,
) -> None:
    headers = dict(record.headers or ())
    group = headers.get("dlq.group", b"").decode(errors="replace")
    if group not in wanted:
        return
    conflict = headers.get("dlq.reason", b"").startswith(CONFLICT.encode())
    found = attribute(record.value)
    if found is None:
        key = _position(record)
        if key not in seen:
            seen.add(key)
            counts.counted += 1
            counts.unattributed += 1
        return
    row, resources = found
    kind = "conflict" if conflict else "measurement"
    into = counts.conflicts_by_row if conflict else counts.by_row
    for n, rid in enumerate(resources):
        key = (kind, row[0].isoformat(), row[1], rid) if rid is not None else (*_position(record), str(n))
        if key in seen:
            continue
        seen.add(key)
        counts.counted += 1
        if start <= row[0] < end:
            into[row] = into.get(row, 0) + 1


async def count_for_report(
    bootstrap_servers: str, topic_of: Callable[[str], str], start: datetime, end: datetime
) -> tuple[list[DeadLetterCounts], list[DeadLetterCounts]]:
    """The DLQs the completeness report reconciles: ``usage.readings.v2.dlq`` and ``usage.readings.v1.dlq``
    as the pricer's group dead-lettered them, ``usage.charges.v3.dlq`` and ``usage.charges.v2.dlq`` (the
    ledger still reads v2 to drain it) as the ledger's (not the api's).
    ``topic_of`` is the deployment's ``settings.topic``: topics and groups carry its prefix (a group is
    also matched by its bare service name, as deployments before prefixed groups named them)."""
    pricer_groups, ledger_groups = {topic_of("pricer"), "pricer"}, {topic_of("ledger"), "ledger"}
    v2, v1, charges, charges_v2 = await asyncio.gather(
        tally(bootstrap_servers, dlq(topic_of(READINGS)), pricer_groups, start, end),
        tally(bootstrap_servers, dlq(topic_of(READINGS_V1)), pricer_groups, start, end),
        tally(bootstrap_servers, dlq(topic_of(CHARGES)), ledger_groups, start, end),
        tally(bootstrap_servers, dlq(topic_of(CHARGES_V2)), ledger_groups, start, end),
    )
    return [v2, v1], [charges, charges_v2]
