"""Admin commands forwarded to their owners: the right service and path, validated parameters only, the
caller's token (and nothing else of the caller's headers but an Idempotency-Key), the owner's status and
body (problem+json too) returned as given, 502/504 when the owner is away. The owners here are a stub
Starlette app reached through httpx's ASGI transport (no network); the api's routes are built from the
same declarations as in the app, with a stand-in for token verification."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.api.forward import ADMIN_ROUTES, Forwarder, admin_operations
from shared.auth import Principal
from shared.edge import starlette_routes
from shared.http import exception_handlers

BASES = {"ledger": "http://ledger.test", "pricer": "http://pricer.test", "collector": "http://collector.test"}


def stub_owner(seen: list[dict[str, object]]) -> Starlette:
    async def echo(request: Request) -> Response:
        record: dict[str, object] = {
            "service": request.url.hostname.split(".")[0] if request.url.hostname else "",
            "method": request.method,
            "path": request.url.path,
            "query": dict(request.query_params),
            "body": (await request.body()).decode(),
            "content_type": request.headers.get("content-type"),
            "authorization": request.headers.get("authorization"),
            "idempotency_key": request.headers.get("idempotency-key"),
            "actor": request.headers.get("x-billing-actor"),
        }
        seen.append(record)
        if request.url.path == "/internal/tiers" and request.method == "POST":
            problem = {
                "type": "about:blank", "title": "Invalid tier", "status": 422, "detail": "credits must be positive"
            }
            return Response(orjson.dumps(problem), status_code=422, media_type="application/problem+json")
        if request.url.path.startswith("/internal/customers/"):
            body = b'{"title":"Not Found","status":404}'
            return Response(body, status_code=404, media_type="application/problem+json")
        status = 201 if request.method == "POST" else 200
        return JSONResponse(record, status_code=status, headers={"location": "/internal/x"})

    return Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "POST"])])


class Admin:
    """Stands in for the token verification: every caller is an admin whose subject is not ASCII."""

    realm = "test"

    async def principal(self, request: Request, scope: str) -> Principal:
        return Principal("adm\u00efn-\u2603", frozenset({"usage.admin"}), frozenset(), 2**40, token="t-admin")


def api_app(forwarder: Forwarder) -> Starlette:
    app = Starlette(
        routes=starlette_routes(admin_operations(lambda call: forwarder)),
        exception_handlers=dict(exception_handlers),
    )
    app.state.authenticator = Admin()
    return app


Setup = tuple[httpx.AsyncClient, list[dict[str, object]]]  # a client of the api's admin routes and what the owner saw


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    seen: list[dict[str, object]] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stub_owner(seen))) as upstream:
        app = api_app(Forwarder(upstream, BASES))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            yield client, seen


def concrete(path: str) -> str:
    return (
        path.replace("{customer_id}", "0190a000-0000-7000-8000-00000000000A")
        .replace("{transaction_id}", "0190a000-0000-7000-8000-00000000000B")
        .replace("{price_id}", "0190a000-0000-7000-8000-00000000000C")
        .replace("{rerate_id}", "0190a000-0000-7000-8000-00000000000D")
        .replace("{month}", "2026-10")
    )


EXPECTED = {  # our route -> (owner, the owner's path), written out rather than derived from ADMIN_ROUTES
    "/admin/customers": ("ledger", "/internal/customers"),
    "/admin/customers/{customer_id}": ("ledger", "/internal/customers/0190a000-0000-7000-8000-00000000000a"),
    "/admin/tiers": ("ledger", "/internal/tiers"),
    "/admin/org-assignments": ("ledger", "/internal/org-assignments"),
    "/admin/agreements": ("ledger", "/internal/agreements"),
    "/admin/months/{month}/close": ("ledger", "/internal/months/2026-10/close"),
    "/admin/statements/amend": ("ledger", "/internal/statements/amend"),
    "/admin/transactions/{transaction_id}/reverse": (
        "ledger", "/internal/transactions/0190a000-0000-7000-8000-00000000000b/reverse"
    ),
    "/admin/unassigned": ("ledger", "/internal/held"),
    "/admin/prices": ("pricer", "/internal/prices"),
    "/admin/prices/{price_id}/end": ("pricer", "/internal/prices/0190a000-0000-7000-8000-00000000000c/end"),
    "/admin/unpriced": ("pricer", "/internal/charges/unpriced"),
    "/admin/rerate": ("pricer", "/internal/rerates"),
    "/admin/rerates": ("pricer", "/internal/rerates"),
    "/admin/rerates/{rerate_id}": ("pricer", "/internal/rerates/0190a000-0000-7000-8000-00000000000d"),
    "/admin/readings": ("collector", "/internal/readings"),
}


async def test_every_admin_route_reaches_its_owner_with_method_path_and_body(setup: Setup) -> None:
    client, seen = setup
    assert {r.path for r in ADMIN_ROUTES} == set(EXPECTED)
    for route in ADMIN_ROUTES:
        for method in (route.method,):
            seen.clear()
            body = b'{"name": "Agency A", "tier": "gold"}' if method == "POST" else b""
            headers = {"content-type": "application/json"}
            r = await client.request(method, concrete(route.path), content=body, headers=headers)
            if (route.path == "/admin/tiers" and method == "POST") or route.path == "/admin/customers/{customer_id}":
                continue  # the stub answers these with problems: see the next test
            assert r.status_code == (201 if method == "POST" else 200), (route.path, r.text)
            [got] = seen
            owner, upstream_path = EXPECTED[route.path]
            assert (got["service"], got["method"], got["path"]) == (owner, method, upstream_path)
            assert got["authorization"] == "Bearer t-admin"  # the caller's token, for the owner to verify
            assert got["actor"] is None  # nothing else speaks for the caller
            assert r.json() == got  # the owner's body, as it gave it
            assert "location" not in r.headers  # internal paths are not passed on
            if method == "POST":
                assert got["body"] == body.decode() and got["content_type"] == "application/json"


async def test_the_owners_problems_come_back_unchanged(setup: Setup) -> None:
    client, _ = setup
    r = await client.post("/admin/tiers", json={"name": "x", "credits": -1})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == {
        "type": "about:blank", "title": "Invalid tier", "status": 422, "detail": "credits must be positive"
    }
    r = await client.get(f"/admin/customers/{uuid.uuid4()}")
    assert r.status_code == 404 and r.json() == {"title": "Not Found", "status": 404}


async def test_only_validated_query_parameters_are_passed_on(setup: Setup) -> None:
    client, seen = setup
    cid = str(uuid.uuid4())
    r = await client.get("/admin/agreements", params={"customer_id": cid, "limit": "10", "cursor": "abc-_"})
    assert r.status_code == 200
    assert seen[-1]["query"] == {"customer_id": cid, "limit": "10", "cursor": "abc-_"}
    seen.clear()
    for params in ({"customer_id": "x' OR 1=1"}, {"limit": "0"}, {"evil": "1"}, {"org_id": "a b"}, {"at": "yesterday"}):
        r = await client.get("/admin/agreements", params=params)
        assert r.status_code == 422, params
        assert r.headers["content-type"] == "application/problem+json"
    r = await client.post("/admin/readings", params={"force": "1"}, json={})
    assert r.status_code == 422
    assert seen == []  # none of them reached the owner


async def test_bad_path_parameters_never_reach_the_owner(setup: Setup) -> None:
    client, seen = setup
    for path in (
        "/admin/months/2026-13/close",
        "/admin/months/..%2F..%2Fadmin/close",
        "/admin/prices/not-a-uuid/end",
        "/admin/prices/0190a000-0000-7000-8000-00000000000c%0A/end",
        "/admin/months/%D9%A2%D9%A0%D9%A2%D9%A6-10/close",
    ):
        r = await client.post(path)
        assert 400 <= r.status_code < 500, path
    assert seen == []


async def test_only_an_idempotency_key_and_a_safe_content_type_travel_with_the_body(setup: Setup) -> None:
    client, seen = setup
    r = await client.post("/admin/readings", content=b"{}", headers={"content-type": "application/json",
                                                                    "idempotency-key": "k-1", "x-billing-actor": "me"})
    assert r.status_code == 201
    got = (seen[-1]["idempotency_key"], seen[-1]["actor"], seen[-1]["content_type"])
    assert got == ("k-1", None, "application/json")
    r = await client.post(
        "/admin/readings", content=b"{}", headers={b"content-type": "application/json; x=\u00e9".encode("latin-1")}
    )
    assert r.status_code == 201 and seen[-1]["content_type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("error", "status"),
    [(httpx.ConnectError("refused"), 502), (httpx.ReadTimeout("slow"), 504), (httpx.RemoteProtocolError("eof"), 502)],
)
async def test_an_owner_that_is_away_gives_502_or_504(error: Exception, status: int) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    async with httpx.AsyncClient(transport=httpx.MockTransport(fail)) as upstream:
        app = api_app(Forwarder(upstream, BASES))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            r = await client.post("/admin/customers", json={"name": "x"})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status


def test_the_forwarded_price_routes_document_the_scope_of_a_rate_card() -> None:
    from tests.support.openapi_checks import DOC

    schemas = DOC["components"]["schemas"]
    body = DOC["paths"]["/admin/prices"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    price_in = schemas[body["$ref"].split("/")[-1]]
    assert {"$ref": "#/components/schemas/PriceScope"} in price_in["properties"]["scope"]["anyOf"]
    assert set(schemas["PriceScope"]["properties"]) == {"tier", "customer"}
    assert schemas["PriceScope"]["additionalProperties"] is False
    assert "scope" in schemas["PriceOut"]["properties"]
