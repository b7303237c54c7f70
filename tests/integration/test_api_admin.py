"""Admin commands through the running api to a stub owner on a real port: the owner's status and body
come back, its problems unchanged; an owner that is down gives 502."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import Database, Infra
from tests.sim_server import serve_app
from tests.support.api_harness import running_api

pytestmark = pytest.mark.integration


def ledger_stub(calls: list[tuple[str, str, bytes]]) -> Starlette:
    async def customers(request: Request) -> Response:
        body = await request.body()
        calls.append((request.method, request.url.path, body))
        if request.method == "GET":
            return JSONResponse({"items": [{"id": "c-1", "name": "Agency A"}], "next_cursor": None})
        if b'"name"' not in body:
            return JSONResponse(
                {
                    "type": "about:blank", "title": "Invalid request body", "status": 422,
                    "detail": "name: Field required",
                },
                status_code=422,
                media_type="application/problem+json",
            )
        return JSONResponse({"id": "c-2", "name": "Agency B"}, status_code=201)

    async def close(request: Request) -> Response:
        calls.append((request.method, request.url.path, await request.body()))
        return JSONResponse({"month": request.path_params["month"], "statements": 3})

    return Starlette(
        routes=[
            Route("/internal/customers", customers, methods=["GET", "POST"]),
            Route("/internal/months/{month}/close", close, methods=["POST"]),
        ]
    )


async def test_admin_commands_reach_the_owner_and_come_back_as_it_answered(
    infra: Infra, database: Database, topic_prefix: str
) -> None:
    calls: list[tuple[str, str, bytes]] = []
    async with serve_app(ledger_stub(calls)) as ledger_url:
        async with running_api(infra, database, topic_prefix, ledger_url=ledger_url) as h:
            created = await h.client.post("/admin/customers", json={"name": "Agency B"}, headers=h.admin)
            assert created.status_code == 201 and created.json() == {"id": "c-2", "name": "Agency B"}
            listed = await h.client.get("/admin/customers", params={"limit": "5"}, headers=h.admin)
            assert listed.status_code == 200 and listed.json()["items"][0]["name"] == "Agency A"
            refused = await h.client.post("/admin/customers", json={"nom": "x"}, headers=h.admin)
            assert refused.status_code == 422
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["detail"] == "name: Field required"
            closed = await h.client.post("/admin/months/2026-10/close", headers=h.admin)
            assert closed.json() == {"month": "2026-10", "statements": 3}
            # the collector is not running (port 9): 502, as a problem
            down = await h.client.post("/admin/readings", json={}, headers=h.admin)
            assert down.status_code == 502 and down.json()["title"] == "Bad Gateway"
            # readers cannot send admin commands at all
            denied = await h.client.post("/admin/customers", json={"name": "x"}, headers=h.headers())
            assert denied.status_code == 403
    assert [(m, p) for m, p, _ in calls] == [
        ("POST", "/internal/customers"),
        ("GET", "/internal/customers"),
        ("POST", "/internal/customers"),
        ("POST", "/internal/months/2026-10/close"),
    ]
    assert calls[0][2] == b'{"name":"Agency B"}'
