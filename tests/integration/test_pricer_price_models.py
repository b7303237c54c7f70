"""Graduated and volume prices at the pricer, on the real PostgreSQL and Kafka (docs/price-models.md, §2, §3).

The admin routes store and list them with their bands in the exact JSON form; bands that cannot exist, and a
graduated or volume price that starts, ends or is ended anywhere but on a billing-month boundary (midnight
America/New_York on the 1st), are refused with a 422 problem and nothing is stored or changed; an overlap is
a 409 as for flat prices. Readings covered by a graduated price come out on usage.charges.v3 with the
price's model and bands and amount 0/1 (flat items of the same batch keep their exact amounts), readable by
the contract; a charges batch stored before v3 (a v2 body) is published again byte for byte on a redelivery
and still decodes, as a batch of flat prices.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest

from services.pricer import repository
from services.pricer.pricing import Catalog, Price, price_items
from shared import ids
from shared.batches import ShardKey, decode_charges, encode_charges, encode_measurements
from shared.blobs import shard_scope
from shared.contracts import ChargesComputed, ChargesComputedV2
from tests.integration.test_pricer_prices import (
    Running,
    batches,
    price_body,
    read_charges,
    received,
    running,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.integration

JAN = "2026-01-01T05:00:00Z"  # midnight America/New_York, January 1st (EST)
APR = "2026-04-01T04:00:00Z"  # midnight America/New_York, April 1st (EDT)

GRADUATED_BANDS = [
    {"up_to": "1000", "microcredits_per_unit": 0},
    {"up_to": "4001/2", "microcredits_per_unit": 1370, "flat_fee": 250},
    {"up_to": None, "microcredits_per_unit": 1000},
]
VOLUME_BANDS = [
    {"up_to": "100", "microcredits_per_unit": 10, "flat_fee": 7},
    {"up_to": None, "microcredits_per_unit": 5, "flat_fee": 3},
]


def graduated(**overrides: Any) -> dict[str, Any]:
    body = price_body(model="graduated", bands=GRADUATED_BANDS, unit=1024, valid_from=JAN)
    del body["microcredits_per_unit"]
    body.update(overrides)
    return body


def as_listed(bands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bands as the admin API answers them: every field present (a fee not given is 0)."""
    return [{"flat_fee": 0, **b} for b in bands]


async def test_graduated_and_volume_prices_are_stored_and_listed_with_their_bands(running: Running) -> None:
    post, get = running.http.post, running.http.get
    r = await post("/internal/prices", json=graduated())
    assert r.status_code == 201, r.text
    g = r.json()
    assert (g["model"], g["microcredits_per_unit"], g["bands"]) == ("graduated", 0, as_listed(GRADUATED_BANDS))
    vol = price_body(meter="cfservices", model="volume", bands=VOLUME_BANDS, unit=730, valid_from=APR,
                     valid_until="2026-06-01T04:00:00Z", microcredits_per_unit=0)
    r = await post("/internal/prices", json=vol)
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["model"], v["bands"], v["valid_until"]) == ("volume", as_listed(VOLUME_BANDS), "2026-06-01T04:00:00Z")
    flat = (await post("/internal/prices", json=price_body(meter="cfdb", unit=1))).json()
    assert (flat["model"], flat["bands"]) == ("flat", None)

    listed = {p["id"]: p for p in (await get("/internal/prices")).json()["items"]}
    assert listed == {g["id"]: {k: g[k] for k in listed[g["id"]]}, v["id"]: {k: v[k] for k in listed[v["id"]]},
                      flat["id"]: {k: flat[k] for k in listed[flat["id"]]}}
    assert listed[g["id"]]["bands"] == as_listed(GRADUATED_BANDS)
    assert (await get(f"/internal/prices/{v['id']}")).json()["bands"] == as_listed(VOLUME_BANDS)
    async with running.pool.acquire() as conn:
        rows = {str(r["id"]): (r["model"], r["mpu"], r["bands"]) for r in await conn.fetch(
            "SELECT id, model, microcredits_per_unit AS mpu, bands::text FROM prices")}
    assert rows[g["id"]][:2] == ("graduated", 0) and json.loads(rows[g["id"]][2]) == as_listed(GRADUATED_BANDS)
    assert rows[v["id"]][:2] == ("volume", 0) and json.loads(rows[v["id"]][2]) == as_listed(VOLUME_BANDS)
    assert rows[flat["id"]] == ("flat", 1_000_000, None)

    # The same price sent again is answered with the existing one; another over the same range is a 409.
    again = await post("/internal/prices", json=graduated())
    assert again.status_code == 200 and again.json()["id"] == g["id"]
    other = graduated(bands=[{"up_to": None, "microcredits_per_unit": 9}], valid_from="2026-03-01T05:00:00Z")
    r = await post("/internal/prices", json=other)
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["conflicts"] == [g["id"]]
    flat_over = price_body(valid_from="2026-02-10T00:00:00Z")  # a flat price cannot overlap it either
    assert (await post("/internal/prices", json=flat_over)).status_code == 409


def _without_rate(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "microcredits_per_unit"}


BAD_MODELS: list[tuple[str, dict[str, Any]]] = [
    ("edges not increasing", graduated(bands=[{"up_to": "10", "microcredits_per_unit": 1},
                                              {"up_to": "5", "microcredits_per_unit": 1},
                                              {"up_to": None, "microcredits_per_unit": 1}])),
    ("last band closed", graduated(bands=[{"up_to": "10", "microcredits_per_unit": 1}])),
    ("an open band before the last", graduated(bands=[{"up_to": None, "microcredits_per_unit": 1},
                                                      {"up_to": None, "microcredits_per_unit": 2}])),
    ("a float edge", graduated(bands=[{"up_to": 2.5, "microcredits_per_unit": 1},
                                      {"up_to": None, "microcredits_per_unit": 1}])),
    ("a decimal string edge", graduated(bands=[{"up_to": "2.5", "microcredits_per_unit": 1},
                                               {"up_to": None, "microcredits_per_unit": 1}])),
    ("a zero denominator", graduated(bands=[{"up_to": "5/0", "microcredits_per_unit": 1},
                                            {"up_to": None, "microcredits_per_unit": 1}])),
    ("a negative fee", graduated(bands=[{"up_to": None, "microcredits_per_unit": 1, "flat_fee": -1}])),
    ("no bands", graduated(bands=[])),
    ("33 bands", graduated(bands=[{"up_to": str(i + 1), "microcredits_per_unit": 1} for i in range(32)]
                           + [{"up_to": None, "microcredits_per_unit": 1}])),
    ("graduated without bands", _without_rate(price_body(model="graduated", valid_from=JAN))),
    ("graduated with a rate", graduated(microcredits_per_unit=5)),
    ("a fee on flat", price_body(bands=[{"up_to": None, "microcredits_per_unit": 1, "flat_fee": 5}])),
    ("flat without a rate", _without_rate(price_body())),
    ("an unknown model", graduated(model="tiered")),
    ("starts mid-month", graduated(valid_from="2026-01-15T05:00:00Z")),
    ("starts at UTC midnight on the 1st", graduated(valid_from="2026-01-01T00:00:00Z")),
    ("ends mid-month", graduated(valid_until="2026-02-14T05:00:00Z")),
    ("volume ends an hour off", price_body(model="volume", bands=VOLUME_BANDS, microcredits_per_unit=0,
                                           valid_from=JAN, valid_until="2026-02-01T06:00:00Z")),
]


async def test_bad_bands_and_mid_month_ranges_are_422_and_nothing_is_stored(running: Running) -> None:
    for case, body in BAD_MODELS:
        r = await running.http.post("/internal/prices", json=body)
        assert r.status_code == 422, (case, r.text)
        assert r.headers["content-type"] == "application/problem+json", case
    assert (await running.http.get("/internal/prices")).json()["items"] == []
    async with running.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM prices") == 0


async def test_a_graduated_price_is_ended_only_on_a_billing_month_boundary(running: Running) -> None:
    g = (await running.http.post("/internal/prices", json=graduated())).json()
    for at in ("2026-03-15T04:00:00Z", "2026-03-01T00:00:00Z", "2026-03-01T06:00:00Z"):
        r = await running.http.post(f"/internal/prices/{g['id']}/end", json={"at": at})
        assert r.status_code == 422, (at, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert "billing-month boundary" in r.json()["detail"]
    assert (await running.http.get(f"/internal/prices/{g['id']}")).json()["valid_until"] is None
    r = await running.http.post(f"/internal/prices/{g['id']}/end", json={"at": "2026-03-01T05:00:00Z"})
    assert r.status_code == 200, r.text
    assert r.json()["valid_until"] == "2026-03-01T05:00:00Z" and r.json()["bands"] == as_listed(GRADUATED_BANDS)
    # A flat price still ends at any instant.
    flat = (await running.http.post("/internal/prices", json=price_body(meter="cfdb"))).json()
    r = await running.http.post(f"/internal/prices/{flat['id']}/end", json={"at": "2026-03-15T04:00:00Z"})
    assert r.status_code == 200


async def test_readings_of_a_graduated_price_come_out_on_v3_with_its_bands_and_amount_0_over_1(
    running: Running,
) -> None:
    g = (await running.http.post("/internal/prices", json=graduated(resource_kind=""))).json()
    flat = (await running.http.post("/internal/prices", json=price_body(resource_kind="big", unit=2048))).json()
    hour = datetime(2026, 1, 20, 9, tzinfo=UTC)
    readings = [(f"app-{i}", 512 * (i + 1), "big" if i % 3 == 0 else "") for i in range(12)]
    ms = batches(hour, readings)
    assert await running.pricer.handle_readings(received(ms)) == []
    assert running.charges_topic.endswith("usage.charges.v3")
    published = await read_charges(running.kafka, running.charges_topic, expected=len(ms))
    assert len(published) == len(ms)
    seen: dict[str, tuple[str, int, Fraction]] = {}
    for raw, c in published:
        ChargesComputed.model_validate_json(raw)
        assert json.loads(raw)["schema_version"] == 3
        for i, rid in enumerate(c.resource_id):
            terms = c.prices[c.price[i]]
            seen[rid] = (terms.model, c.value[i], Fraction(c.amount_numerator[i], c.amount_denominator[i]))
            if terms.model == "graduated":
                assert str(terms.id) == g["id"] and terms.unit == 1024 and terms.microcredits_per_unit == 0
                assert terms.bands is not None
                assert [{"up_to": b.up_to, "microcredits_per_unit": b.microcredits_per_unit, "flat_fee": b.flat_fee}
                        for b in terms.bands] == as_listed(GRADUATED_BANDS)
                assert (c.amount_numerator[i], c.amount_denominator[i]) == (0, 1)
            else:
                assert str(terms.id) == flat["id"] and terms.bands is None
    assert seen == {
        rid: ("flat", value, Fraction(value * 1_000_000, 2048)) if kind == "big" else ("graduated", value, Fraction(0))
        for rid, value, kind in readings
    }


async def test_a_stored_v2_batch_is_published_again_byte_for_byte_and_decodes(running: Running) -> None:
    hour = datetime(2026, 2, 3, 4, tzinfo=UTC)
    (m,) = batches(hour, [("app-a", 1024, "")])
    # What the pricer stored before v3: a flat batch with schema_version 2 (the v2 bytes).
    flat = Price(ids.uuid7(), "cfapps", "", "MB-hour", 1_000_000, 730 * 1024, datetime(2026, 1, 1, tzinfo=UTC), None,
                 datetime(2026, 1, 1, tzinfo=UTC))
    priced = price_items(m, None, Catalog([flat]), hour + timedelta(hours=1))
    assert priced.message is not None
    v2 = encode_charges(priced.message).replace(b'"schema_version":3', b'"schema_version":2')
    assert b'"correction"' not in v2  # an ordinary batch writes no correction: the v2 bytes
    assert b'"schema_version":2' in v2 and b'"model"' not in v2
    ChargesComputedV2.model_validate_json(v2)
    await running.pricer.frames.ensure_first(running.pool, [m], shard_scope, encode_measurements)
    key = ShardKey(m.reading_hour, m.meter, m.shard)
    n = len(m.resource_id)
    async with running.pool.acquire() as conn, conn.transaction():
        await repository.insert_batches(conn, running.pricer.frames, [(key, 1, n, n, 0, n, True, v2)])
    # The readings come again: the stored batch is published as it is, not priced again.
    assert await running.pricer.handle_readings(received([m])) == []
    published = await read_charges(running.kafka, running.charges_topic, expected=1)
    assert [raw for raw, _ in published] == [v2]
    (_, c), = published
    assert c.schema_version == 2 and [(p.model, p.bands) for p in c.prices] == [("flat", None)]
    assert [Fraction(a, d) for a, d in zip(c.amount_numerator, c.amount_denominator, strict=True)] == [
        Fraction(v * 1_000_000, 730 * 1024) for v in m.value
    ]
    assert decode_charges(v2).message == c
