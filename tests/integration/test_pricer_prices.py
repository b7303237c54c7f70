"""The pricer's price catalog through its internal HTTP endpoints, on the real PostgreSQL (and Kafka for
the published charges): add, overlap (refused by the database's exclusion constraint), end (refused before
the last hour priced), list, price boundaries at midnight America/New_York on the days daylight-saving time
starts and ends, and re-pricing of unpriced charges when a covering price arrives: a new revision, stored
and published, carrying only the re-priced measurements; a redelivery publishes the stored batch again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from starlette.applications import Starlette

from services.pricer import repository
from services.pricer.app import create_app
from services.pricer.handlers import CatalogBusyError, Pricer
from services.pricer.pricing import Price
from services.pricer.schemas import PriceIn
from services.pricer.settings import PricerSettings
from shared import ids
from shared.batches import Charges, Item, Measurements, decode_charges, measurement_batches
from shared.contracts import ChargeComputed
from shared.kafka import Received
from shared.topics import CHARGES
from tests.support.documents import unpacked
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration


@dataclass
class Running:
    app: Starlette
    http: httpx.AsyncClient
    pricer: Pricer
    charges_topic: str
    kafka: str

    @property
    def pool(self) -> asyncpg.Pool:
        pool: asyncpg.Pool = self.app.state.runtime.pool
        return pool


def settings(database: Any, infra: Any, topic_prefix: str, issuer: LocalIssuer) -> PricerSettings:
    return PricerSettings(
        oidc_issuer=issuer.url,
        database_url=database.dsn("pricer"),
        kafka_bootstrap_servers=infra.kafka,
        topic_prefix=topic_prefix,
        port=8082,
        maintenance_interval_seconds=3600,
    )


@pytest.fixture
async def running(infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer) -> AsyncIterator[Running]:
    app = create_app(settings(database, infra, topic_prefix, issuer))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pricer", headers=issuer.bearer()) as http:
            yield Running(app, http, app.state.runtime.state["pricer"], topic_prefix + CHARGES, infra.kafka)


Key = tuple[datetime, str, str]  # reading hour, meter, resource: a measurement's identity


def batches(hour: datetime, readings: list[tuple[str, int, str]], meter: str = "cfapps") -> list[Measurements]:
    """Readings (resource, value, kind) of one hour as the collector batches them."""
    items = [Item(r, f"name of {r}", "org-1", "Org", "space-1", "dev", kind, value) for r, value, kind in readings]
    unit = "MB" if meter == "cfapps" else "instance"
    return measurement_batches(hour, meter, unit, items, reading_id=ids.reading_id(hour),
                               taken_at=hour + timedelta(minutes=61))


def received(ms: list[Measurements]) -> list[Received[Measurements]]:
    return [Received(m, b"shard-%d" % m.shard, 0, i) for i, m in enumerate(ms)]


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


async def read_charges(kafka: str, topic: str, expected: int, timeout: float = 20) -> list[tuple[bytes, Charges]]:
    """At least ``expected`` messages of the charges topic (fewer after ``timeout``), with their bytes."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[tuple[bytes, Charges]] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                for r in recs:
                    decoded = decode_charges(r.value)
                    assert decoded.rejected == [] and decoded.message is not None
                    out.append((r.value, decoded.message))
    finally:
        await consumer.stop()
    return out


def items_of(c: Charges) -> dict[Key, tuple[int, uuid.UUID | None, Fraction]]:
    """The charges of a batch: (revision, price id, exact amount) per measurement."""
    return {
        (c.reading_hour, c.meter, rid): (
            c.revision[i], None if c.price[i] < 0 else c.prices[c.price[i]].id,
            Fraction(c.amount_numerator[i], c.amount_denominator[i]),
        )
        for i, rid in enumerate(c.resource_id)
    }


async def stored(running: Running) -> dict[Key, tuple[int, uuid.UUID | None, Fraction]]:
    """The latest stored revision per measurement (the highest revision over the shard's batches)."""
    async with running.pool.acquire() as conn:
        rows = await conn.fetch("SELECT message FROM charge_batches ORDER BY reading_hour, meter, shard, seq")
        messages = await unpacked(conn, "pricer", [r["message"] for r in rows])
    latest: dict[Key, tuple[int, uuid.UUID | None, Fraction]] = {}
    for message in messages:
        c = decode_charges(message).message
        assert c is not None
        for key, charge in items_of(c).items():
            if key not in latest or charge[0] > latest[key][0]:
                latest[key] = charge
    return latest


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
    post = running.http.post
    assert (await post("/internal/prices", json=price_body(resource_kind="plan-a"))).status_code == 201
    assert (await post("/internal/prices", json=price_body(meter="cfservices", unit=730))).status_code == 201
    adjacent = price_body(valid_from="2026-02-01T05:00:00Z", microcredits_per_unit=2)
    r = await post("/internal/prices", json=adjacent)
    assert r.status_code == 201
    second = r.json()

    # Re-sending an identical price is answered with the existing one, not a second price.
    again = await post("/internal/prices", json=adjacent)
    assert again.status_code == 200 and again.json()["id"] == second["id"]

    get = running.http.get
    listed = (await get("/internal/prices", params={"meter": "cfapps", "resource_kind": ""})).json()["items"]
    assert [p["id"] for p in listed] == [first["id"], second["id"]]
    at_jan = (await get("/internal/prices", params={"meter": "cfapps", "at": "2026-01-15T00:00:00Z"})).json()
    assert {(p["resource_kind"], p["id"]) for p in at_jan["items"]} >= {("", first["id"])}
    assert second["id"] not in {p["id"] for p in at_jan["items"]}
    assert len((await running.http.get("/internal/prices")).json()["items"]) == 4

    # The exclusion constraint, not the service's check, keeps two prices of one (meter, kind) apart.
    base = Price(ids.uuid7(), "cfdb", "", "GB-hour", 1, 1, datetime(2026, 1, 1, tzinfo=UTC), None,
                 datetime(2026, 1, 1, tzinfo=UTC))
    async with running.pool.acquire() as conn:
        await repository.insert_price(conn, base)
        clash = Price(ids.uuid7(), "cfdb", "", "GB-hour", 2, 1, datetime(2026, 5, 1, tzinfo=UTC),
                      datetime(2026, 6, 1, tzinfo=UTC), base.created_at)
        with pytest.raises(asyncpg.ExclusionViolationError):
            await repository.insert_price(conn, clash)
        other_kind = Price(ids.uuid7(), "cfdb", "plan", "GB-hour", 2, 1, clash.valid_from, None, base.created_at)
        await repository.insert_price(conn, other_kind)


BAD_PRICES: list[tuple[str, dict[str, Any]]] = [
    ("unit 0", price_body(unit=0)),
    ("negative price", price_body(microcredits_per_unit=-1)),
    ("no meter", price_body(meter="")),
    ("naive time", price_body(valid_from="2026-01-01T00:00:00")),
    ("ends before it starts", price_body(valid_until="2025-12-31T00:00:00Z")),
    ("empty range", price_body(valid_until="2026-01-01T00:00:00Z")),
    ("fractional price", price_body(microcredits_per_unit=1.5)),
    ("unknown field", {**price_body(), "surprise": 1}),
]



async def test_bad_prices_are_422(running: Running) -> None:
    for case, body in BAD_PRICES:
        r = await running.http.post("/internal/prices", json=body)
        assert r.status_code == 422, (case, r.text)
        assert r.headers["content-type"] == "application/problem+json", case
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
    assert await running.pricer.handle_readings(received(batches(hour, [("app-1", 1024, "")]))) == []

    # Not before its start, and not before an hour it already priced.
    r = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-01T00:00:00Z"})
    assert r.status_code == 409
    r = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-10T12:00:00Z"})
    assert r.status_code == 409 and "2026-01-10T12:00:00" in r.json()["detail"]

    r = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-10T13:00:00Z"})
    assert r.status_code == 200, r.text
    assert r.json()["valid_until"] == "2026-01-10T13:00:00Z"
    # Ending it again at the same time is a no-op; later is refused (it would grow the range).
    again = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-10T13:00:00Z"})
    assert again.status_code == 200
    later_end = await running.http.post(f"/internal/prices/{price['id']}/end", json={"at": "2026-01-11T00:00:00Z"})
    assert later_end.status_code == 409

    # Without a restart, the next hour is unpriced now.
    later = hour + timedelta(hours=1)
    await running.pricer.handle_readings(received(batches(later, [("app-1", 1024, "")])))
    assert (await stored(running))[(later, "cfapps", "app-1")] == (1, None, 0)
    # And the gap can be filled by a new price.
    r = await running.http.post("/internal/prices", json=price_body(valid_from="2026-01-10T13:00:00Z",
                                                                    microcredits_per_unit=3))
    assert r.status_code == 201 and r.json()["repriced_charges"] == 1
    assert (await stored(running))[(later, "cfapps", "app-1")] == (
        2, uuid.UUID(r.json()["id"]), Fraction(1024 * 3, 730 * 1024))


# Midnight in America/New_York, as UTC instants (EST is UTC-5, EDT is UTC-4). DST starts on
# 2026-03-08 at 02:00 local and ends on 2026-11-01 at 02:00 local.
MIDNIGHTS = {
    "2026-03-08 (DST starts that night)": datetime(2026, 3, 8, 5, tzinfo=UTC),  # 00:00 EST
    "2026-03-09 (first midnight in EDT)": datetime(2026, 3, 9, 4, tzinfo=UTC),  # 00:00 EDT
    "2026-11-01 (DST ends that night)": datetime(2026, 11, 1, 4, tzinfo=UTC),  # 00:00 EDT
    "2026-11-02 (first midnight in EST)": datetime(2026, 11, 2, 5, tzinfo=UTC),  # 00:00 EST
}


LOCAL_MIDNIGHTS = {
    "2026-03-08 (DST starts that night)": "2026-03-08T00:00:00-05:00",
    "2026-03-09 (first midnight in EDT)": "2026-03-09T00:00:00-04:00",
    "2026-11-01 (DST ends that night)": "2026-11-01T00:00:00-04:00",
    "2026-11-02 (first midnight in EST)": "2026-11-02T00:00:00-05:00",
}


async def test_price_change_at_new_york_midnight_on_dst_days(running: Running) -> None:
    for n, (day, midnight_utc) in enumerate(MIDNIGHTS.items()):
        kind = f"plan-{n}"  # a (meter, kind) of its own per day: the prices of the days do not overlap
        old_body = price_body(resource_kind=kind, microcredits_per_unit=7, unit=3, valid_until=LOCAL_MIDNIGHTS[day])
        old = (await running.http.post("/internal/prices", json=old_body)).json()
        new_body = price_body(resource_kind=kind, microcredits_per_unit=11, unit=5, valid_from=LOCAL_MIDNIGHTS[day])
        new = (await running.http.post("/internal/prices", json=new_body)).json()
        assert old["valid_until"] == new["valid_from"] == midnight_utc.strftime("%Y-%m-%dT%H:%M:%SZ"), day

        # The three hours each side of the boundary, and the local 01:00-03:00 hours DST skips or repeats.
        hours = [midnight_utc + timedelta(hours=k) for k in range(-3, 6)]
        resource = f"app-dst-{n}"
        readings = [b for i, h in enumerate(hours) for b in batches(h, [(resource, 100 + i, kind)])]
        assert await running.pricer.handle_readings(received(readings)) == []
        charges = await stored(running)
        for i, h in enumerate(hours):
            expected_price, mpu, unit = (old["id"], 7, 3) if h < midnight_utc else (new["id"], 11, 5)
            expected = (1, uuid.UUID(expected_price), Fraction((100 + i) * mpu, unit))
            assert charges[(h, "cfapps", resource)] == expected, (day, h)


async def test_the_unpriced_list_pages_through_every_unpriced_charge_once(running: Running) -> None:
    """More shards than one fetch of the list reads (50), pages that end inside and between fetches."""
    hour = datetime(2026, 5, 1, tzinfo=UTC)
    readings = [(h, f"svc-{h}-{i}", f"plan-{i % 3}") for h in range(3) for i in range(40)]
    ms = [b for h in range(3)
          for b in batches(hour + timedelta(hours=h), [(r, 1, k) for hh, r, k in readings if hh == h], "cfservices")]
    assert len({(m.reading_hour, m.shard, k) for m in ms for k in m.kinds}) > 50
    assert await running.pricer.handle_readings(received(ms)) == []
    for limit in (7, 50, 1000):
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            r = await running.http.get("/internal/charges/unpriced", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["items"]) <= limit
            seen.extend(c["resource_id"] for c in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(r for _, r, _ in readings) and len(seen) == len(set(seen)), limit


async def test_unpriced_charge_is_repriced_and_published_when_a_covering_price_is_added(running: Running) -> None:
    hour = datetime(2026, 4, 1, 3, tzinfo=UTC)
    kinds = ["plan-small", "plan-large"]
    readings = [(hour + timedelta(hours=i), f"svc-{i}", kinds[i % 2]) for i in range(6)]
    keys = [(h, "cfservices", r) for h, r, _ in readings]
    ms = [b for h, r, k in readings for b in batches(h, [(r, 1, k)], meter="cfservices")]
    assert await running.pricer.handle_readings(received(ms)) == []

    page1 = (await running.http.get("/internal/charges/unpriced", params={"limit": 4})).json()
    page2 = (await running.http.get("/internal/charges/unpriced",
                                    params={"limit": 4, "cursor": page1["next_cursor"]})).json()
    assert len(page1["items"]) == 4 and page2["next_cursor"] is None, (page1, page2)
    listed = [ChargeComputed.model_validate(c) for c in page1["items"] + page2["items"]]
    assert sorted(c.measurement_id for c in listed) == sorted(ids.measurement_id(*k) for k in keys)
    for c in listed:
        assert (c.status, c.revision, c.price_id) == ("unpriced", 1, None)
        assert (c.amount_numerator, c.amount_denominator) == (0, 1)
        assert c.id == ids.charge_id(c.measurement_id, 1) and c.display_amount == "0.000000"
        assert c.resource_kind == kinds[int(c.resource_id[4:]) % 2] and c.org_id == "org-1" and c.unit == "instance"

    # A price for plan-small from hour+2: covers svc-2 and svc-4 only (svc-0 is before it).
    r = await running.http.post(
        "/internal/prices",
        json=price_body(meter="cfservices", resource_kind="plan-small", unit_of_measure="instance-hour",
                        microcredits_per_unit=1_000_000, unit=730, valid_from=(hour + timedelta(hours=2)).isoformat()),
    )
    assert r.status_code == 201, r.text
    assert r.json()["repriced_charges"] == 2
    price_id = uuid.UUID(r.json()["id"])
    covered = {keys[2], keys[4]}

    published = await read_charges(running.kafka, running.charges_topic, expected=len(ms) + 2)
    assert len(published) == len(ms) + 2  # (partitions interleave: read by content, not by position)
    first = [c for _, c in published if all(v[0] == 1 for v in items_of(c).values())]
    repriced = [(raw, c) for raw, c in published if any(v[0] == 2 for v in items_of(c).values())]
    assert len(first) == len(ms) and len(repriced) == 2
    assert {k: v for c in first for k, v in items_of(c).items()} == {k: (1, None, 0) for k in keys}
    # Only the difference goes downstream: the new revisions of the re-priced measurements, nothing else.
    assert sorted(k for _, c in repriced for k in items_of(c)) == sorted(covered)
    assert {k: v for _, c in repriced for k, v in items_of(c).items()} == {
        k: (2, price_id, Fraction(1_000_000, 730)) for k in covered
    }
    still = (await running.http.get("/internal/charges/unpriced")).json()["items"]
    assert {(c["resource_id"], c["revision"]) for c in still} == {(k[2], 1) for k in keys if k not in covered}

    # The redelivered readings publish the stored batch of revision 2, byte for byte, not a new revision 1.
    redelivered = batches(hour + timedelta(hours=2), [("svc-2", 1, "plan-small")], meter="cfservices")
    assert await running.pricer.handle_readings(received(redelivered)) == []
    assert (await stored(running))[keys[2]][0] == 2
    again = await read_charges(running.kafka, running.charges_topic, expected=len(ms) + 3)
    assert len(again) == len(ms) + 3
    (revision2,) = [raw for raw, c in repriced if keys[2] in items_of(c)]
    assert [raw for raw, _ in again].count(revision2) == 2
    async with running.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM charge_batches") == len(ms) + 2


async def test_a_price_added_by_an_instance_that_died_is_repriced_by_another(running: Running) -> None:
    hour = datetime(2026, 6, 1, 0, tzinfo=UTC)
    key = (hour, "cfservices", "svc-orphan")
    await running.pricer.handle_readings(received(batches(hour, [("svc-orphan", 2, "plan-x")], meter="cfservices")))
    assert (await stored(running))[key] == (1, None, 0)
    # Another instance committed this price and died before re-pricing anything.
    orphan = Price(ids.uuid7(), "cfservices", "plan-x", "instance-hour", 10, 4, hour, None, hour)
    async with running.pool.acquire() as conn:
        await repository.insert_price(conn, orphan)
    # This instance's maintenance round notices the catalog moved and re-prices.
    assert await running.pricer.sweep_if_catalog_changed() == 1
    assert await running.pricer.sweep_if_catalog_changed() == 0
    assert (await stored(running))[key] == (2, orphan.id, Fraction(2 * 10, 4))
    published = await read_charges(running.kafka, running.charges_topic, expected=2)
    assert [items_of(c)[key] for _, c in published] == [(1, None, 0), (2, orphan.id, Fraction(5))]
    async with running.pool.acquire() as conn:
        assert await conn.fetch("SELECT * FROM unpriced_shards") == []
        assert await conn.fetchval("SELECT count(*) FROM unpublished_batches") == 0


async def test_a_price_change_waits_for_batches_in_flight_then_gives_up(running: Running) -> None:
    pricer = Pricer(running.pool, running.pricer._stream, running.charges_topic, lock_timeout_ms=300)
    async with running.pool.acquire() as conn, conn.transaction():
        await repository.lock_catalog_shared(conn)  # a batch that takes its time
        with pytest.raises(CatalogBusyError):
            await pricer.add_price(PriceIn.model_validate(price_body()))
    assert (await running.http.get("/internal/prices")).json()["items"] == []
    r = await running.http.post("/internal/prices", json=price_body())  # once the batch committed: fine
    assert r.status_code == 201
