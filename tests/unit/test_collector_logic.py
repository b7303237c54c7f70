"""The collector's pure logic: estimation for missed hours, meters on bad input, the batches it stores and relays."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.collector.cf_client import CFClient
from services.collector.meters import AppsMeter, ServicesMeter
from services.collector.repository import BATCH_COLUMNS
from services.collector.service import Previous, _batch_row, _parts, estimate
from shared import ids
from shared.batches import SHARDS, Item, Measurements, measurement_batches, shard_of
from shared.contracts import MeasurementsTaken

H0 = datetime(2026, 10, 1, 1, tzinfo=UTC)
MISSING = [H0 + timedelta(hours=k) for k in (1, 2, 3)]


def prev(value: int) -> Previous:
    return Previous("", "org", "space", value, "MB")


def test_previous_policy_repeats_the_value_before_the_gap_for_resources_on_both_sides() -> None:
    out = estimate({"a": prev(512), "gone": prev(64)}, {"a": 1024, "new": 8}, MISSING, "previous")
    assert [(h, r, v) for h, r, _, v in out] == [(h, "a", 512) for h in MISSING]


def test_none_policy_estimates_nothing() -> None:
    assert estimate({"a": prev(512)}, {"a": 1024}, MISSING, "none") == []


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(1, 72))
def test_linear_policy_interpolates_rounded_half_up(a: int, b: int, n: int) -> None:
    hours = [H0 + timedelta(hours=k) for k in range(1, n + 1)]
    out = estimate({"r": prev(a)}, {"r": b}, hours, "linear")
    for k, (_, _, _, v) in enumerate(out, start=1):
        exact = Fraction(a) + Fraction(b - a) * k / (n + 1)
        assert v == math.floor(exact + Fraction(1, 2))
        assert min(a, b) <= v <= max(a, b)


def cf_transport(pages: dict[str, Any]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "t", "token_type": "bearer", "expires_in": 600})
        body = pages[request.url.path]
        pagination = {"total_results": len(body["resources"]), "total_pages": 1, "next": None}
        return httpx.Response(200, json={"pagination": pagination, **body})

    return httpx.MockTransport(handler)


def app(guid: str | None, state: str | None = "STARTED", space: str | None = "s1") -> dict:
    a: dict = {"name": f"n-{guid}", "relationships": {"space": {"data": {"guid": space} if space else None}}}
    if guid is not None:
        a["guid"] = guid
    if state is not None:
        a["state"] = state
    return a


def process(app_guid: str | None, instances: object = 2, memory: object = 256) -> dict:
    return {"guid": str(uuid.uuid4()), "instances": instances, "memory_in_mb": memory,
            "links": {"app": {"href": f"http://cf/v3/apps/{app_guid}"} if app_guid else {}}}


async def test_apps_meter_records_bad_input_on_the_affected_measurement_and_goes_on() -> None:
    pages = {
        "/v3/apps": {"resources": [app("ok"), app("stopped", "STOPPED"), app(None), app("weird", "CRASHING"),
                                   app("nospace", space=None), app("badproc")], "included": {"spaces": []}},
        "/v3/processes": {"resources": [process("ok"), process("ok", 1, 1024), process(None), process("badproc", "x"),
                                        process("badproc", 1, 128), process("stopped")]},
    }
    cf = CFClient("http://cf", "http://cf", "id", "secret", transport=cf_transport(pages))
    result = await AppsMeter().measure(cf, None)
    await cf.close()
    by_id = {m.resource_id: m for m in result.measurements}
    assert set(by_id) == {"ok", "weird", "nospace", "badproc"}  # stopped: not billed; no guid: cannot be
    assert by_id["ok"].value == 2 * 256 + 1024 and by_id["ok"].errors is None
    assert "unknown" in (by_id["weird"].errors or "") and by_id["weird"].value == 0
    assert by_id["nospace"].errors == "app has no space relationship"
    assert by_id["badproc"].value == 128 and "bad instances/memory_in_mb" in (by_id["badproc"].errors or "")


async def test_services_meter_measures_managed_instances_with_their_plan_as_kind() -> None:
    pages = {"/v3/service_instances": {"resources": [
        {"guid": "si1", "name": "db", "type": "managed",
         "relationships": {"service_plan": {"data": {"guid": "plan-a"}}, "space": {"data": {"guid": "s"}}}},
        {"guid": "si2", "name": "up", "type": "user-provided", "relationships": {"space": {"data": {"guid": "s"}}}},
        {"guid": "si3", "name": "noplan", "type": "managed", "relationships": {"space": {"data": {"guid": "s"}}}},
    ]}}
    cf = CFClient("http://cf", "http://cf", "id", "secret", transport=cf_transport(pages))
    result = await ServicesMeter().measure(cf, None)
    await cf.close()
    got = {m.resource_id: (m.value, m.resource_kind, m.errors) for m in result.measurements}
    assert got == {"si1": (1, "plan-a", None), "si3": (1, "", "no service_plan relationship")}


def test_a_stored_batch_row_is_the_contract_message_it_relays() -> None:
    taken_at = datetime(2026, 10, 1, 2, 1, 3, 123456, tzinfo=UTC)
    rids = [r for r in (f"app-{i}" for i in range(200)) if shard_of(r) == 5][:3]
    items = [Item(r, f"name {r}", "o", "org", "s", "space", "", 512 * (i + 1), estimated=i == 1)
             for i, r in enumerate(reversed(rids))]
    (b,) = measurement_batches(H0, "cfapps", "MB", items, reading_id=ids.reading_id(H0), taken_at=taken_at)
    row = dict(zip(BATCH_COLUMNS, _batch_row(b, 0), strict=True))
    assert {k: v for k, v in row.items() if k != "message"} == {
        "hour": H0, "meter": "cfapps", "shard": 5, "part": 0, "reading_id": ids.reading_id(H0),
        "measurements": 3, "estimated": 1,
    }
    validated = MeasurementsTaken.model_validate_json(row["message"])
    assert validated.resource_id == sorted(rids) and validated.shard == 5
    assert sorted(zip(validated.resource_id, validated.value, validated.estimated, strict=True)) == sorted(
        (it.resource_id, it.value, it.estimated) for it in items)
    assert orjson.loads(row["message"])["reading_hour"] == "2026-10-01T01:00:00Z"
    # The same measurements make the same bytes: a re-published batch is the message sent before.
    (again,) = measurement_batches(H0, "cfapps", "MB", list(reversed(items)), reading_id=ids.reading_id(H0),
                                   taken_at=taken_at)
    assert _batch_row(again, 0)[-1] == row["message"]


def test_parts_are_numbered_within_their_shard() -> None:
    def stub(shard: int) -> Measurements:
        return Measurements(
            id=uuid.uuid4(), reading_id=uuid.uuid4(), reading_hour=H0, meter="m", unit="u", shard=shard, taken_at=H0,
            orgs=[], spaces=[], kinds=[], resource_id=[], resource_name=[], org=[], space=[], kind=[], value=[],
            estimated=[],
        )

    shards = [0, 3, 3, 3, 7, SHARDS - 1, SHARDS - 1]
    assert [part for _, part in _parts([stub(s) for s in shards])] == [0, 0, 1, 2, 0, 0, 1]


@pytest.mark.parametrize("status", [401, 403])
async def test_uaa_refusing_the_credentials_is_a_clear_error(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": "unauthorized"})

    cf = CFClient("http://cf", "http://cf", "id", "wrong", transport=httpx.MockTransport(handler))
    with pytest.raises(Exception, match="refused the client credentials"):
        await cf.list_all("/v3/apps")
    await cf.close()
