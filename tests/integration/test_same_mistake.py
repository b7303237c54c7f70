"""The same mistake gets the same answer everywhere: every route of every service (the collector, the pricer,
the ledger and the api, each its real app served over HTTP, the api forwarding to the others), read from
the OpenAPI document each serves, is sent the same bad time, cursor, UUID, month, body, unknown
parameter and malformed Idempotency-Key (every command route) — one mistake at a time, everything else valid,
with an admin's token — and each mistake is answered with one status and one problem ``type`` across all
of them. Never a 5xx."""

from __future__ import annotations

import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from services.collector.app import create_app as collector_app
from services.collector.settings import CollectorSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings
from shared.edge.problems import TYPE_BASE
from tests.conftest import Database, Infra
from tests.sim_server import serve_app
from tests.support.api_harness import running_api
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

GOOD = {
    "uuid": str(uuid.uuid4()),
    "month": "2026-10",
    "from": "2026-10-01T04:00:00Z",
    "to": "2026-10-02T04:00:00Z",  # a whole day in America/New_York: valid for every route
    "subject": "carol",
}
# Each mistake: the values that make it, and the one answer every service must give.
MISTAKES: dict[str, tuple[list[str], tuple[int, str]]] = {
    "bad time": (
        ["2026-10-01T04:00:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59.999999-01:00",
         "2026-10-01T04:00:00Z\n", "٢٠٢٦-10-01T04:00:00Z"],
        (422, "invalid-parameter"),
    ),
    "bad cursor": (["e30", "!!", "WyJ4Il0", "a" * 3000], (422, "invalid-cursor")),
    "bad uuid": (["not-a-uuid", f"{GOOD['uuid']}\n", GOOD["uuid"].replace("-", ""), f"{{{GOOD['uuid']}}}"],
                 (422, "invalid-parameter")),
    "bad month": (["2026-13", "٢٠٢٦-10", "2026-10\n", "9999-12"], (422, "invalid-parameter")),
    "unknown parameter": (["1"], (422, "invalid-parameter")),
    "duplicate keys in the body": (['{"a": 1, "a": 2}'], (422, "invalid-body")),
    "a number that is not one": (['{"limit": "5", "credits_per_period": 5.0}'], (422, "invalid-body")),
    "a body that is not JSON": (["name=x"], (415, "unsupported-media-type")),
    "bad idempotency key": (["k" * 256, ""], (400, "invalid-idempotency-key")),
    "no such route": (["/nope"], (404, "not-found")),
    "no such method": (["PUT"], (405, "method-not-allowed")),
}


@contextlib.asynccontextmanager
async def four_services(
    infra: Infra, database: Database, prefix: str, issuer: LocalIssuer
) -> AsyncIterator[dict[str, tuple[str, dict[str, Any]]]]:
    """Each service's base URL and OpenAPI document."""
    common: dict[str, Any] = {
        "kafka_bootstrap_servers": infra.kafka, "topic_prefix": prefix, "port": 1, "oidc_issuer": issuer.url,
    }
    owners: dict[str, Starlette] = {
        "ledger": ledger_app(
            LedgerSettings(database_url=SecretStr(database.dsn("ledger")), periodic_interval_seconds=0, **common)
        ),
        "pricer": pricer_app(PricerSettings(database_url=SecretStr(database.dsn("pricer")), **common)),
        "collector": collector_app(
            CollectorSettings(
                database_url=SecretStr(database.dsn("collector")), cf_api_url="http://127.0.0.1:9", uaa_url="http://127.0.0.1:9",
                schedule_enabled=False, **common,
            )
        ),
    }
    async with contextlib.AsyncExitStack() as stack:
        urls = {}
        for name, app in owners.items():
            await stack.enter_async_context(app.router.lifespan_context(app))
            urls[name] = await stack.enter_async_context(serve_app(app))
        overrides = {f"{name}_url": url for name, url in urls.items()}
        api = await stack.enter_async_context(running_api(infra, database, prefix, issuer, **overrides))
        urls["api"] = await stack.enter_async_context(serve_app(api.app))
        apps = {**owners, "api": api.app}
        yield {name: (urls[name], apps[name].state.runtime.openapi_document()) for name in apps}


def kind_of(param: dict[str, Any]) -> str:
    schema = param["schema"]
    if schema.get("format") == "date-time":
        return "time"
    if schema.get("format") == "uuid":
        return "uuid"
    if param["name"] == "month":
        return "month"
    if param["name"] == "cursor":
        return "cursor"
    return "other"


def valid(param: dict[str, Any]) -> str:
    kind = kind_of(param)
    if kind == "time":
        return GOOD["to"] if param["name"] == "to" else GOOD["from"]
    return {"uuid": GOOD["uuid"], "month": GOOD["month"]}.get(kind, GOOD.get(param["name"], "x"))


def requests(path: str, method: str, op: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(mistake, request) for each mistake this route can be sent, one at a time."""
    params = op.get("parameters", [])
    path_values = {p["name"]: valid(p) for p in params if p["in"] == "path"}
    query = {p["name"]: valid(p) for p in params if p["in"] == "query" and p["required"]}
    base = {"method": method.upper(), "path": path.format(**path_values), "params": query}
    out: list[tuple[str, dict[str, Any]]] = []
    mistake_of = {"time": "bad time", "cursor": "bad cursor", "uuid": "bad uuid", "month": "bad month"}
    for p in params:
        mistake = mistake_of.get(kind_of(p))
        if mistake is None:
            continue
        for bad in MISTAKES[mistake][0]:
            if p["in"] == "path":
                wrong = path.format(**(path_values | {p["name"]: quote(bad, safe="")}))
                out.append((mistake, base | {"path": wrong}))
            else:
                out.append((mistake, base | {"params": query | {p["name"]: bad}}))
    out.append(("unknown parameter", base | {"params": query | {"surprise": "1"}}))
    if any(p["in"] == "header" and p["name"] == "Idempotency-Key" for p in params):
        for bad in MISTAKES["bad idempotency key"][0]:
            out.append(("bad idempotency key", base | {"headers": {"idempotency-key": bad}}))
    if "requestBody" in op:
        for mistake in ("duplicate keys in the body", "a number that is not one", "a body that is not JSON"):
            ctype = "text/plain" if mistake == "a body that is not JSON" else "application/json"
            for raw in MISTAKES[mistake][0]:
                out.append((mistake, base | {"content": raw.encode(), "headers": {"content-type": ctype}}))
    return out


async def test_every_route_of_every_service_answers_the_same_mistake_alike(
    infra: Infra, database: Database, topic_prefix: str, issuer: LocalIssuer
) -> None:
    answers: dict[str, set[tuple[int, str]]] = defaultdict(set)
    where: dict[str, set[str]] = defaultdict(set)
    examples: dict[tuple[str, tuple[int, str]], str] = {}
    async with (
        four_services(infra, database, topic_prefix, issuer) as services,
        httpx.AsyncClient(timeout=30, headers=issuer.bearer()) as client,
    ):

        async def send(service: str, mistake: str, req: dict[str, Any]) -> None:
            url = services[service][0]
            headers = {**client.headers, **req.pop("headers", {})}
            r = await client.request(req.pop("method"), url + req.pop("path"), headers=headers, **req)
            assert r.status_code < 500, (service, mistake, r.text)
            assert r.headers["content-type"] == "application/problem+json", (service, mistake, r.text)
            body = r.json()
            assert body["type"].startswith(TYPE_BASE) and body["status"] == r.status_code, body
            got = (r.status_code, body["type"].removeprefix(TYPE_BASE))
            answers[mistake].add(got)
            where[mistake].add(service)
            examples.setdefault((mistake, got), f"{service}: {r.request.method} {r.request.url} -> {body}")

        for service, (_, doc) in services.items():
            for path, ops in doc["paths"].items():
                for method, op in ops.items():
                    for mistake, req in requests(path, method, op):
                        await send(service, mistake, req)
            await send(service, "no such route", {"method": "GET", "path": "/nope"})
            await send(service, "no such method", {"method": "PUT", "path": next(iter(doc["paths"]))})
    for mistake, (_, expected) in MISTAKES.items():
        assert answers[mistake] == {expected}, (mistake, {a: examples[(mistake, a)] for a in answers[mistake]})
    # Every service was sent every mistake it has a place for: the walk covered them all.
    everywhere = {"collector", "pricer", "ledger", "api"}
    for mistake in ("bad time", "bad cursor", "unknown parameter", "duplicate keys in the body",
                    "a body that is not JSON", "bad idempotency key", "no such route", "no such method"):
        assert where[mistake] == everywhere, (mistake, where[mistake])
    assert where["bad uuid"] == {"pricer", "ledger", "api"}
    assert where["bad month"] == {"ledger", "api"}
