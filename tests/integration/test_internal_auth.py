"""The token attack matrix against the collector's, pricer's and ledger's own routes (each its real app:
lifespan, pool, migrations; the issuer on a random port; a real database): every command route — and
every other /internal route — refuses a request without a token, with a malformed Authorization header,
with every forged, expired, misdirected or tampered token (401 problem+json with a Bearer challenge, each
token carrying usage.admin had it been accepted), and a valid token without usage.admin (403, a reader's
token naming a customer included). None of them changes anything; a valid admin token is answered."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from services.collector.app import create_app as collector_app
from services.collector.settings import CollectorSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings
from shared.edge import Operation
from tests.conftest import Database, Infra
from tests.support.tokens import LocalIssuer, attacks

pytestmark = pytest.mark.integration

CUSTOMER = str(uuid.uuid4())
SAMPLE = {
    "customer_id": CUSTOMER,
    "transaction_id": str(uuid.uuid4()),
    "price_id": str(uuid.uuid4()),
    "rerate_id": str(uuid.uuid4()),
    "month": "2026-10",
}
# A body each command would accept: an attempt that got through would change something.
BODIES: dict[str, Any] = {
    "/internal/tiers": {"name": "attack", "credits_per_period": 1_000_000},
    "/internal/customers": {"name": "Attack", "tier": "attack"},
    "/internal/org-assignments": {"org_id": "org-x", "customer_id": CUSTOMER, "starts_at": "2026-10-01T04:00:00Z"},
    "/internal/agreements": {
        "customer_id": CUSTOMER, "starts_at": "2026-10-01T04:00:00Z", "ends_at": "2027-10-01T04:00:00Z",
    },
    "/internal/prices": {
        "meter": "cfapps", "unit_of_measure": "MB-hour", "microcredits_per_unit": 1, "unit": 1,
        "valid_from": "2026-10-01T00:00:00Z",
    },
    "/internal/prices/{price_id}/end": {"at": "2026-11-01T00:00:00Z"},
    "/internal/readings": {"hour": "2026-10-01T04:00:00Z"},
    "/internal/transactions/{transaction_id}/reverse": {"reason": "attack"},
    "/internal/rerates": {
        "meter": "cfapps", "resource_kind": "", "from": "2026-10-01T04:00:00Z", "to": "2026-10-02T04:00:00Z",
        "reason": "attack", "price": {"unit_of_measure": "MB-hour", "microcredits_per_unit": 1, "unit": 1},
    },
}
QUERIES = {"/internal/completeness": {"from": "2026-10-01T04:00:00Z", "to": "2026-10-01T05:00:00Z"}}
# What each service holds: nothing of it may appear after the attempts.
TABLES = {
    "ledger": ("tiers", "customers", "agreements", "org_assignments", "transactions", "month_closes", "statements"),
    "pricer": ("prices", "rerate_jobs"),
    "collector": ("readings",),
}


@contextlib.asynccontextmanager
async def services(
    infra: Infra, database: Database, prefix: str, issuer: LocalIssuer
) -> AsyncIterator[dict[str, Starlette]]:
    common: dict[str, Any] = {
        "kafka_bootstrap_servers": infra.kafka, "topic_prefix": prefix, "port": 1, "oidc_issuer": issuer.url,
    }
    apps = {
        "ledger": ledger_app(
            LedgerSettings(database_url=database.dsn("ledger"), periodic_interval_seconds=0, **common)
        ),
        "pricer": pricer_app(PricerSettings(database_url=database.dsn("pricer"), **common)),
        # Cloud Foundry is never asked: a refused reading never reaches the collector's use case.
        "collector": collector_app(
            CollectorSettings(
                database_url=database.dsn("collector"), cf_api_url="http://127.0.0.1:9", uaa_url="http://127.0.0.1:9",
                schedule_enabled=False, **common,
            )
        ),
    }
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield apps


def routes(app: Starlette) -> list[Operation]:
    return [op for op in app.state.runtime.operations if op.path.startswith("/internal/")]


async def request(app: Starlette, op: Operation, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://internal") as client:
        return await client.request(
            op.method, op.path.format(**SAMPLE), params=QUERIES.get(op.path), json=BODIES.get(op.path),
            headers=headers,
        )


async def counts(database: Database) -> dict[str, int]:
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        return {
            f"{schema}.{table}": int(await conn.fetchval(f"SELECT count(*) FROM {schema}.{table}"))
            for schema, tables in TABLES.items()
            for table in tables
        }
    finally:
        await conn.close()


async def test_every_internal_route_refuses_every_attack_and_changes_nothing(
    infra: Infra, database: Database, topic_prefix: str, issuer: LocalIssuer
) -> None:
    forged = attacks(issuer, CUSTOMER, scopes=("usage.admin",))
    # Enough to be the matrix the api passes, and more: expiry and issuer tampered with too.
    assert {"alg_none", "hs256_with_rsa_public_key", "tampered_payload", "tampered_expiry", "tampered_issuer",
            "expired", "wrong_issuer", "unknown_kid"} <= set(forged)
    not_allowed = {
        "no scope": issuer.bearer(scopes=[]),
        "other scopes": issuer.bearer(scopes=["openid", "usage.write"]),
        "a reader of the customer": issuer.bearer(scopes=["usage.read"], customers=[CUSTOMER]),
        "a reader of another customer": issuer.bearer(scopes=["usage.read"], customers=[str(uuid.uuid4())]),
    }
    async with services(infra, database, topic_prefix, issuer) as apps:
        before = await counts(database)
        await asyncio.sleep(0.1)
        tried: dict[str, set[str]] = {}
        for service, app in apps.items():
            ops = routes(app)
            commands = {op.name for op in ops if op.command is not None}
            assert commands, service  # each service has commands, and they are declared as such
            for op in ops:
                tried.setdefault(service, set()).add(op.name)
                r = await request(app, op, {})
                assert r.status_code == 401, (service, op.name, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer realm=")
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["type"].endswith("/unauthorized")
                for bad in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "bearer  ", "Token abc"):
                    r = await request(app, op, {"authorization": bad})
                    assert r.status_code == 401, (service, op.name, bad)
                for name, token in forged.items():
                    r = await request(app, op, {"authorization": f"Bearer {token}"})
                    assert r.status_code == 401, (service, op.name, name, r.status_code, r.text)
                    assert 'error="invalid_token"' in r.headers["www-authenticate"], (op.name, name)
                    assert r.json()["status"] == 401
                for name, headers in not_allowed.items():
                    r = await request(app, op, headers)
                    assert r.status_code == 403, (service, op.name, name, r.text)
                    assert 'error="insufficient_scope", scope="usage.admin"' in r.headers["www-authenticate"]
                    assert r.json()["type"].endswith("/forbidden")
            assert commands <= tried[service]
        assert await counts(database) == before  # nothing was created, funded, priced or read
        # The same routes answer an admin: a tier is created (the refusals above were the tokens').
        ledger = apps["ledger"]
        create = next(op for op in routes(ledger) if op.name == "POST /internal/tiers")
        made = await request(ledger, create, issuer.bearer(sub="admin-1"))
        assert made.status_code == 201, made.text
        listed = next(op for op in routes(apps["pricer"]) if op.name == "GET /internal/prices")
        assert (await request(apps["pricer"], listed, issuer.bearer())).status_code == 200
    assert (await counts(database))["ledger.tiers"] == before["ledger.tiers"] + 1


async def test_the_verified_caller_is_on_the_request(infra: Infra, database: Database, topic_prefix: str,
                                                     issuer: LocalIssuer) -> None:
    """What an audit trail reads: ``request.state.principal`` with the token's subject and scopes."""
    seen: list[Any] = []
    async with services(infra, database, topic_prefix, issuer) as apps:
        app = apps["ledger"]
        op = next(o for o in routes(app) if o.name == "GET /internal/tiers")

        async def spy(scope: Any, receive: Any, send: Any) -> None:
            async def capture(message: Any) -> None:
                if message["type"] == "http.response.start":
                    seen.append(scope.get("state", {}).get("principal"))
                await send(message)

            await app(scope, receive, capture)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=spy), base_url="http://internal") as client:
            r = await client.get(op.path, headers=issuer.bearer(sub="alice\u00e9", scopes=["usage.admin", "openid"]))
        assert r.status_code == 200
    [principal] = seen
    assert principal.subject == "alice\u00e9" and principal.scopes == frozenset({"usage.admin", "openid"})
