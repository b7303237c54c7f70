"""Every consumer fed garbage through the real broker: each bad message lands in its topic's DLQ with a
reason, nothing reaches the database, and the consumer keeps consuming (a valid message sent after the
garbage is processed)."""

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
from aiokafka import AIOKafkaConsumer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.app import create_app as api_app
from services.api.settings import ApiSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings
from shared import ids
from shared.contracts import ChargeComputed, EntryLine, MeasurementTaken, TransactionPosted
from shared.kafka import Outgoing, Publisher, encode
from shared.topics import CHARGES, READINGS, TRANSACTIONS, dlq

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 10, 5, 14, tzinfo=UTC)


def measurement() -> MeasurementTaken:
    return MeasurementTaken(
        id=ids.measurement_id(HOUR, "cfapps", "app-1"), reading_id=ids.reading_id(HOUR), reading_hour=HOUR,
        meter="cfapps", resource_id="app-1", org_id="org-1", space_id="space-1", value=512, unit="MB", taken_at=HOUR,
    )


def charge() -> ChargeComputed:
    m = ids.measurement_id(HOUR, "cfapps", "app-1")
    return ChargeComputed(
        id=ids.charge_id(m, 1), measurement_id=m, revision=1, reading_hour=HOUR, meter="cfapps", resource_id="app-1",
        org_id="org-1", space_id="space-1", value=512, unit="MB", status="unpriced", amount_numerator=0,
        amount_denominator=1, display_amount="0.000000", priced_at=HOUR,
    )


def transaction() -> TransactionPosted:
    customer = uuid.uuid4()
    return TransactionPosted(
        id=uuid.uuid4(), customer_id=customer, type="funding", occurred_at=HOUR, idempotency_key=f"fund:{customer}",
        entries=[EntryLine(account="funding", side="debit", amount=5), EntryLine(account=f"credit_pool:{customer}", side="credit", amount=5)],
        posted_at=HOUR,
    )


# Field-level corruptions of a valid message: (field, bad value).
CORRUPTIONS: dict[str, list[tuple[str, Any]]] = {
    "usage.measurement": [("value", -1), ("value", 2**70), ("value", "512"), ("schema_version", 2), ("schema_version", 0),
                          ("reading_hour", "2026-10-05T14:00:00"), ("meter", ""), ("unit", None), ("id", "not-a-uuid")],
    "usage.charge": [("revision", 0), ("status", "free"), ("amount_numerator", -3), ("amount_denominator", 0),
                     ("schema_version", 2), ("value", 2**70), ("priced_at", "yesterday"), ("measurement_id", 7)],
    "ledger.transaction": [("type", "gift"), ("schema_version", 2), ("entries", "none"), ("occurred_at", 12),
                           ("customer_id", "x"), ("posted_at", "2026-10-05T14:00:00")],
}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # the standard library writes integers of any size, as a producer could


def bad_payloads(valid: dict[str, Any], model: type) -> st.SearchStrategy[list[bytes]]:
    schema = valid["schema_name"]
    corrupted = st.sampled_from(CORRUPTIONS[schema]).map(lambda fv: dumps({**valid, fv[0]: fv[1]}))
    required = sorted(name for name, f in model.model_fields.items() if f.is_required())
    missing = st.sampled_from(required).map(lambda k: dumps({f: v for f, v in valid.items() if f != k}))
    extra = st.text(min_size=1, max_size=8).filter(lambda k: k not in valid).map(lambda k: dumps({**valid, k: 1}))
    garbage = st.binary(min_size=1, max_size=200).filter(lambda b: not b.strip().startswith(b"{"))
    wrong_json = st.one_of(st.integers(), st.text(), st.lists(st.integers(), max_size=3), st.none()).map(dumps)
    return st.lists(st.one_of(corrupted, missing, extra, garbage, wrong_json), min_size=5, max_size=25)


@dataclass
class Case:
    name: str
    topic: str
    make_app: Callable[..., Any]
    settings: type
    role: str
    valid: Callable[[], Any]
    tables: tuple[str, ...]


CASES = [
    Case("pricer", READINGS, pricer_app, PricerSettings, "pricer", measurement, ("charges", "unpriced_charges", "charge_outbox")),
    Case("ledger", CHARGES, ledger_app, LedgerSettings, "ledger", charge, ("charge_state", "held_charges", "transactions")),
    Case("api-charges", CHARGES, api_app, ApiSettings, "api", charge, ("charge",)),
    Case("api-transactions", TRANSACTIONS, api_app, ApiSettings, "api", transaction, ("ledger_transaction", "customer")),
]


async def counts(dsn: str, tables: tuple[str, ...]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
    finally:
        await conn.close()


async def read(kafka: str, topic: str, n: int, timeout: float = 40) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None,
                                fetch_max_bytes=8 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < n and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_garbage_goes_to_the_dlq_with_a_reason_and_changes_nothing(case: Case, infra, database, topic_prefix) -> None:
    valid_msg = case.valid()
    valid = orjson.loads(encode(valid_msg))
    batches: list[list[bytes]] = []

    @settings(max_examples=3, database=None, suppress_health_check=list(HealthCheck), deadline=None)
    @given(bad_payloads(valid, type(valid_msg)))
    def collect(payloads: list[bytes]) -> None:
        batches.append(payloads)

    collect()
    garbage = [p for batch in batches for p in batch]
    garbage.append(dumps({**valid, "description": "x" * 1_100_000}))  # over the 1 MB limit
    extra = {"ledger_url": "http://127.0.0.1:9", "pricer_url": "http://127.0.0.1:9", "collector_url": "http://127.0.0.1:9"} if case.role == "api" else {}
    s = case.settings(database_url=database.dsn(case.role), kafka_bootstrap_servers=infra.kafka, topic_prefix=topic_prefix,
                      batch_timeout_ms=50, **extra)
    app = case.make_app(s)
    topic = topic_prefix + case.topic
    pub = Publisher(infra.kafka, client_id="fuzz")
    await pub.start()
    try:
        async with app.router.lifespan_context(app):
            before = await counts(database.dsn(case.role), case.tables)
            await pub.publish(topic, [Outgoing(b"k", p) for p in garbage])
            dead = await read(infra.kafka, dlq(topic), len(garbage))
            after_garbage = await counts(database.dsn(case.role), case.tables)
            # The consumer keeps going: a valid message after the garbage is processed.
            await pub.publish(topic, [Outgoing(b"k", encode(valid_msg))])
            for _ in range(200):
                if (await counts(database.dsn(case.role), case.tables)) != after_garbage:
                    break
                await asyncio.sleep(0.1)
            after_valid = await counts(database.dsn(case.role), case.tables)
    finally:
        await pub.stop()
    lost = [p[-300:] for p in garbage if p not in {r.value for r in dead}]
    assert len(dead) == len(garbage), lost
    assert sorted(r.value for r in dead) == sorted(garbage)
    assert all(dict(r.headers).get("dlq.reason") for r in dead)
    assert after_garbage == before, "garbage changed the database"
    assert after_valid != after_garbage, "the consumer stopped consuming after the garbage"
