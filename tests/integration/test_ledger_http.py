"""The ledger as a whole service on the real broker and database: its internal HTTP commands (validation,
problem documents, 404s, pagination), the usage.charges.v2 consumer, and what it publishes (transactions,
statements, alerts; refused items of a batch to the DLQ, each as a batch of its own), the held charges'
listing paged by (hour, meter, shard, org, resource), the completeness counts, and the outbox left behind
by a crash."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from services.ledger.app import MIGRATIONS, create_app
from services.ledger.service import LedgerService
from services.ledger.settings import LedgerSettings
from shared.batches import Charges, read_as_written, shard_key, shard_of
from shared.contracts import AlertRaised, ChargesComputed, StatementIssued, TransactionPosted
from shared.db import create_pool, migrate
from shared.topics import ALERTS, CHARGES, TRANSACTIONS, dlq
from tests.support.ledger import (  # noqa: F401  (fixture)
    PRICE_A,
    assert_books_hold,
    charges_batch,
    item,
    ledger_topics,
    publish_charges,
    resources_of_shard,
)
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def settings_for(database: Any, infra: Any, topic_prefix: str, issuer: LocalIssuer) -> LedgerSettings:
    return LedgerSettings(
        oidc_issuer=issuer.url,
        database_url=database.dsn("ledger"),
        kafka_bootstrap_servers=infra.kafka,
        topic_prefix=topic_prefix,
        port=8083,
        periodic_interval_seconds=0,
        batch_timeout_ms=100,
    )


@asynccontextmanager
async def running(settings: LedgerSettings, issuer: LocalIssuer) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger", headers=issuer.bearer()) as client:
            yield client
        await assert_books_hold(app.state.runtime.pool)


@pytest.fixture
async def client(
    database: Any, infra: Any, ledger_topics: str, issuer: LocalIssuer
) -> AsyncIterator[httpx.AsyncClient]:
    async with running(settings_for(database, infra, ledger_topics, issuer), issuer) as c:
        yield c


async def read_topic(
    bootstrap: str, topic: str, done: Callable[[list[ConsumerRecord]], bool], timeout: float = 30
) -> list[ConsumerRecord]:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: list[ConsumerRecord] = []  # type: ignore[type-arg]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(records) and loop.time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def posted(records: list[ConsumerRecord]) -> list[TransactionPosted | StatementIssued]:  # type: ignore[type-arg]
    out: list[TransactionPosted | StatementIssued] = []
    for r in records:
        if b'"ledger.statement"' in r.value:
            out.append(StatementIssued.model_validate_json(r.value))
        else:
            out.append(TransactionPosted.model_validate_json(r.value))
    return out


def is_problem(response: httpx.Response, status: int) -> bool:
    return response.status_code == status and response.headers["content-type"].startswith(PROBLEM)


async def make_customer(client: httpx.AsyncClient, credits: int = 1_000) -> str:
    tier = f"tier-{uuid.uuid4().hex[:6]}"
    assert (await client.post("/internal/tiers", json={"name": tier, "credits_per_period": credits})).status_code == 201
    response = await client.post("/internal/customers", json={"name": "Agency of Tests", "tier": tier})
    assert response.status_code == 201
    return str(response.json()["id"])


async def test_commands_validate_their_input_and_answer_problem_documents(client: httpx.AsyncClient) -> None:
    assert is_problem(await client.post("/internal/tiers", content=b"name=x"), 415)
    assert is_problem(await client.post("/internal/tiers", json={"name": "t"}), 422)
    assert is_problem(await client.post("/internal/tiers", json={"name": "t", "credits_per_period": 0}), 422)
    assert is_problem(await client.post("/internal/tiers", json={"name": "t", "credits_per_period": 1.5}), 422)
    assert is_problem(await client.post("/internal/tiers", json={"name": "t", "credits_per_period": 5, "x": 1}), 422)
    assert is_problem(await client.post("/internal/tiers", json={"name": "bad/name", "credits_per_period": 5}), 422)
    created = await client.post("/internal/tiers", json={"name": "standard", "credits_per_period": 5_000_000})
    assert created.status_code == 201 and created.json()["credits_per_period"] == 5_000_000
    assert is_problem(await client.post("/internal/tiers", json={"name": "standard", "credits_per_period": 5}), 409)

    assert is_problem(await client.post("/internal/customers", json={"name": "A", "tier": "nope"}), 404)
    assert is_problem(await client.post("/internal/customers", json={"name": "", "tier": "standard"}), 422)
    customer = (await client.post("/internal/customers", json={"name": "A", "tier": "standard"})).json()
    uuid.UUID(customer["id"])
    fetched = await client.get(f"/internal/customers/{customer['id']}")
    assert fetched.status_code == 200 and fetched.json()["name"] == "A" and fetched.json()["tier"] == "standard"
    assert is_problem(await client.get("/internal/customers/not-a-uuid"), 422)  # a malformed id: invalid-parameter
    assert is_problem(await client.get(f"/internal/customers/{uuid.uuid4()}"), 404)

    org = {"org_id": "org-1", "customer_id": customer["id"], "starts_at": "2026-01-01T00:00:00Z"}
    assert is_problem(
        await client.post("/internal/org-assignments", json=org | {"starts_at": "2026-01-01T00:00:00"}), 422
    )
    assert is_problem(
        await client.post("/internal/org-assignments", json=org | {"customer_id": str(uuid.uuid4())}), 404
    )
    assert (await client.post("/internal/org-assignments", json=org)).status_code == 201
    assert is_problem(await client.post("/internal/org-assignments", json=org), 409)
    listed = (await client.get("/internal/org-assignments", params={"org_id": "org-1"})).json()
    assert [(a["org_id"], a["customer_id"], a["starts_at"]) for a in listed["items"]] == [
        ("org-1", customer["id"], "2026-01-01T00:00:00Z")
    ]

    agreement = {"customer_id": customer["id"], "starts_at": "2026-02-01T05:00:00Z", "ends_at": "2027-02-01T05:00:00Z"}
    assert is_problem(
        await client.post("/internal/agreements", json=agreement | {"ends_at": "2026-01-01T00:00:00Z"}), 422
    )
    assert is_problem(await client.post("/internal/agreements", json=agreement | {"credits": -1}), 422)
    assert is_problem(
        await client.post("/internal/agreements", json=agreement | {"customer_id": str(uuid.uuid4())}), 404
    )
    made = await client.post("/internal/agreements", json=agreement)
    assert made.status_code == 201 and made.json()["credits"] == 5_000_000  # the tier's default
    listed = (await client.get("/internal/agreements", params={"customer_id": customer["id"]})).json()["items"]
    assert [a["id"] for a in listed] == [made.json()["id"]] and listed[0]["remaining"] == 5_000_000
    assert is_problem(await client.get("/internal/agreements", params={"customer_id": "x"}), 422)

    assert is_problem(await client.post("/internal/months/2026-13/close"), 422)
    assert is_problem(await client.post("/internal/months/26-01/close"), 422)
    assert is_problem(await client.post("/internal/months/2099-01/close"), 422)  # beyond the edge's window
    assert is_problem(await client.post(f"/internal/months/{datetime.now(UTC).year + 1}-01/close"), 409)
    closed = await client.post("/internal/months/2026-02/close")
    assert closed.status_code == 201 and closed.json()["statements"] == 1
    again = await client.post("/internal/months/2026-02/close")
    assert again.status_code == 200 and again.json()["already_closed"] is True
    # What a closed month accepts: no funding in or before it, no assignment taking its usage from org-1's
    # customer (README, "What a closed month accepts"); refused as problems, changing nothing.
    other = await make_customer(client)
    for path, body in (
        ("/internal/org-assignments", org | {"customer_id": other, "starts_at": "2026-02-10T00:00:00Z"}),
        ("/internal/agreements", agreement | {"starts_at": "2026-01-15T00:00:00Z"}),
    ):
        refused = await client.post(path, json=body)
        assert is_problem(refused, 409) and refused.json()["title"] == "Month closed", refused.text
        assert refused.json()["detail"].startswith("2026-02 is closed")
    listed = (await client.get("/internal/org-assignments", params={"org_id": "org-1"})).json()
    assert [a["customer_id"] for a in listed["items"]] == [customer["id"]]
    assert len((await client.get("/internal/agreements", params={"customer_id": customer["id"]})).json()["items"]) == 1
    statement = await client.get(f"/internal/customers/{customer['id']}/statements/2026-02")
    assert statement.status_code == 200
    assert (statement.json()["opening_balance"], statement.json()["funded"], statement.json()["closing_balance"]) == (
        0,
        5_000_000,
        5_000_000,
    )
    assert is_problem(await client.get(f"/internal/customers/{customer['id']}/statements/2026-03"), 404)
    assert is_problem(await client.get(f"/internal/customers/{customer['id']}/statements/March"), 422)

    assert is_problem(await client.post(f"/internal/transactions/{uuid.uuid4()}/reverse"), 404)
    assert is_problem(await client.post("/internal/transactions/nope/reverse"), 422)
    funding_id = made.json()["funding_transaction_id"]
    reversed_ = await client.post(f"/internal/transactions/{funding_id}/reverse", json={"reason": "signed in error"})
    assert reversed_.status_code == 201 and reversed_.json()["reverses"] == funding_id
    assert (await client.post(f"/internal/transactions/{funding_id}/reverse")).status_code == 200
    assert is_problem(await client.post(f"/internal/transactions/{reversed_.json()['id']}/reverse"), 409)

    balance = await client.get(f"/internal/customers/{customer['id']}/balance")
    assert balance.status_code == 200 and balance.json()["funded"] == 0 and balance.json()["remaining"] == 0
    before = await client.get(f"/internal/customers/{customer['id']}/balance", params={"as_of": "2026-03-01T00:00:00Z"})
    assert before.json()["funded"] == 5_000_000
    assert is_problem(
        await client.get(f"/internal/customers/{customer['id']}/balance", params={"as_of": "yesterday"}), 422
    )
    assert is_problem(
        await client.get(f"/internal/customers/{customer['id']}/balance", params={"as_of": "2026-03-01T00:00:00"}), 422
    )
    assert (await client.post("/internal/expire-agreements")).json() == {"expired": 0}


async def test_lists_are_paginated_with_an_opaque_cursor(client: httpx.AsyncClient) -> None:
    for name in ("a-tier", "b-tier", "c-tier"):
        await client.post("/internal/tiers", json={"name": name, "credits_per_period": 1})
    first = (await client.get("/internal/tiers", params={"limit": 2})).json()
    assert [t["name"] for t in first["items"]] == ["a-tier", "b-tier"] and first["next_cursor"]
    second = (await client.get("/internal/tiers", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [t["name"] for t in second["items"]] == ["c-tier"] and second["next_cursor"] is None
    assert is_problem(await client.get("/internal/tiers", params={"limit": 0}), 422)
    assert is_problem(await client.get("/internal/customers", params={"cursor": "%%%"}), 422)


async def test_charges_are_posted_and_every_committed_fact_is_published(
    client: httpx.AsyncClient, infra: Any, ledger_topics: str
) -> None:
    topic_prefix = ledger_topics
    customer = await make_customer(client, credits=1_000)
    org = f"org-{uuid.uuid4().hex[:6]}"
    await client.post(
        "/internal/org-assignments", json={"org_id": org, "customer_id": customer, "starts_at": "2026-01-01T00:00:00Z"}
    )
    agreement = (
        await client.post(
            "/internal/agreements",
            json={"customer_id": customer, "starts_at": "2026-03-01T05:00:00Z", "ends_at": "2026-12-01T05:00:00Z"},
        )
    ).json()
    hour = datetime(2026, 3, 10, 14, tzinfo=UTC)
    app_1, unpriced, repeated = resources_of_shard(5, 3)
    stray = resources_of_shard(6, 1)[0]  # of another shard than the batch says
    apps = charges_batch(
        hour,
        [
            item(org, Fraction(1201, 2), resource=app_1, denominator=1000),
            item(org, 5, resource=unpriced, price_id=None),  # refused: unpriced with an amount
            item(org, 9, resource=stray),  # refused: another shard
            item(org, 1, resource=repeated),
            item(org, 1, resource=repeated),  # the same measurement twice counts once
        ],
        shard=5,
    )
    services = charges_batch(
        hour, [item(org, 0, resource="db-1", kind="plan-small", price_id=None)], meter="cfservices"
    )
    await publish_charges(infra.kafka, topic_prefix, [apps, services, apps])  # and the whole batch again

    def usage_seen(records: list[ConsumerRecord]) -> bool:  # type: ignore[type-arg]
        return any(isinstance(m, TransactionPosted) and m.type == "usage" for m in posted(records))

    records = await read_topic(infra.kafka, topic_prefix + TRANSACTIONS, usage_seen)
    messages = posted(records)
    assert all(r.key == customer.encode() for r in records)
    funding = [m for m in messages if isinstance(m, TransactionPosted) and m.type == "funding"]
    usage = [m for m in messages if isinstance(m, TransactionPosted) and m.type == "usage"]
    assert len(funding) == 1 and funding[0].occurred_at == datetime(2026, 3, 1, 5, tzinfo=UTC)
    assert len(usage) == 1
    tx = usage[0]
    assert str(tx.customer_id) == customer and tx.reading_hour == hour and tx.occurred_at == hour
    assert [(u.org_id, u.meter, u.resource_kind, u.price_id, u.microcredits) for u in tx.usage] == [
        (org, "cfapps", "", PRICE_A, 601)  # floor(1201/2 + 1)
    ]
    assert {(e.account, e.side, e.amount) for e in tx.entries} == {
        ("usage", "credit", 601),
        (f"credit_pool:{agreement['id']}", "debit", 601),
    }
    assert tx.idempotency_key.startswith(f"usage:{customer}:")

    # The refused items, each in the DLQ alone (once per delivery of their batch), with their reason and
    # position; the value is a batch of just that item, the rest of the message as it was.
    dead = await read_topic(infra.kafka, dlq(topic_prefix + CHARGES), lambda r: len(r) >= 4)
    assert len(dead) == 4
    refused: dict[str, tuple[bytes, Charges]] = {}
    for record in dead:
        headers = dict(record.headers)
        assert record.key == shard_key(5) and headers["dlq.topic"] == (topic_prefix + CHARGES).encode()
        alone = read_as_written(record.value, Charges)
        assert (alone.id, alone.shard, alone.reading_hour, alone.orgs) == (apps.id, 5, hour, apps.orgs)
        refused[headers["dlq.items"].decode()] = (headers["dlq.reason"], alone)
    assert sorted(refused) == ["1", "2"]
    reason, alone = refused["1"]
    assert reason == b"item 1: unpriced with a non-zero amount"
    assert (alone.resource_id, alone.price, alone.amount_numerator) == ([unpriced], [-1], [5])
    reason, alone = refused["2"]
    assert reason == f"item 2: resource {stray} belongs to shard {shard_of(stray)}, not 5".encode()
    assert (alone.resource_id, alone.amount_numerator, alone.amount_denominator) == ([stray], [9], [1])
    ChargesComputed.model_validate_json(msgspec.json.encode(alone))  # a message the contract accepts

    alerts = await read_topic(infra.kafka, topic_prefix + ALERTS, lambda r: len(r) >= 1)
    assert [AlertRaised.model_validate_json(r.value).threshold_percent for r in alerts] == [50]

    assert (await client.post("/internal/months/2026-03/close")).status_code == 201
    records = await read_topic(
        infra.kafka, topic_prefix + TRANSACTIONS, lambda r: any(isinstance(m, StatementIssued) for m in posted(r))
    )
    statements = [m for m in posted(records) if isinstance(m, StatementIssued)]
    assert [(s.month, s.opening_balance, s.funded, s.used, s.closing_balance) for s in statements] == [
        ("2026-03", 0, 1_000, 601, 399)
    ]
    balance = (await client.get(f"/internal/customers/{customer}/balance")).json()
    assert (balance["funded"], balance["used"], balance["remaining"]) == (1_000, 601, 399)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_held_charges_are_listed_by_page_then_posted_when_their_org_is_assigned(
    client: httpx.AsyncClient, infra: Any, ledger_topics: str
) -> None:
    topic_prefix = ledger_topics
    customer = await make_customer(client)
    orgs = sorted(f"org-{uuid.uuid4().hex[:6]}" for _ in range(2))
    hours = [datetime(2026, 6, 1, 12, tzinfo=UTC), datetime(2026, 6, 1, 13, tzinfo=UTC)]
    # Per org, three resources of shard 3 and two of shard 17 (amounts 7, 8, 9 and 7, 8), both hours.
    in_3, in_17 = resources_of_shard(3, 6), resources_of_shard(17, 4)
    resources = {orgs[0]: (in_3[:3], in_17[:2]), orgs[1]: (in_3[3:], in_17[2:])}
    batches = [
        charges_batch(hour, [item(org, 7 + i, resource=r) for org in orgs for i, r in enumerate(resources[org][n])])
        for hour in hours
        for n in (0, 1)
    ]
    await publish_charges(infra.kafka, topic_prefix, batches)
    wanted = sorted(
        (iso(hour), shard_of(r), org, r) for hour in hours for org in orgs for rs in resources[org] for r in rs
    )
    assert len(wanted) == 20
    for _ in range(100):
        if len((await client.get("/internal/held", params={"limit": 1000})).json()["items"]) == len(wanted):
            break
        await asyncio.sleep(0.1)
    # Page by page (3 at a time: pages end inside a shard's row and between orgs): each charge once, in
    # (hour, meter, shard, org, resource) order.
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": 3}
    while True:
        page = (await client.get("/internal/held", params=params)).json()
        pages.append(page["items"])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert [len(p) for p in pages] == [3] * 6 + [2]
    listed = [h for p in pages for h in p]
    assert [(h["reading_hour"], shard_of(h["resource_id"]), h["org_id"], h["resource_id"]) for h in listed] == wanted
    assert {(h["meter"], h["revision"], h["price_id"], h["amount_denominator"]) for h in listed} == {
        ("cfapps", 1, str(PRICE_A), 1)
    }
    # A cursor is the service's own: bound to its query, each position checked. One it issued works; the same
    # positions changed (a shard out of range, a number as text, too few), or made by hand, are refused.
    issued = (await client.get("/internal/held", params={"limit": 3})).json()["next_cursor"]
    assert (await client.get("/internal/held", params={"cursor": issued})).status_code == 200
    doc = json.loads(base64.urlsafe_b64decode(issued + "=" * (-len(issued) % 4)))
    well_formed = doc["p"]
    assert well_formed[2] == 3 and well_formed[0] == hours[0].isoformat().replace("+00:00", "Z")
    for bad in (["x"], [1, 2], [*well_formed[:2], 24, *well_formed[3:]], [*well_formed[:2], "3", *well_formed[3:]]):
        for forged in (cursor({"s": doc["s"], "p": bad}), cursor(bad)):
            assert is_problem(await client.get("/internal/held", params={"cursor": forged}), 422), bad
    assert is_problem(await client.get("/internal/held", params={"cursor": "%%%"}), 422)

    async def completeness(since: str, until: str) -> list[tuple[str, str, int, int, int]]:
        answer = await client.get("/internal/completeness", params={"from": since, "to": until})
        assert answer.status_code == 200
        return [(c["hour"], c["meter"], c["posted"], c["held"], c["revisions"]) for c in answer.json()["items"]]

    assert await completeness("2026-06-01T12:00:00Z", "2026-06-01T14:00:00Z") == [
        ("2026-06-01T12:00:00Z", "cfapps", 0, 10, 10),
        ("2026-06-01T13:00:00Z", "cfapps", 0, 10, 10),
    ]

    # Assigned from 12:30: that org's 13:00 charges are posted, the rest stay held.
    assigned = await client.post(
        "/internal/org-assignments",
        json={"org_id": orgs[0], "customer_id": customer, "starts_at": "2026-06-01T12:30:00Z"},
    )
    assert assigned.status_code == 201 and assigned.json()["held_charges_posted"] == 5
    left = (await client.get("/internal/held", params={"limit": 1000})).json()["items"]
    assert [(h["reading_hour"], shard_of(h["resource_id"]), h["org_id"], h["resource_id"]) for h in left] == [
        w for w in wanted if (w[0], w[2]) != (iso(hours[1]), orgs[0])
    ]
    balance = (await client.get(f"/internal/customers/{customer}/balance")).json()
    assert (balance["used"], balance["remaining"]) == (7 + 8 + 9 + 7 + 8, -39)
    assert await completeness("2026-06-01T13:00:00Z", "2026-06-01T14:00:00Z") == [
        ("2026-06-01T13:00:00Z", "cfapps", 5, 5, 10)
    ]


async def test_messages_committed_but_not_published_before_a_crash_are_published_on_start(
    database: Any, infra: Any, ledger_topics: str, issuer: LocalIssuer
) -> None:
    topic_prefix = ledger_topics
    settings = settings_for(database, infra, topic_prefix, issuer)
    pool = await create_pool(settings.database_url.get_secret_value(), "ledger")
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "ledger", MIGRATIONS)
        # The service commits the funding with its message in the outbox; the process "crashes" before
        # anything is published (nothing publishes here).
        service = LedgerService(pool, settings)
        await service.create_tier("t", 10)
        customer = (await service.create_customer("A", "t")).body["id"]
        made = await service.create_agreement(
            customer, datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC), None
        )
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 1
    finally:
        await pool.close()
    assert await read_topic(infra.kafka, topic_prefix + TRANSACTIONS, lambda r: False, timeout=1) == []

    async with running(settings, issuer) as client:
        records = await read_topic(infra.kafka, topic_prefix + TRANSACTIONS, lambda r: len(r) >= 1)
        assert [TransactionPosted.model_validate_json(r.value).id for r in records] == [
            made.body["funding_transaction_id"]
        ]
        ready = await client.get("/readyz")
        assert ready.status_code == 200
    pool = await create_pool(settings.database_url.get_secret_value(), "ledger")
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await pool.close()
