"""HTTP tests of the simulator (in-process ASGI): CF v3 shapes, auth, pagination, faults, OIDC."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from jose import JWTError, jwt
from typer.testing import CliRunner

from simulator import ExpectedMeasurement, FaultConfig, SimConfig, create_app, mint_token
from simulator.cli import app as cli_app
from simulator.foundation import Foundation

START = datetime(2026, 10, 1, tzinfo=UTC)
BASE = "http://sim.test"
WORLD = {"seed": 21, "orgs": 3, "spaces_per_org": 2, "apps": 90, "services": 40}
INVALID_TOKEN = {"errors": [{"code": 1000, "title": "CF-InvalidAuthToken", "detail": "Invalid Auth Token"}]}

Client = httpx.AsyncClient


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def world() -> Foundation:
    return Foundation(**WORLD)


@pytest.fixture
def make_client(tmp_path: Path) -> Callable[..., Any]:
    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[Client]:
        config = SimConfig(**{**WORLD, "oidc_key_file": str(tmp_path / "oidc-key.pem"), **overrides})
        app = create_app(config)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
            yield client

    return factory


async def get_token(client: Client) -> str:
    resp = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=("billing-collector", "sim-secret")
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def bearer(token: str, hour: datetime | None = None) -> dict[str, str]:
    headers = {"Authorization": f"bearer {token}"}
    if hour is not None:
        headers["X-Sim-Time"] = iso(hour)
    return headers


async def walk(client: Client, url: str, headers: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Follow ``pagination.next`` to the end; returns (all resources, every page body)."""
    resources: list[dict[str, Any]] = []
    pages: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url is not None:
        resp = await client.get(next_url, headers=headers)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages.append(body)
        resources.extend(body["resources"])
        nxt = body["pagination"]["next"]
        next_url = nxt["href"] if nxt else None
    return resources, pages


# ------------------------------------------------------------------------------------ UAA + auth


@pytest.mark.asyncio
async def test_cf_endpoints_require_a_valid_bearer_token(make_client: Callable[..., Any]) -> None:
    async with make_client() as client:
        missing = await client.get("/v3/apps")
        assert missing.status_code == 401
        assert missing.json()["errors"][0]["title"] == "CF-NotAuthenticated"
        wrong = await client.get("/v3/apps", headers=bearer("not-a-token"))
        assert wrong.status_code == 401
        assert wrong.json() == INVALID_TOKEN
        basic = await client.get("/v3/apps", headers={"Authorization": "basic Zm9vOmJhcg=="})
        assert basic.status_code == 401
        ok = await client.get("/v3/apps", headers=bearer(await get_token(client)))
        assert ok.status_code == 200


@pytest.mark.asyncio
async def test_token_endpoint_accepts_basic_auth_or_form_credentials(make_client: Callable[..., Any]) -> None:
    async with make_client(token_ttl_seconds=123, client_id="c1", client_secret="s1") as client:
        by_basic = await client.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=("c1", "s1"))
        assert by_basic.status_code == 200
        body = by_basic.json()
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 123
        assert body["access_token"] and body["jti"] and body["scope"]
        by_form = await client.post(
            "/oauth/token", data={"grant_type": "client_credentials", "client_id": "c1", "client_secret": "s1"}
        )
        assert by_form.status_code == 200
        assert by_form.json()["access_token"] != body["access_token"]
        for token in (body["access_token"], by_form.json()["access_token"]):
            assert (await client.get("/v3/organizations", headers=bearer(token))).status_code == 200

        bad = await client.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=("c1", "nope"))
        assert bad.status_code == 401
        assert bad.json() == {"error": "unauthorized", "error_description": "Bad credentials"}
        grant = await client.post("/oauth/token", data={"grant_type": "password"}, auth=("c1", "s1"))
        assert grant.status_code == 400
        assert grant.json()["error"] == "unsupported_grant_type"


@pytest.mark.asyncio
async def test_a_token_expiring_in_the_middle_of_a_paginated_reading(make_client: Callable[..., Any]) -> None:
    async with make_client(token_ttl_seconds=1) as client:
        token = await get_token(client)
        first = await client.get("/v3/apps?per_page=10", headers=bearer(token))
        assert first.status_code == 200
        next_href = first.json()["pagination"]["next"]["href"]
        await asyncio.sleep(1.3)
        expired = await client.get(next_href, headers=bearer(token))
        assert expired.status_code == 401
        assert expired.json() == INVALID_TOKEN
        resumed = await client.get(next_href, headers=bearer(await get_token(client)))
        assert resumed.status_code == 200
        assert resumed.json()["pagination"]["previous"] is not None


# ------------------------------------------------------------------------------------ pagination


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "expected_guids"),
    [
        ("/v3/apps", lambda f, h: [a.guid for a in f.apps_at(h)]),
        ("/v3/processes", lambda f, h: [p.guid for p in f.processes_at(h)]),
        ("/v3/service_instances", lambda f, h: [s.guid for s in f.service_instances_at(h)]),
        ("/v3/spaces", lambda f, h: [s.guid for s in f.spaces()]),
        ("/v3/organizations", lambda f, h: [o.guid for o in f.orgs()]),
        ("/v3/service_plans", lambda f, h: [p.guid for p in f.plans()]),
    ],
)
async def test_pagination_walk_returns_every_resource_exactly_once(
    make_client: Callable[..., Any], path: str, expected_guids: Callable[[Foundation, datetime], list[str]]
) -> None:
    hour = START + timedelta(hours=30)
    want = expected_guids(world(), hour)
    per_page = 2 if len(want) < 20 else 13
    async with make_client() as client:
        resources, pages = await walk(client, f"{path}?per_page={per_page}", bearer(await get_token(client), hour))
    got = [r["guid"] for r in resources]
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(want)
    total_pages = -(-len(want) // per_page)
    assert len(pages) == total_pages > 1
    for number, body in enumerate(pages, start=1):
        pagination = body["pagination"]
        assert pagination["total_results"] == len(want)
        assert pagination["total_pages"] == total_pages
        assert pagination["first"]["href"] == f"{BASE}{path}?page=1&per_page={per_page}"
        assert pagination["last"]["href"] == f"{BASE}{path}?page={total_pages}&per_page={per_page}"
        if number == 1:
            assert pagination["previous"] is None
        else:
            assert pagination["previous"]["href"] == f"{BASE}{path}?page={number - 1}&per_page={per_page}"
        assert len(body["resources"]) == (per_page if number < total_pages else len(want) - per_page * (number - 1))
    assert pages[-1]["pagination"]["next"] is None


@pytest.mark.asyncio
async def test_pagination_links_keep_the_other_query_parameters(make_client: Callable[..., Any]) -> None:
    async with make_client() as client:
        resp = await client.get(
            "/v3/service_instances?type=managed&per_page=5&page=2", headers=bearer(await get_token(client))
        )
    pagination = resp.json()["pagination"]
    for link in ("first", "last", "next", "previous"):
        parts = urlsplit(pagination[link]["href"])
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{BASE}/v3/service_instances"
        query = parse_qs(parts.query)
        assert query["type"] == ["managed"] and query["per_page"] == ["5"]
    assert parse_qs(urlsplit(pagination["next"]["href"]).query)["page"] == ["3"]
    assert parse_qs(urlsplit(pagination["previous"]["href"]).query)["page"] == ["1"]


@pytest.mark.asyncio
async def test_default_per_page_is_50(make_client: Callable[..., Any]) -> None:
    async with make_client(apps=120) as client:
        body = (await client.get("/v3/apps", headers=bearer(await get_token(client)))).json()
    assert len(body["resources"]) == 50
    assert body["pagination"]["first"]["href"] == f"{BASE}/v3/apps?page=1&per_page=50"


@pytest.mark.asyncio
@pytest.mark.parametrize("query", ["per_page=0", "per_page=5001", "per_page=abc", "page=0", "page=-1"])
async def test_out_of_range_paging_is_a_bad_query_parameter(make_client: Callable[..., Any], query: str) -> None:
    async with make_client() as client:
        resp = await client.get(f"/v3/apps?{query}", headers=bearer(await get_token(client)))
    assert resp.status_code == 400
    (error,) = resp.json()["errors"]
    assert error["code"] == 10005 and error["title"] == "CF-BadQueryParameter"
    assert ("Per page must be between 1 and 5000" if "per_page" in query else "Page must be") in error["detail"]


@pytest.mark.asyncio
async def test_per_page_5000_and_unknown_parameters(make_client: Callable[..., Any]) -> None:
    async with make_client() as client:
        token = await get_token(client)
        big = await client.get("/v3/processes?per_page=5000", headers=bearer(token))
        assert big.status_code == 200 and big.json()["pagination"]["next"] is None
        unknown = await client.get("/v3/apps?colour=red", headers=bearer(token))
        assert unknown.status_code == 400
        assert "Unknown query parameter(s): 'colour'" in unknown.json()["errors"][0]["detail"]
        bad_include = await client.get("/v3/apps?include=droplet", headers=bearer(token))
        assert bad_include.status_code == 400


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.asyncio
async def test_include_space_side_loads_the_spaces_of_the_page(make_client: Callable[..., Any]) -> None:
    f = world()
    spaces = {s.guid: s for s in f.spaces()}
    async with make_client() as client:
        token = await get_token(client)
        body = (await client.get("/v3/apps?per_page=20&include=space", headers=bearer(token))).json()
        both = (await client.get("/v3/apps?per_page=20&include=space.organization", headers=bearer(token))).json()
    page_spaces = {r["relationships"]["space"]["data"]["guid"] for r in body["resources"]}
    included = body["included"]["spaces"]
    assert {s["guid"] for s in included} == page_spaces
    assert len(included) == len(page_spaces)
    for space in included:
        assert space["name"] == spaces[space["guid"]].name
        assert space["relationships"]["organization"]["data"]["guid"] == spaces[space["guid"]].org_guid
    orgs = {o["guid"] for o in both["included"]["organizations"]}
    assert orgs == {spaces[g].org_guid for g in page_spaces}


@pytest.mark.asyncio
async def test_include_service_offering_side_loads_offerings(make_client: Callable[..., Any]) -> None:
    f = world()
    async with make_client() as client:
        body = (
            await client.get("/v3/service_plans?include=service_offering", headers=bearer(await get_token(client)))
        ).json()
    offerings = {o["guid"]: o["name"] for o in body["included"]["service_offerings"]}
    assert sorted(offerings.values()) == ["aws-rds", "redis", "s3"]
    plans = {p.guid: p for p in f.plans()}
    assert len(body["resources"]) == len(plans)
    for plan in body["resources"]:
        offering_guid = plan["relationships"]["service_offering"]["data"]["guid"]
        assert offering_guid == plans[plan["guid"]].offering_guid
        assert offering_guid in offerings
        assert plan["name"] == plans[plan["guid"]].name
        assert plan["links"]["self"]["href"] == f"{BASE}/v3/service_plans/{plan['guid']}"


@pytest.mark.asyncio
async def test_type_managed_filters_out_user_provided_instances(make_client: Callable[..., Any]) -> None:
    hour = START + timedelta(hours=2)
    sis = world().service_instances_at(hour)
    managed = {s.guid for s in sis if s.type == "managed"}
    assert 0 < len(managed) < len(sis)
    async with make_client() as client:
        headers = bearer(await get_token(client), hour)
        filtered, _ = await walk(client, "/v3/service_instances?type=managed&per_page=5000", headers)
        everything, _ = await walk(client, "/v3/service_instances?per_page=5000", headers)
    assert {r["guid"] for r in filtered} == managed
    assert all(r["type"] == "managed" and "service_plan" in r["relationships"] for r in filtered)
    user_provided = [r for r in everything if r["type"] == "user-provided"]
    assert user_provided and all("service_plan" not in r["relationships"] for r in user_provided)


@pytest.mark.asyncio
async def test_processes_link_to_their_app_only_through_links_app_href(make_client: Callable[..., Any]) -> None:
    hour = START + timedelta(hours=8)
    f = world()
    want = {p.guid: p for p in f.processes_at(hour)}
    async with make_client() as client:
        headers = bearer(await get_token(client), hour)
        procs, _ = await walk(client, "/v3/processes?per_page=5000", headers)
        apps, _ = await walk(client, "/v3/apps?per_page=5000", headers)
    app_guids = {a["guid"] for a in apps}
    for proc in procs:
        assert set(proc["relationships"]) == {"revision"}
        href = proc["links"]["app"]["href"]
        assert href.startswith(f"{BASE}/v3/apps/")
        app_guid = href.rsplit("/", 1)[1]
        assert app_guid in app_guids and app_guid == want[proc["guid"]].app_guid
        assert proc["instances"] == want[proc["guid"]].instances
        assert proc["memory_in_mb"] == want[proc["guid"]].memory_in_mb


@pytest.mark.asyncio
async def test_single_resource_endpoints(make_client: Callable[..., Any]) -> None:
    app = world().apps_at(START)[0]
    async with make_client() as client:
        token = await get_token(client)
        found = await client.get(f"/v3/apps/{app.guid}", headers=bearer(token))
        missing = await client.get("/v3/apps/00000000-0000-4000-8000-000000000000", headers=bearer(token))
    assert found.status_code == 200
    assert (found.json()["name"], found.json()["state"]) == (app.name, app.state)
    assert missing.status_code == 404
    assert missing.json()["errors"][0] == {"code": 10010, "title": "CF-ResourceNotFound", "detail": "App not found"}


# ------------------------------------------------------------------------------------ simulated time


@pytest.mark.asyncio
async def test_x_sim_time_and_the_clock_choose_the_observed_hour(make_client: Callable[..., Any]) -> None:
    f = world()
    h1 = START
    h2 = next(
        START + timedelta(hours=n) for n in range(1, 400) if f.apps_at(START + timedelta(hours=n)) != f.apps_at(h1)
    )

    def as_pairs(resources: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((r["guid"], r["state"]) for r in resources)

    def expected(hour: datetime) -> list[tuple[str, str]]:
        return sorted((a.guid, a.state) for a in f.apps_at(hour))

    async with make_client() as client:
        token = await get_token(client)
        at_h1, _ = await walk(client, "/v3/apps?per_page=5000", bearer(token, h1))
        at_h2, _ = await walk(client, "/v3/apps?per_page=5000", bearer(token, h2))
        assert as_pairs(at_h1) == expected(h1) and as_pairs(at_h2) == expected(h2)
        assert as_pairs(at_h1) != as_pairs(at_h2)

        assert (await client.get("/sim/clock")).json() == {"time": iso(START)}
        default, _ = await walk(client, "/v3/apps?per_page=5000", bearer(token))
        assert as_pairs(default) == expected(START)
        moved = await client.put("/sim/clock", json={"time": iso(h2 + timedelta(minutes=42))})
        assert moved.json() == {"time": iso(h2)}
        after, _ = await walk(client, "/v3/apps?per_page=5000", bearer(token))
        assert as_pairs(after) == expected(h2)
        advanced = await client.put("/sim/clock", json={"advance_hours": 3})
        assert advanced.json() == {"time": iso(h2 + timedelta(hours=3))}

        bad = await client.get("/v3/apps", headers={**bearer(token), "X-Sim-Time": "yesterday"})
        assert bad.status_code == 400
        assert (await client.put("/sim/clock", json={"time": "soon"})).status_code == 400


@pytest.mark.asyncio
async def test_sim_expected_serves_the_oracle(make_client: Callable[..., Any]) -> None:
    hour = START + timedelta(hours=50)
    async with make_client() as client:
        body = (await client.get(f"/sim/expected?hour={iso(hour)}")).json()
    assert body["hour"] == iso(hour)
    assert body["measurements"] == [asdict(m) for m in world().expected_usage(hour)]


async def usage_over_http(client: Client, token: str, hour: datetime) -> list[ExpectedMeasurement]:
    """What a collector computes from the CF API alone (the collector's meters)."""
    headers = bearer(token, hour)
    spaces, _ = await walk(client, "/v3/spaces?per_page=7", headers)
    org_of_space = {s["guid"]: s["relationships"]["organization"]["data"]["guid"] for s in spaces}
    apps, _ = await walk(client, "/v3/apps?per_page=11&include=space", headers)
    procs, _ = await walk(client, "/v3/processes?per_page=17", headers)
    sis, _ = await walk(client, "/v3/service_instances?type=managed&per_page=9", headers)
    memory: dict[str, int] = {}
    for proc in procs:
        app_guid = proc["links"]["app"]["href"].rsplit("/", 1)[1]
        memory[app_guid] = memory.get(app_guid, 0) + proc["instances"] * proc["memory_in_mb"]
    out = []
    for app in apps:
        if app["state"] == "STARTED":
            space = app["relationships"]["space"]["data"]["guid"]
            out.append(ExpectedMeasurement("cfapps", app["guid"], "", org_of_space[space], space, memory[app["guid"]]))
    for si in sis:
        space = si["relationships"]["space"]["data"]["guid"]
        plan = si["relationships"]["service_plan"]["data"]["guid"]
        out.append(ExpectedMeasurement("cfservices", si["guid"], plan, org_of_space[space], space, 1))
    return out


@pytest.mark.asyncio
async def test_usage_read_over_http_equals_the_oracle(make_client: Callable[..., Any]) -> None:
    f = world()
    async with make_client() as client:
        token = await get_token(client)
        for hour in (START, START + timedelta(hours=7), START + timedelta(days=12, hours=19)):
            got = await usage_over_http(client, token, hour)
            want = f.expected_usage(hour)
            assert sorted(got, key=repr) == sorted(want, key=repr)


# ------------------------------------------------------------------------------------ faults


@pytest.mark.asyncio
async def test_outage_window_answers_503_by_simulated_hour(make_client: Callable[..., Any]) -> None:
    outage = (START + timedelta(hours=5), START + timedelta(hours=8))
    async with make_client(faults=FaultConfig(outage=[outage])) as client:
        token = await get_token(client)
        for offset, status in ((4, 200), (5, 503), (7, 503), (8, 200)):
            resp = await client.get("/v3/apps", headers=bearer(token, START + timedelta(hours=offset)))
            assert resp.status_code == status, offset
            if status == 503:
                assert resp.json()["errors"][0]["title"] == "CF-ServiceUnavailable"
        await client.put("/sim/clock", json={"time": iso(START + timedelta(hours=6))})
        assert (await client.get("/v3/apps", headers=bearer(token))).status_code == 503
        assert (await client.get("/sim/faults")).json()["outage"] == [[iso(outage[0]), iso(outage[1])]]


@pytest.mark.asyncio
async def test_faults_can_be_replaced_at_runtime(make_client: Callable[..., Any]) -> None:
    async with make_client() as client:
        token = await get_token(client)
        hour = START + timedelta(hours=30)
        assert (await client.get("/v3/apps", headers=bearer(token, hour))).status_code == 200
        window = [iso(hour), iso(hour + timedelta(hours=1))]
        put = await client.put("/sim/faults", json={"outage": [window]})
        assert put.status_code == 200 and put.json()["outage"] == [window]
        assert (await client.get("/v3/apps", headers=bearer(token, hour))).status_code == 503
        assert (await client.put("/sim/faults", json={"error_rate": 2})).status_code == 400
        assert (await client.put("/sim/faults", json={"surprise": 1})).status_code == 400
        await client.put("/sim/faults", json={})
        assert (await client.get("/v3/apps", headers=bearer(token, hour))).status_code == 200


@pytest.mark.asyncio
async def test_error_rate_one_answers_every_cf_request_with_a_5xx(make_client: Callable[..., Any]) -> None:
    async with make_client(faults=FaultConfig(error_rate=1.0, seed=3)) as client:
        token = await get_token(client)  # the UAA endpoint is not affected
        statuses = set()
        for _ in range(20):
            resp = await client.get("/v3/apps", headers=bearer(token))
            statuses.add(resp.status_code)
            assert resp.json()["errors"][0]["code"] in (10001, 10015)
        assert statuses == {502, 503}
        assert (await client.get("/.well-known/openid-configuration")).status_code == 200


@pytest.mark.asyncio
async def test_error_rate_is_reproducible_from_the_fault_seed(make_client: Callable[..., Any]) -> None:
    async def statuses() -> list[int]:
        async with make_client(faults=FaultConfig(error_rate=0.5, seed=9)) as client:
            token = await get_token(client)
            return [(await client.get("/v3/organizations", headers=bearer(token))).status_code for _ in range(30)]

    first = await statuses()
    assert first == await statuses()
    assert 200 in first and any(s >= 500 for s in first)


@pytest.mark.asyncio
async def test_malformed_rate_drops_a_required_field(make_client: Callable[..., Any]) -> None:
    async with make_client(faults=FaultConfig(malformed_rate=1.0)) as client:
        body = (await client.get("/v3/apps?per_page=30", headers=bearer(await get_token(client)))).json()
    assert body["resources"]
    for resource in body["resources"]:
        assert not {"guid", "state", "relationships"} <= resource.keys()


@pytest.mark.asyncio
async def test_timeouts_and_slow_pages_delay_answers(make_client: Callable[..., Any]) -> None:
    async with make_client(faults=FaultConfig(timeout_rate=1.0, timeout_seconds=30)) as client:
        token = await get_token(client)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.get("/v3/apps", headers=bearer(token)), timeout=0.3)
    async with make_client(faults=FaultConfig(slow_page_seconds=0.25)) as client:
        token = await get_token(client)
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert (await client.get("/v3/apps", headers=bearer(token))).status_code == 200
        assert loop.time() - began >= 0.25


# ------------------------------------------------------------------------------------ OIDC


@pytest.mark.asyncio
async def test_oidc_discovery_and_jwks_verify_a_minted_token(make_client: Callable[..., Any], tmp_path: Path) -> None:
    issuer = "http://issuer.test:8090"
    async with make_client(issuer=issuer) as client:
        discovery = (await client.get("/.well-known/openid-configuration")).json()
        assert discovery["issuer"] == issuer
        assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]
        assert discovery["jwks_uri"] == f"{issuer}/.well-known/jwks.json"
        assert discovery["token_endpoint"].startswith(issuer)
        jwks = (await client.get(urlsplit(discovery["jwks_uri"]).path)).json()
    key_file = tmp_path / "oidc-key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    (jwk,) = jwks["keys"]
    assert (jwk["kty"], jwk["alg"], jwk["use"]) == ("RSA", "RS256", "sig") and jwk["kid"]

    token = mint_token(["usage.admin", "usage.read"], ["cust-1", "cust-2"], issuer=issuer, key_file=key_file)
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]
    claims = jwt.decode(token, jwk, algorithms=["RS256"], audience="billing-api", issuer=issuer)
    assert claims["scope"] == "usage.admin usage.read"
    assert claims["customers"] == ["cust-1", "cust-2"]
    assert claims["sub"] == "dev-user"
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]

    foreign = mint_token(["usage.admin"], issuer=issuer, key_file=tmp_path / "other-key.pem")
    with pytest.raises(JWTError):
        jwt.decode(foreign, jwk, algorithms=["RS256"], audience="billing-api", issuer=issuer)
    expired = mint_token(["usage.read"], issuer=issuer, key_file=key_file, ttl=-10)
    with pytest.raises(JWTError):
        jwt.decode(expired, jwk, algorithms=["RS256"], audience="billing-api", issuer=issuer)


@pytest.mark.asyncio
async def test_oidc_token_endpoint_issues_verifiable_jwts(make_client: Callable[..., Any]) -> None:
    async with make_client() as client:
        jwk = (await client.get("/.well-known/jwks.json")).json()["keys"][0]
        resp = await client.post(
            "/oidc/token",
            data={"grant_type": "client_credentials", "scope": "usage.read", "customers": "c-9"},
            auth=("billing-user", "sim-secret"),
        )
        assert resp.status_code == 200
        bad = await client.post("/oidc/token", data={"grant_type": "client_credentials"}, auth=("billing-user", "x"))
        assert bad.status_code == 401
    claims = jwt.decode(
        resp.json()["access_token"], jwk, algorithms=["RS256"], audience="billing-api", issuer="http://127.0.0.1:8090"
    )
    assert claims["scope"] == "usage.read" and claims["customers"] == ["c-9"]


@pytest.mark.asyncio
async def test_billing_token_command_signs_with_the_key_the_server_publishes(
    make_client: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_OIDC_KEY_FILE", str(tmp_path / "oidc-key.pem"))
    async with make_client(oidc_key_file=None) as client:
        jwk = (await client.get("/.well-known/jwks.json")).json()["keys"][0]
    result = CliRunner().invoke(
        cli_app,
        ["token", "--scope", "usage.admin", "--customer", "a", "--customer", "b", "--subject", "ops", "--ttl", "60"],
    )
    assert result.exit_code == 0, result.output
    claims = jwt.decode(
        result.output.strip(), jwk, algorithms=["RS256"], audience="billing-api", issuer="http://127.0.0.1:8090"
    )
    assert (claims["scope"], claims["customers"], claims["sub"]) == ("usage.admin", ["a", "b"], "ops")
    assert claims["exp"] - claims["iat"] == 60
