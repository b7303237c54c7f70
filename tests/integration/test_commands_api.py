"""Admin commands end to end: the api, with tokens from a local issuer, forwarding to the real ledger, pricer
and collector (each on a real port, on the real database and broker). Funding, reversal, month close and
price commands appear in ``GET /admin/audit`` (merged from the three services and the api's own entitlement
commands, paged) with the subject of the token that sent them, and on the dashboard's audit page; a command
whose answer timed out at the api is sent again with its Idempotency-Key and answered once, the books funded
once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from services.collector.app import create_app as collector_app
from services.collector.settings import CollectorSettings
from services.ledger.app import create_app as ledger_app
from services.ledger.settings import LedgerSettings
from services.pricer.app import create_app as pricer_app
from services.pricer.settings import PricerSettings
from tests.conftest import Database, Infra
from tests.sim_server import serve_app
from tests.support.api_harness import ApiHarness, running_api
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

CREDITS = 9_000_000
PRICE = {
    "meter": "cfapps", "resource_kind": "", "unit_of_measure": "MB-hour", "microcredits_per_unit": 1_000_000,
    "unit": 730 * 1024, "valid_from": "2026-01-01T00:00:00Z",
}


@asynccontextmanager
async def owners(database: Database, infra: Infra, prefix: str, issuer: LocalIssuer) -> AsyncIterator[dict[str, Any]]:
    """The ledger, pricer and collector, lifespans started, each served on a random local port, verifying the
    tokens of ``issuer`` (the api's: it forwards its callers' tokens)."""
    common: dict[str, Any] = {
        "kafka_bootstrap_servers": infra.kafka, "topic_prefix": prefix, "port": 1, "oidc_issuer": issuer.url,
    }
    apps = {
        "ledger": ledger_app(
            LedgerSettings(
                database_url=SecretStr(database.dsn("ledger")),
                periodic_interval_seconds=0,
                batch_timeout_ms=100,
                **common,
            )
        ),
        "pricer": pricer_app(
            PricerSettings(database_url=SecretStr(database.dsn("pricer")), maintenance_interval_seconds=3600, **common)
        ),
        # Nothing here takes a reading: the Cloud Foundry API it would read is never asked.
        "collector": collector_app(
            CollectorSettings(
                database_url=SecretStr(database.dsn("collector")),
                schedule_enabled=False,
                cf_api_url="http://127.0.0.1:9",
                uaa_url="http://127.0.0.1:9",
                **common,
            )
        ),
    }
    async with AsyncExitStack() as running:
        urls = {}
        for name, app in apps.items():
            await running.enter_async_context(app.router.lifespan_context(app))
            urls[f"{name}_url"] = await running.enter_async_context(serve_app(app))
        yield urls


@asynccontextmanager
async def stack(
    database: Database, infra: Infra, prefix: str, issuer: LocalIssuer, **api: Any
) -> AsyncIterator[ApiHarness]:
    async with (
        owners(database, infra, prefix, issuer) as urls,
        running_api(infra, database, prefix, issuer, **urls, **api) as h,
    ):
        yield h


def key(k: str) -> dict[str, str]:
    return {"Idempotency-Key": k}


async def ledger_value(database: Database, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(database.admin_dsn, server_settings={"search_path": "ledger"})
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def test_commands_appear_in_the_audit_trail_with_the_subject_of_their_token(
    infra: Infra, database: Database, topic_prefix: str, issuer: LocalIssuer
) -> None:
    async with stack(database, infra, topic_prefix, issuer) as h:
        c, admin = h.client, h.admin  # admin: subject admin-1
        ops = h.headers(scopes=["usage.admin"], sub="ops-2")
        assert (await c.post("/admin/tiers", json={"name": "gold", "credits_per_period": CREDITS},
                             headers=admin)).status_code == 201
        customer = (await c.post("/admin/customers", json={"name": "Agency", "tier": "gold"}, headers=admin)).json()
        agreement = {"customer_id": customer["id"], "starts_at": "2025-01-01T05:00:00Z",
                     "ends_at": "2027-01-01T05:00:00Z"}
        funded = await c.post("/admin/agreements", json=agreement, headers=admin | key("fund-1"))
        again = await c.post("/admin/agreements", json=agreement, headers=admin | key("fund-1"))
        assert funded.status_code == again.status_code == 201 and again.json() == funded.json()
        assert again.headers["idempotent-replayed"] == "true"
        funding = funded.json()["funding_transaction_id"]
        reversed_ = await c.post(f"/admin/transactions/{funding}/reverse", json={"reason": "wrong amount"},
                                 headers=ops | key("rev-1"))
        assert reversed_.status_code == 201
        assert (await c.post("/admin/months/2025-01/close", headers=ops)).status_code == 201
        price = await c.post("/admin/prices", json=PRICE, headers=admin | key("price-1"))
        assert price.status_code == 201
        ended = await c.post(f"/admin/prices/{price.json()['id']}/end", json={"at": "2027-01-01T00:00:00Z"},
                             headers=ops)
        assert ended.status_code == 200
        # The api checks the key as the owners do, before forwarding.
        bad = await c.post("/admin/agreements", json=agreement, headers=admin | key("x" * 300))
        assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
        assert await ledger_value(database, "SELECT count(*) FROM agreements") == 1
        assert await ledger_value(database, "SELECT count(*) FROM transactions WHERE type = 'reversal'") == 1

        trail = await c.get("/admin/audit", headers=admin)
        assert trail.status_code == 200, trail.text
        entries = trail.json()["items"]
        assert trail.json()["next_cursor"] is None
        assert [(e["actor"], e["service"], e["kind"], e["status"], e["replay"]) for e in entries] == [
            ("ops-2", "pricer", "pricer.price.end", 200, False),
            ("admin-1", "pricer", "pricer.price.add", 201, False),
            ("ops-2", "ledger", "ledger.month.close", 201, False),
            ("ops-2", "ledger", "ledger.transaction.reverse", 201, False),
            ("admin-1", "ledger", "ledger.agreement.create", 201, True),
            ("admin-1", "ledger", "ledger.agreement.create", 201, False),
            ("admin-1", "ledger", "ledger.customer.create", 201, False),
            ("admin-1", "ledger", "ledger.tier.create", 201, False),
        ]
        reversal = entries[3]
        assert reversal["path"] == f"/internal/transactions/{funding}/reverse"
        assert reversal["body"] == {"reason": "wrong amount"} and reversal["idempotency_key"] == "rev-1"

        async def listed(**params: str) -> list[dict[str, Any]]:
            resp = await c.get("/admin/audit", params=params, headers=admin)
            assert resp.status_code == 200, resp.text
            items: list[dict[str, Any]] = resp.json()["items"]
            return items

        assert [e["kind"] for e in await listed(actor="ops-2")] == [
            "pricer.price.end", "ledger.month.close", "ledger.transaction.reverse"
        ]
        assert [e["actor"] for e in await listed(kind="ledger.agreement.create")] == ["admin-1", "admin-1"]
        assert [e["kind"] for e in await listed(service="pricer")] == ["pricer.price.end", "pricer.price.add"]
        newest = entries[0]["recorded_at"]
        assert [e["kind"] for e in await listed(**{"from": newest})] == ["pricer.price.end"]
        assert len(await listed(to=newest)) == len(entries) - 1

        for size in ("1", "3"):
            walked, cursor = [], None
            while True:
                params = {"limit": size} | ({"cursor": cursor} if cursor else {})
                page = (await c.get("/admin/audit", params=params, headers=admin)).json()
                walked += page["items"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert walked == entries, size
        first = (await c.get("/admin/audit", params={"limit": "2"}, headers=admin)).json()
        other_query = await c.get(
            "/admin/audit", params={"limit": "2", "actor": "ops-2", "cursor": first["next_cursor"]}, headers=admin
        )
        assert other_query.status_code == 422 and other_query.json()["type"].endswith("/invalid-cursor")
        for bad_query in ({"kind": "DROP TABLE"}, {"service": "dashboard"}, {"from": "yesterday"}, {"verbose": "1"},
                          {"from": newest, "to": newest}):
            assert (await c.get("/admin/audit", params=bad_query, headers=admin)).status_code == 422, bad_query
        assert (await c.get("/admin/audit", headers=h.headers())).status_code == 403
        assert (await c.get("/admin/audit")).status_code == 401

        # The dashboard's admin pages show the same trail.
        token = admin["authorization"].removeprefix("Bearer ")
        page = await c.get("/dashboard/admin/audit", headers={"cookie": f"billing_dashboard_token={token}"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text.count('<tr data-kind="') == len(entries)
        assert f"POST /internal/transactions/{funding}/reverse" in page.text and "ops-2" in page.text
        filtered = await c.get("/dashboard/admin/audit", params={"actor": "ops-2", "service": ""},
                               headers={"cookie": f"billing_dashboard_token={token}"})
        assert filtered.status_code == 200 and filtered.text.count('<tr data-kind="') == 3
        reader = h.headers()["authorization"].removeprefix("Bearer ")
        denied = await c.get("/dashboard/admin/audit", headers={"cookie": f"billing_dashboard_token={reader}"})
        assert denied.status_code == 403

        # The api's own commands (entitlements) are recorded in its schema and merged in the same list.
        grant = {"subject": "carol", "customer_id": customer["id"]}
        granted = await c.post("/admin/entitlements", json=grant, headers=ops | key("grant-1"))
        replayed = await c.post("/admin/entitlements", json=grant, headers=ops | key("grant-1"))
        assert granted.status_code == replayed.status_code == 201 and replayed.headers["idempotent-replayed"] == "true"
        revoked = await c.delete("/admin/entitlements", params=grant, headers=admin)
        assert revoked.status_code == 204
        api_trail = await listed(service="api")
        assert [(e["actor"], e["kind"], e["status"], e["replay"]) for e in api_trail] == [
            ("admin-1", "api.entitlement.revoke", 204, False),
            ("ops-2", "api.entitlement.grant", 201, True),
            ("ops-2", "api.entitlement.grant", 201, False),
        ]
        assert api_trail[0]["path"] == f"/admin/entitlements?subject=carol&customer_id={customer['id']}"
        assert api_trail[2]["body"] == grant
        assert len(await listed()) == len(entries) + 3

        # An entitlement only to a customer that exists: this one is new to the read model, so the ledger
        # was asked (above: 201); one the ledger does not know either is refused and stores nothing.
        nobody = {"subject": "carol", "customer_id": "0190a000-0000-7000-8000-00000000dead"}
        refused = await c.post("/admin/entitlements", json=nobody, headers=admin)
        assert refused.status_code == 404 and refused.json()["type"].endswith("/not-found"), refused.text
        assert nobody["customer_id"] in refused.json()["detail"]
        assert (await c.get("/admin/entitlements", params={"subject": "carol"}, headers=admin)).json()["items"] == []


async def test_a_command_timed_out_at_the_api_and_sent_again_with_its_key_funds_once(
    infra: Infra, database: Database, topic_prefix: str, issuer: LocalIssuer
) -> None:
    async with stack(database, infra, topic_prefix, issuer, upstream_timeout_seconds=1) as h:
        c, admin = h.client, h.admin
        assert (await c.post("/admin/tiers", json={"name": "gold", "credits_per_period": CREDITS},
                             headers=admin)).status_code == 201
        customer = (await c.post("/admin/customers", json={"name": "Agency", "tier": "gold"}, headers=admin)).json()
        agreement = {"customer_id": customer["id"], "starts_at": "2026-01-01T05:00:00Z",
                     "ends_at": "2027-01-01T05:00:00Z"}
        # The ledger is slow: its agreements table is locked until this connection lets go.
        blocker = await asyncpg.connect(database.admin_dsn)
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE ledger.agreements IN ACCESS EXCLUSIVE MODE")
            timed_out = await c.post("/admin/agreements", json=agreement, headers=admin | key("slow-1"))
            assert timed_out.status_code == 504, timed_out.text
            assert "Idempotency-Key" in timed_out.json()["detail"]
            running = await c.post("/admin/agreements", json=agreement, headers=admin | key("slow-1"))
            assert running.status_code == 409 and running.json()["title"] == "Request in progress"
            await tx.rollback()
        finally:
            await blocker.close()
        for _ in range(100):
            retry = await c.post("/admin/agreements", json=agreement, headers=admin | key("slow-1"))
            if retry.status_code != 409:
                break
            await asyncio.sleep(0.1)
        assert retry.status_code == 201 and retry.headers["idempotent-replayed"] == "true", retry.text
        assert await ledger_value(database, "SELECT count(*) FROM agreements") == 1
        balance = await ledger_value(
            database, "SELECT sum(credits) FROM agreements WHERE customer_id = $1", retry.json()["customer_id"]
        )
        assert balance == CREDITS
        funding = await ledger_value(database, "SELECT count(*) FROM transactions WHERE type = 'funding'")
        assert funding == 1
        statuses = [(e["status"], e["replay"]) for e in (await c.get(
            "/admin/audit", params={"kind": "ledger.agreement.create"}, headers=admin)).json()["items"]]
        assert statuses[-1] == (201, False) and (409, False) in statuses and statuses[0] == (201, True)
