"""Every consumer fed garbage through the real broker: the pricer (usage.readings.v2 batches and v1 single
readings), the ledger and the api (usage.charges.v2 batches) and the api's ledger consumer
(ledger.transactions.v1). Each bad message lands in its topic's DLQ with a reason (a batch refused as a
whole as it came; a batch whose items are all refused as those items, with ``dlq.items``), nothing reaches
the database, and the consumer keeps consuming (a valid message sent after the garbage is processed)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from services.api.app import create_app as api_app
from services.api.settings import ApiSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings
from shared import ids
from shared.batches import (
    Charges,
    Item,
    Price,
    Ref,
    charges_id,
    encode_charges,
    encode_measurements,
    measurement_batches,
    shard_of,
)
from shared.contracts import (
    ChargesComputed,
    EntryLine,
    MeasurementsTaken,
    MeasurementTaken,
    TransactionPosted,
)
from shared.kafka import Outgoing, Publisher
from shared.topics import CHARGES, READINGS, READINGS_V1, TRANSACTIONS, dlq

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 10, 5, 14, tzinfo=UTC)
STRANGER = next(r for r in (f"app-{i}" for i in range(2, 100)) if shard_of(r) != shard_of("app-1"))


def readings_batch() -> bytes:
    (b,) = measurement_batches(HOUR, "cfapps", "MB", [Item("app-1", "web", "org-1", "Org", "space-1", "dev", "", 512)],
                               reading_id=ids.reading_id(HOUR), taken_at=HOUR)
    return encode_measurements(b)


def reading_v1() -> bytes:
    return MeasurementTaken(
        id=ids.measurement_id(HOUR, "cfapps", "app-1"), reading_id=ids.reading_id(HOUR), reading_hour=HOUR,
        meter="cfapps", resource_id="app-1", org_id="org-1", space_id="space-1", value=512, unit="MB", taken_at=HOUR,
    ).model_dump_json().encode()


def charges_batch() -> bytes:
    """The reading's charge: priced, for an org no customer holds yet."""
    shard = shard_of("app-1")
    return encode_charges(Charges(
        id=charges_id(HOUR, "cfapps", shard, ["app-1"], [1]), reading_hour=HOUR, meter="cfapps", unit="MB",
        shard=shard, priced_at=HOUR, orgs=[Ref("org-1", "Org")], spaces=[Ref("space-1", "dev")], kinds=[""],
        prices=[Price(uuid.UUID(int=9), 1_000_000, 730)], resource_id=["app-1"], resource_name=["web"], org=[0],
        space=[0], kind=[0], value=[512], estimated=[False], revision=[1], price=[0], amount_numerator=[512_000_000],
        amount_denominator=[730],
    ))


def transaction() -> bytes:
    customer = uuid.uuid4()
    return TransactionPosted(
        id=uuid.uuid4(), customer_id=customer, type="funding", occurred_at=HOUR, idempotency_key=f"fund:{customer}",
        entries=[EntryLine(account="funding", side="debit", amount=5),
                 EntryLine(account=f"credit_pool:{customer}", side="credit", amount=5)],
        posted_at=HOUR,
    ).model_dump_json().encode()


# Corruptions of a valid message: (field, bad value) for the message, or (column, bad entry) for the one
# item of a batch (which leaves the batch no good item: nothing of it may reach the database).
CORRUPTIONS: dict[str, list[tuple[str, Any]]] = {
    "usage.measurement": [("value", -1), ("value", 2**70), ("value", "512"), ("schema_version", 2),
                          ("schema_version", 0), ("reading_hour", "2026-10-05T14:00:00"), ("meter", ""),
                          ("unit", None), ("id", "not-a-uuid"), ("reading_hour", "2026-10-05T14:30:00Z"),
                          ("id", str(uuid.UUID(int=5)))],
    "usage.measurements": [("schema_version", 1), ("shard", 24), ("shard", -1), ("reading_hour", "2026-10-05T14:00:00"),
                           ("reading_hour", "2026-10-05T14:30:00Z"), ("meter", ""), ("unit", None), ("id", "x"),
                           ("orgs", "none"), ("value", []), ("kinds", [""] * 5001)],
    "usage.charges": [("schema_version", 1), ("shard", 24), ("priced_at", "yesterday"), ("prices", [{"id": "x"}]),
                      ("revision", []), ("meter", ""), ("orgs", [{"id": "x" * 65}])],
    "ledger.transaction": [("type", "gift"), ("schema_version", 2), ("entries", "none"), ("occurred_at", 12),
                           ("customer_id", "x"), ("posted_at", "2026-10-05T14:00:00")],
}
ITEM_CORRUPTIONS: dict[str, list[tuple[str, Any]]] = {
    "usage.measurements": [("value", -1), ("value", 2**62 + 1), ("resource_id", STRANGER), ("resource_id", ""),
                           ("resource_id", "x" * 65), ("org", 3), ("space", -1), ("kind", 1),
                           ("resource_name", "é" * 513)],
    "usage.charges": [("value", -1), ("revision", 0), ("price", 1), ("price", -2), ("amount_numerator", -3),
                      ("amount_numerator", 2**62 + 1), ("amount_denominator", 0), ("price", -1),
                      ("resource_id", STRANGER), ("org", 1)],
}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # the standard library writes integers of any size, as a producer could


def bad_payloads(valid: dict[str, Any], model: type[BaseModel]) -> st.SearchStrategy[list[bytes]]:
    schema = valid["schema_name"]
    corrupted = st.sampled_from(CORRUPTIONS[schema]).map(lambda fv: dumps({**valid, fv[0]: fv[1]}))
    if schema in ITEM_CORRUPTIONS:
        item = st.sampled_from(ITEM_CORRUPTIONS[schema]).map(lambda fv: dumps({**valid, fv[0]: [fv[1]]}))
        corrupted = st.one_of(corrupted, item)
    required = sorted(name for name, f in model.model_fields.items() if f.is_required())
    missing = st.sampled_from(required).map(lambda k: dumps({f: v for f, v in valid.items() if f != k}))
    extra = st.text(min_size=1, max_size=8).filter(lambda k: k not in valid).map(lambda k: dumps({**valid, k: 1}))
    garbage = st.binary(min_size=1, max_size=200).filter(lambda b: not b.strip().startswith(b"{"))
    wrong_json = st.one_of(st.integers(), st.text(), st.lists(st.integers(), max_size=3), st.none()).map(dumps)
    return st.lists(st.one_of(corrupted, corrupted, missing, extra, garbage, wrong_json), min_size=5, max_size=25)


@dataclass
class Case:
    name: str
    topic: str
    make_app: Callable[..., Any]
    settings: type
    role: str
    valid: Callable[[], bytes]
    model: type[BaseModel]
    tables: tuple[str, ...]


PRICER_TABLES = ("charge_batches", "unpriced_shards", "priced_hours")
CASES = [
    Case("pricer-v2", READINGS, pricer_app, PricerSettings, "pricer", readings_batch, MeasurementsTaken, PRICER_TABLES),
    Case("pricer-v1", READINGS_V1, pricer_app, PricerSettings, "pricer", reading_v1, MeasurementTaken, PRICER_TABLES),
    Case("ledger", CHARGES, ledger_app, LedgerSettings, "ledger", charges_batch, ChargesComputed,
         ("shard_state", "held_shards", "transactions")),
    Case("api-charges", CHARGES, api_app, ApiSettings, "api", charges_batch, ChargesComputed,
         ("charge_shard", "usage_hour_group")),
    Case("api-transactions", TRANSACTIONS, api_app, ApiSettings, "api", transaction, TransactionPosted,
         ("ledger_transaction", "customer")),
]


async def counts(dsn: str, tables: tuple[str, ...]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
    finally:
        await conn.close()


async def read(kafka: str, topic: str, n: int, timeout: float = 40) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None,
                                fetch_max_bytes=8 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    out: list[ConsumerRecord] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < n and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_garbage_goes_to_the_dlq_with_a_reason_and_changes_nothing(
    case: Case, infra: Any, database: Any, topic_prefix: str
) -> None:
    valid_raw = case.valid()
    valid = orjson.loads(valid_raw)
    batches: list[list[bytes]] = []

    @settings(max_examples=3, database=None, suppress_health_check=list(HealthCheck), deadline=None)
    @given(bad_payloads(valid, case.model))
    def collect(payloads: list[bytes]) -> None:
        batches.append(payloads)

    collect()
    garbage = [p for batch in batches for p in batch]
    # Every corruption once, besides what was drawn.
    schema = valid["schema_name"]
    garbage += [dumps({**valid, f: v}) for f, v in CORRUPTIONS[schema]]
    garbage += [dumps({**valid, f: [v]}) for f, v in ITEM_CORRUPTIONS.get(schema, [])]
    garbage.append(dumps({**valid, "description": "x" * 1_100_000}))  # over the 1 MB limit
    extra: dict[str, Any] = {}
    if case.role == "api":
        extra = {"ledger_url": "http://127.0.0.1:9", "pricer_url": "http://127.0.0.1:9",
                 "collector_url": "http://127.0.0.1:9"}
    s = case.settings(database_url=database.dsn(case.role), kafka_bootstrap_servers=infra.kafka,
                      topic_prefix=topic_prefix, batch_timeout_ms=50, **extra)
    app = case.make_app(s)
    topic = topic_prefix + case.topic
    pub = Publisher(infra.kafka, client_id="fuzz")
    await pub.start()
    try:
        async with app.router.lifespan_context(app):
            before = await counts(database.dsn(case.role), case.tables)
            await pub.publish(topic, [Outgoing(b"k", p) for p in garbage])
            dead = await read(infra.kafka, dlq(topic), len(garbage))
            await asyncio.sleep(0.5)  # anything the garbage did to the database, it has done by now
            after_garbage = await counts(database.dsn(case.role), case.tables)
            # The consumer keeps going: a valid message after the garbage is processed.
            await pub.publish(topic, [Outgoing(b"k", valid_raw)])
            for _ in range(200):
                if (await counts(database.dsn(case.role), case.tables)) != after_garbage:
                    break
                await asyncio.sleep(0.1)
            after_valid = await counts(database.dsn(case.role), case.tables)
    finally:
        await pub.stop()
    # One key: one partition, the garbage at offsets 0 .. n-1. Every one of them has its dead letter.
    headers = [dict(r.headers) for r in dead]
    assert len(dead) == len(garbage), [g[:200] for g in garbage if g not in {r.value for r in dead}]
    assert sorted(int(h["dlq.offset"]) for h in headers) == list(range(len(garbage)))
    assert all(h.get("dlq.reason") for h in headers)
    for record, h in zip(dead, headers, strict=True):
        sent = garbage[int(h["dlq.offset"])]
        if "dlq.items" in h:  # the batch's items refused one by one: the value is a batch of that item
            assert h["dlq.items"] == b"0" and h["dlq.reason"].startswith(b"item 0: ")
            assert json.loads(record.value)["resource_id"] == json.loads(sent)["resource_id"]
        else:
            assert record.value == sent  # refused whole: the original bytes
    assert after_garbage == before, "garbage changed the database"
    assert after_valid != after_garbage, "the consumer stopped consuming after the garbage"
