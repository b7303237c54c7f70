"""The pricer's and the collector's commands (shared/commands.py) on the real database and broker: a price
added, a price ended and a manual reading taken, each sent again with its Idempotency-Key (the first answer
lost) and sent concurrently, happen once: one price row, the charges it re-priced stored once, one reading
and its batches once; and each is in the service's audit trail with its actor (the subject of the token
that sent it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from services.collector.app import create_app as collector_app
from services.collector.settings import CollectorSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings
from shared import ids
from shared.batches import Item, Measurements, measurement_batches
from shared.kafka import Received
from simulator import SimConfig
from tests.conftest import Database, Infra
from tests.sim_server import running_sim
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 10, 2, 3, tzinfo=UTC)
WORLD: dict[str, Any] = {"seed": 11, "orgs": 2, "spaces_per_org": 2, "apps": 30, "services": 10, "plans": 3}


def keyed(issuer: LocalIssuer, key: str, actor: str = "alice") -> dict[str, str]:
    """An Idempotency-Key sent by an admin whose token's subject is ``actor``."""
    return {"Idempotency-Key": key, **issuer.bearer(sub=actor)}


def price_body(**overrides: Any) -> dict[str, Any]:
    return {
        "meter": "cfapps", "resource_kind": "", "unit_of_measure": "MB-hour", "microcredits_per_unit": 1_000_000,
        "unit": 730 * 1024, "valid_from": "2026-01-01T00:00:00Z", "valid_until": None,
    } | overrides


def readings(hour: datetime, n: int) -> list[Received[Measurements]]:
    items = [Item(f"app-{i}", f"app {i}", "org-1", "Org", "space-1", "dev", "", 1024) for i in range(n)]
    ms = measurement_batches(hour, "cfapps", "MB", items, reading_id=ids.reading_id(hour),
                             taken_at=hour + timedelta(minutes=61))
    return [Received(m, b"shard-%d" % m.shard, 0, i) for i, m in enumerate(ms)]


@pytest.fixture
async def pricer(
    database: Database, infra: Infra, topic_prefix: str, issuer: LocalIssuer
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = PricerSettings(
        database_url=SecretStr(database.dsn("pricer")), kafka_bootstrap_servers=infra.kafka, topic_prefix=topic_prefix,
        port=8082, maintenance_interval_seconds=3600, oidc_issuer=issuer.url,
    )
    app = pricer_app(settings)
    transport = httpx.ASGITransport(app=app)
    admin = issuer.bearer()  # subject admin-1
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://p", headers=admin) as http,
    ):
        yield http, app


async def value(app: Any, sql: str, *args: Any) -> Any:
    async with app.state.runtime.pool.acquire() as conn:
        return await conn.fetchval(sql, *args)


async def test_a_price_added_and_ended_again_with_its_key_changes_the_catalog_once(
    pricer: tuple[httpx.AsyncClient, Any], issuer: LocalIssuer
) -> None:
    http, app = pricer
    # Unpriced charges the price will cover: adding it re-prices them into new charge batches, once.
    assert await app.state.runtime.state["pricer"].handle_readings(readings(HOUR, 20)) == []
    batches_before = await value(app, "SELECT count(*) FROM charge_batches")
    first = await http.post("/internal/prices", json=price_body(), headers=keyed(issuer, "p-add"))
    assert first.status_code == 201 and first.json()["repriced_charges"] == 20
    batches_after = await value(app, "SELECT count(*) FROM charge_batches")
    assert batches_after > batches_before
    again = await http.post("/internal/prices", json=price_body(), headers=keyed(issuer, "p-add"))
    assert (again.status_code, again.json()) == (201, first.json())  # not the 200 of "the same price existed"
    assert again.headers["idempotent-replayed"] == "true"
    assert await value(app, "SELECT count(*) FROM prices") == 1
    assert await value(app, "SELECT count(*) FROM charge_batches") == batches_after

    price_id = first.json()["id"]
    end = {"at": "2027-01-01T00:00:00Z"}
    ended = await http.post(f"/internal/prices/{price_id}/end", json=end, headers=keyed(issuer, "p-end"))
    ended_again = await http.post(f"/internal/prices/{price_id}/end", json=end, headers=keyed(issuer, "p-end"))
    assert ended.status_code == ended_again.status_code == 200 and ended.json() == ended_again.json()
    assert ended.json()["valid_until"] == "2027-01-01T00:00:00Z"
    assert ended_again.headers["idempotent-replayed"] == "true"

    other = await http.post(
        "/internal/prices", json=price_body(microcredits_per_unit=2), headers=keyed(issuer, "p-add")
    )
    assert other.status_code == 422 and other.json()["title"] == "Idempotency-Key reused"
    assert await value(app, "SELECT count(*) FROM prices") == 1

    trail = (await http.get("/internal/audit", params={"actor": "alice"})).json()["items"]
    assert [(e["kind"], e["status"], e["replay"]) for e in trail] == [
        ("pricer.price.add", 422, False),
        ("pricer.price.end", 200, True),
        ("pricer.price.end", 200, False),
        ("pricer.price.add", 201, True),
        ("pricer.price.add", 201, False),
    ]
    assert trail[-1]["body"] == price_body() and trail[-1]["service"] == "pricer"


async def test_concurrent_price_commands_with_one_key_add_one_price(
    pricer: tuple[httpx.AsyncClient, Any], issuer: LocalIssuer
) -> None:
    http, app = pricer
    body = price_body(meter="cfservices", unit_of_measure="instance-hour", unit=730)
    answers = await asyncio.gather(*(http.post("/internal/prices", json=body, headers=keyed(issuer, "p-race"))
                                     for _ in range(5)))
    statuses = [a.status_code for a in answers]
    assert 201 in statuses and set(statuses) <= {201, 409}, [a.text for a in answers]
    assert await value(app, "SELECT count(*) FROM prices") == 1
    # Two actors' equal keys are two commands: bob's overlapping price is refused by the catalog itself.
    bob = await http.post(
        "/internal/prices", json=body | {"microcredits_per_unit": 3}, headers=keyed(issuer, "p-race", "bob")
    )
    assert bob.status_code == 409 and bob.json()["title"] == "Price overlaps"


async def test_a_manual_reading_sent_again_with_its_key_is_taken_once(
    infra: Infra, database: Database, topic_prefix: str, issuer: LocalIssuer
) -> None:
    async with running_sim(SimConfig(**WORLD)) as (url, _):
        settings = CollectorSettings(
            database_url=SecretStr(database.dsn("collector")),
            kafka_bootstrap_servers=infra.kafka,
            topic_prefix=topic_prefix,
            cf_api_url=url,
            uaa_url=url,
            schedule_enabled=False,
            sim_time_header=True,
            per_page=50,
            oidc_issuer=issuer.url,
        )
        app = collector_app(settings)
        transport = httpx.ASGITransport(app=app)
        admin = issuer.bearer()  # subject admin-1
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://c", headers=admin) as c,
        ):
            body = {"hour": HOUR.isoformat()}
            first = await c.post("/internal/readings", json=body, headers=keyed(issuer, "r-1"))
            batches = await value(app, "SELECT count(*) FROM reading_batches WHERE hour = $1", HOUR)
            again = await c.post("/internal/readings", json=body, headers=keyed(issuer, "r-1"))
            plain = await c.post("/internal/readings", json=body)
            later = {"hour": (HOUR + timedelta(hours=1)).isoformat()}
            raced = await asyncio.gather(*(c.post("/internal/readings", json=later, headers=keyed(issuer, "r-2"))
                                           for _ in range(3)))
            readings_taken = await value(app, "SELECT count(*) FROM readings")
            batches_after = await value(app, "SELECT count(*) FROM reading_batches WHERE hour = $1", HOUR)
            trail = (await c.get("/internal/audit", params={"kind": "collector.reading.take"})).json()["items"]
    assert first.status_code == 201 and first.json()["status"] == "taken" and batches > 0
    assert (again.status_code, again.json()) == (201, first.json()) and again.headers["idempotent-replayed"] == "true"
    assert plain.status_code == 200 and plain.json()["status"] == "exists"  # without a key: the collector's own rule
    statuses = [r.status_code for r in raced]
    assert 201 in statuses and set(statuses) <= {201, 409}, [r.text for r in raced]
    assert readings_taken == 2 and batches_after == batches
    assert [(e["actor"], e["status"], e["replay"]) for e in trail][-3:] == [
        ("admin-1", 200, False), ("alice", 201, True), ("alice", 201, False)
    ]
    assert len(trail) == 6
