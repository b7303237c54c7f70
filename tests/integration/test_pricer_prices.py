"""The pricer's price catalog through its internal HTTP endpoints, on the real PostgreSQL (and Kafka for
the published charges): add, overlap, end, list, price boundaries at midnight America/New_York on the
days daylight-saving time starts and ends, and re-pricing of unpriced charges when a price arrives."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from starlette.applications import Starlette

from services.pricer import repository
from services.pricer.app import create_app
from services.pricer.handlers import CatalogBusyError, Pricer
from services.pricer.schemas import PriceIn
from services.pricer.service import Price
from services.pricer.settings import PricerSettings
from shared import ids
from shared.contracts import ChargeComputed, MeasurementTaken
from shared.kafka import Received
from shared.topics import CHARGES

pytestmark = pytest.mark.integration


@dataclass
class Running:
    app: Starlette
    http: httpx.AsyncClient
    pricer: Pricer
    charges_topic: str
    kafka: str


def settings(database: Any, infra: Any, topic_prefix: str) -> PricerSettings:
    return PricerSettings(
        database_url=database.dsn("pricer"),
        KAFKA_BOOTSTRAP_SERVERS=infra.kafka,
        KAFKA_TOPIC_PREFIX=topic_prefix,
        port=8082,
        maintenance_interval_seconds=3600,
    )


@pytest.fixture
async def running(infra, database, topic_prefix) -> AsyncIterator[Running]:
    app = create_app(settings(database, infra, topic_prefix))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pricer") as http:
            yield Running(app, http, app.state.runtime.state["pricer"], topic_prefix + CHARGES, infra.kafka)


def measurement(hour: datetime, resource: str, value: int, meter: str = "cfapps", kind: str = "") -> MeasurementTaken:
    return MeasurementTaken(
        id=ids.measurement_id(hour, meter, resource),
        reading_id=ids.reading_id(hour),
        reading_hour=hour,
        meter=meter,
        resource_id=resource,
        resource_kind=kind,
        org_id="org-1",
        value=value,
        unit="MB",
        taken_at=hour + timedelta(minutes=61),
    )


def received(ms: list[MeasurementTaken]) -> list[Received[MeasurementTaken]]:
    return [Received(m, m.resource_id.encode(), 0, i) for i, m in enumerate(ms)]


def price_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "meter": "cfapps",
        "resource_kind": "",
        "unit_of_measure": "MB-hour",
        "microcredits_per_unit": 1_000_000,
        "unit": 730 * 1024,
        "valid_from": "2026-01-01T00:00:00Z",
        "valid_until": None,
    }
    body.update(overrides)
    return body


async def read_charges(kafka: str, topic: str, expected: int, timeout: float = 20) -> list[ChargeComputed]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[ChargeComputed] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(ChargeComputed.model_validate_json(r.value) for r in recs)
    finally:
        await consumer.stop()
    return out


async def stored(running: Running) -> dict[uuid.UUID, dict[str, Any]]:
    """The latest stored revision per measurement."""
    async with running.app.state.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT DISTINCT ON (measurement_id) measurement_id, revision, price_id, amount_numerator,
                      amount_denominator FROM charges ORDER BY measurement_id, revision DESC"""
        )
    return {r["measurement_id"]: dict(r) for r in rows}


async def test_add_get_list_and_overlap(running: Running) -> None:
    r = await running.http.post("/internal/prices", json=price_body(valid_until="2026-02-01T00:00:00-05:00"))
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["valid_from"] == "2026-01-01T00:00:00Z"
    assert first["valid_until"] == "2026-02-01T05:00:00Z"
    assert first["microcredits_per_unit"] == 1_000_000 and first["unit"] == 730 * 1024

    got = await running.http.get(f"/internal/prices/{first['id']}")
    assert got.status_code == 200 and got.json()["id"] == first["id"]

    # Overlapping the same (meter, kind): refused with the conflicting price named.
    r = await running.http.post("/internal/prices", json=price_body(valid_from="2026-01-31T00:00:00Z", unit=1))
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["conflicts"] == [first["id"]]

    # Same range, another kind or meter: fine. Adjacent range of the same key: fine.
    assert (await running.http.post("/internal/prices", json=price_body(resource_kind="plan-a"))).status_code == 201
    assert (await running.http.post("/internal/prices", json=price_body(meter="cfservices", unit=730))).status_code == 201
    r = await running.http.post("/internal/prices", json=price_body(valid_from="2026-02-01T05:00:00Z", microcredits_per_unit=2))
    assert r.status_code == 201
    second = r.json()

    # Re-sending an identical price is answered with the existing one, not a second price.
    again = await running.http.post("/internal/prices", json=price_body(valid_from="2026-02-01T05:00:00Z", microcredits_per_unit=2))
    assert again.status_code == 200 and again.json()["id"] == second["id"]

    listed = (await running.http.get("/internal/prices", params={"meter": "cfapps", "resource_kind": ""})).json()["items"]
    assert [p["id"] for p in listed] == [first["id"], second["id"]]
    at_jan = (await running.http.get("/internal/prices", params={"meter": "cfapps", "at": "2026-01-15T00:00:00Z"})).json()
    assert {(p["resource_kind"], p["id"]) for p in at_jan["items"]} >= {("", first["id"])}
    assert second["id"] not in {p["id"] for p in at_jan["items"]}
    assert len((await running.http.get("/internal/prices")).json()["items"]) == 4


@pytest.mark.parametrize(
    "body",
    [
        price_body(unit=0),
        price_body(microcredits_per_unit=-1),
        price_body(meter=""),
        price_body(valid_from="2026-01-01T00:00:00"),  # naive: no time zone
        price_body(valid_until="2025-12-31T00:00:00Z"),  # ends before it starts
        price_body(valid_until="2026-01-01T00:00:00Z"),  # empty range
        price_body(microcredits_per_unit=1.5),
        {**price_body(), "surprise": 1},
    ],
)
async def test_bad_prices_are_422(running: Running, body: dict[str, Any]) -> None:
    r = await running.http.post("/internal/prices", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert (await running.http.get("/internal/prices")).json()["items"] == []


async def test_bad_query_parameters_are_422_and_unknown_price_404(running: Running) -> None:
    assert (await running.http.get("/internal/prices", params={"at": "yesterday"})).status_code == 422
    assert (await running.http.get("/internal/prices", params={"at": "2026-01-01T00:00:00"})).status_code == 422
    assert (await running.http.get("/internal/charges/unpriced", params={"limit": "0"})).status_code == 422
    for cursor in ["!!", "e30", "WzEsMl0", "WyJ4IiwieSJd"]:  # not base64, {}, [1,2], ["x","y"]
        assert (await running.http.get("/internal/charges/unpriced", params={"cursor": cursor})).status_code == 422
    for limit in ["²", "-1", "1001", "1e3"]:
        assert (await running.http.get("/internal/charges/unpriced", params={"limit": limit})).status_code == 422
    missing = uuid.uuid4()
    assert (await running.http.get(f"/internal/prices/{missing}")).status_code == 404
    r = await running.http.post(f"/internal/prices/{missing}/end", json={"at": "2026-03-01T00:00:00Z"})
    assert r.status_code == 404


async def test_end_a_price(running: Running) -> None:
    price = (await running.http.post("/internal/prices", json=price_body())).json()
    hour = datetime(2026, 1, 10, 12, tzinfo=UTC)
    await running.pricer.handle_readings(received([measurement(hour, "app-1", 1024)]))

    # Not before its start, and not before an hour it already priced.
    r = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-01T00:00:00Z"})
    assert r.status_code == 409
    r = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-10T12:00:00Z"})
    assert r.status_code == 409 and "2026-01-10T12:00:00" in r.json()["detail"]

    r = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-10T13:00:00Z"})
    assert r.status_code == 200, r.text
    assert r.json()["valid_until"] == "2026-01-10T13:00:00Z"
    # Ending it again at the same time is a no-op; later is refused (it would grow the range).
    assert (await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-10T13:00:00Z"})).status_code == 200
    assert (await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-11T00:00:00Z"})).status_code == 409

    # Without a restart, the next hour is unpriced now.
    later = measurement(hour + timedelta(hours=1), "app-1", 1024)
    await running.pricer.handle_readings(received([later]))
    assert (await stored(running))[later.id]["price_id"] is None
    # And the gap can be filled by a new price.
    r = await running.http.post("/internal/prices", json=price_body(valid_from="2026-01-10T13:00:00Z", microcredits_per_unit=3))
    assert r.status_code == 201 and r.json()["repriced_charges"] == 1


# Midnight in America/New_York, as UTC instants (EST is UTC-5, EDT is UTC-4). DST starts on
# 2026-03-08 at 02:00 local and ends on 2026-11-01 at 02:00 local.
MIDNIGHTS = {
    "2026-03-08 (DST starts that night)": datetime(2026, 3, 8, 5, tzinfo=UTC),  # 00:00 EST
    "2026-03-09 (first midnight in EDT)": datetime(2026, 3, 9, 4, tzinfo=UTC),  # 00:00 EDT
    "2026-11-01 (DST ends that night)": datetime(2026, 11, 1, 4, tzinfo=UTC),  # 00:00 EDT
    "2026-11-02 (first midnight in EST)": datetime(2026, 11, 2, 5, tzinfo=UTC),  # 00:00 EST
}


@pytest.mark.parametrize("day", list(MIDNIGHTS))
async def test_price_change_at_new_york_midnight_on_dst_days(running: Running, day: str) -> None:
    midnight_utc = MIDNIGHTS[day]
    local_midnight = {
        "2026-03-08 (DST starts that night)": "2026-03-08T00:00:00-05:00",
        "2026-03-09 (first midnight in EDT)": "2026-03-09T00:00:00-04:00",
        "2026-11-01 (DST ends that night)": "2026-11-01T00:00:00-04:00",
        "2026-11-02 (first midnight in EST)": "2026-11-02T00:00:00-05:00",
    }[day]
    old = (await running.http.post("/internal/prices", json=price_body(microcredits_per_unit=7, unit=3, valid_until=local_midnight))).json()
    new = (await running.http.post("/internal/prices", json=price_body(microcredits_per_unit=11, unit=5, valid_from=local_midnight))).json()
    assert old["valid_until"] == new["valid_from"] == midnight_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    # The three hours each side of the boundary, and the local 01:00-03:00 hours that DST skips or repeats.
    hours = [midnight_utc + timedelta(hours=k) for k in range(-3, 6)]
    ms = [measurement(h, "app-dst", 100 + i) for i, h in enumerate(hours)]
    await running.pricer.handle_readings(received(ms))
    charges = await stored(running)
    for m in ms:
        expected_price, mpu, unit = (old["id"], 7, 3) if m.reading_hour < midnight_utc else (new["id"], 11, 5)
        c = charges[m.id]
        assert str(c["price_id"]) == expected_price, m.reading_hour
        assert Fraction(c["amount_numerator"], c["amount_denominator"]) == Fraction(m.value * mpu, unit)


async def test_unpriced_charge_is_repriced_and_published_when_a_covering_price_is_added(running: Running) -> None:
    hour = datetime(2026, 4, 1, 3, tzinfo=UTC)
    kinds = ["plan-small", "plan-large"]
    ms = [measurement(hour + timedelta(hours=i), f"svc-{i}", 1, meter="cfservices", kind=kinds[i % 2]) for i in range(6)]
    await running.pricer.handle_readings(received(ms))

    page1 = (await running.http.get("/internal/charges/unpriced", params={"limit": 4})).json()
    page2 = (await running.http.get("/internal/charges/unpriced", params={"limit": 4, "cursor": page1["next_cursor"]})).json()
    assert page2["next_cursor"] is None
    listed = [ChargeComputed.model_validate(c) for c in page1["items"] + page2["items"]]
    assert sorted(c.measurement_id for c in listed) == sorted(m.id for m in ms)
    assert all(c.status == "unpriced" and c.revision == 1 and c.amount_numerator == 0 for c in listed)

    # A price for plan-small from hour+2: covers svc-2 and svc-4 only (svc-0 is before it).
    r = await running.http.post(
        "/internal/prices",
        json=price_body(meter="cfservices", resource_kind="plan-small", unit_of_measure="instance-hour",
                        microcredits_per_unit=1_000_000, unit=730, valid_from=(hour + timedelta(hours=2)).isoformat()),
    )
    assert r.status_code == 201, r.text
    assert r.json()["repriced_charges"] == 2
    covered = {ms[2].id, ms[4].id}

    published = await read_charges(running.kafka, running.charges_topic, expected=len(ms) + 2)
    revision2 = [c for c in published if c.revision == 2]
    assert {c.measurement_id for c in revision2} == covered
    for c in revision2:
        assert c.status == "priced" and str(c.price_id) == r.json()["id"]
        assert c.id == ids.charge_id(c.measurement_id, 2)
        assert Fraction(c.amount_numerator, c.amount_denominator) == Fraction(1_000_000, 730)
        assert c.display_amount == "0.001370"  # 1/730 credit
    still = (await running.http.get("/internal/charges/unpriced")).json()["items"]
    assert {uuid.UUID(c["measurement_id"]) for c in still} == {m.id for m in ms} - covered

    # The redelivered measurement publishes the stored revision 2, not a new revision 1.
    await running.pricer.handle_readings(received([ms[2]]))
    latest = (await stored(running))[ms[2].id]
    assert latest["revision"] == 2
    again = await read_charges(running.kafka, running.charges_topic, expected=len(ms) + 3)
    assert [c.revision for c in again if c.measurement_id == ms[2].id] == [1, 2, 2]


async def test_a_price_added_by_an_instance_that_died_is_repriced_by_another(running: Running) -> None:
    hour = datetime(2026, 6, 1, 0, tzinfo=UTC)
    m = measurement(hour, "svc-orphan", 2, meter="cfservices", kind="plan-x")
    await running.pricer.handle_readings(received([m]))
    assert (await stored(running))[m.id]["price_id"] is None
    # Another instance committed this price and died before re-pricing anything.
    orphan = Price(ids.uuid7(), "cfservices", "plan-x", "instance-hour", 10, 4, hour, None, hour)
    async with running.app.state.runtime.pool.acquire() as conn:
        await repository.insert_price(conn, orphan)
    # This instance's maintenance round notices the catalog moved and re-prices.
    assert await running.pricer.sweep_if_catalog_changed() == 1
    assert await running.pricer.sweep_if_catalog_changed() == 0
    latest = (await stored(running))[m.id]
    assert latest["revision"] == 2 and latest["price_id"] == orphan.id
    assert Fraction(latest["amount_numerator"], latest["amount_denominator"]) == Fraction(2 * 10, 4)
    published = await read_charges(running.kafka, running.charges_topic, expected=2)
    assert [(c.revision, c.status) for c in published] == [(1, "unpriced"), (2, "priced")]


async def test_a_price_change_waits_for_batches_in_flight_then_gives_up(running: Running) -> None:
    pricer = Pricer(running.app.state.runtime.pool, running.pricer._publisher, running.charges_topic, lock_timeout_ms=300)
    async with running.app.state.runtime.pool.acquire() as conn:
        async with conn.transaction():
            await repository.lock_catalog_shared(conn)  # a batch that takes its time
            with pytest.raises(CatalogBusyError):
                await pricer.add_price(PriceIn.model_validate(price_body()))
    assert (await running.http.get("/internal/prices")).json()["items"] == []
