"""The collector's pure logic: estimation for missed hours, meters on bad input, the relay's bytes."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.collector.cf_client import CFClient
from services.collector.meters import AppsMeter, ServicesMeter
from services.collector.service import Previous, _message, estimate
from shared import ids
from shared.contracts import MeasurementTaken
from shared.kafka import encode

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


def cf_transport(pages: dict[str, dict]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "t", "token_type": "bearer", "expires_in": 600})
        body = pages[request.url.path]
        return httpx.Response(200, json={"pagination": {"total_results": len(body["resources"]), "total_pages": 1, "next": None}, **body})

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
        {"guid": "si1", "name": "db", "type": "managed", "relationships": {"service_plan": {"data": {"guid": "plan-a"}}, "space": {"data": {"guid": "s"}}}},
        {"guid": "si2", "name": "up", "type": "user-provided", "relationships": {"space": {"data": {"guid": "s"}}}},
        {"guid": "si3", "name": "noplan", "type": "managed", "relationships": {"space": {"data": {"guid": "s"}}}},
    ]}}
    cf = CFClient("http://cf", "http://cf", "id", "secret", transport=cf_transport(pages))
    result = await ServicesMeter().measure(cf, None)
    await cf.close()
    got = {m.resource_id: (m.value, m.resource_kind, m.errors) for m in result.measurements}
    assert got == {"si1": (1, "plan-a", None), "si3": (1, "", "no service_plan relationship")}


def test_relay_bytes_are_a_valid_contract_message() -> None:
    row = {
        "id": ids.measurement_id(H0, "cfapps", "r"), "reading_id": ids.reading_id(H0), "hour": H0, "meter": "cfapps",
        "resource_id": "r", "resource_kind": "", "resource_name": "app", "org_id": "o", "org_name": "org",
        "space_id": "s", "space_name": "space", "value": 512, "unit": "MB", "estimated": True,
        "taken_at": datetime(2026, 10, 1, 2, 1, 3, 123456, tzinfo=UTC),
    }
    out = _message(row)  # type: ignore[arg-type]
    validated = MeasurementTaken.model_validate_json(out.value)
    assert out.value == encode(validated)
    assert out.key == b"r"
    assert orjson.loads(out.value)["reading_hour"] == "2026-10-01T01:00:00Z"


@pytest.mark.parametrize("status", [401, 403])
async def test_uaa_refusing_the_credentials_is_a_clear_error(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": "unauthorized"})

    cf = CFClient("http://cf", "http://cf", "id", "wrong", transport=httpx.MockTransport(handler))
    with pytest.raises(Exception, match="refused the client credentials"):
        await cf.list_all("/v3/apps")
    await cf.close()
