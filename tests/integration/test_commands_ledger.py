"""The ledger's commands (shared/commands.py) on the real database and broker: each one sent again with its
Idempotency-Key (its first answer lost, as after a timeout), and sent twice at once, changes the books
once; the same key with another request is refused with 422, a malformed key with 400; two actors' equal
keys are two keys; keys are forgotten after 24 hours; and every request, refused or not, is in the audit
trail (``GET /internal/audit``) with who (the subject of the token that sent it), what, when and the
outcome."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from services.ledger.app import create_app
from services.ledger.settings import LedgerSettings
from shared.commands import CommandJournal, request_digest
from shared.db import create_pool, migrate
from tests.conftest import ROOT, Database, Infra
from tests.support.ledger import assert_books_hold
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
CREDITS = 5_000_000


@asynccontextmanager
async def running(
    database: Database, infra: Infra, prefix: str, issuer: LocalIssuer
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = LedgerSettings(
        database_url=SecretStr(database.dsn("ledger")), kafka_bootstrap_servers=infra.kafka, topic_prefix=prefix,
        port=8083, periodic_interval_seconds=0, batch_timeout_ms=100, oidc_issuer=issuer.url,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        # Requests without their own token are an admin's, subject admin-1.
        async with httpx.AsyncClient(
            transport=transport, base_url="http://ledger", timeout=60, headers=issuer.bearer()
        ) as client:
            yield client, app
        await assert_books_hold(app.state.runtime.pool)


@pytest.fixture
async def ledger(
    database: Database, infra: Infra, topic_prefix: str, issuer: LocalIssuer
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    async with running(database, infra, topic_prefix, issuer) as pair:
        yield pair


async def count(app: Any, sql: str, *args: Any) -> int:
    async with app.state.runtime.pool.acquire() as conn:
        return int(await conn.fetchval(sql, *args))


@dataclass(frozen=True)
class Tokens:
    """Headers of admins of the test issuer, by token subject."""

    issuer: LocalIssuer

    def as_(self, actor: str) -> dict[str, str]:
        """The Authorization header of an admin whose token's subject is ``actor``."""
        return self.issuer.bearer(sub=actor)

    def keyed(self, key: str, actor: str = "alice") -> dict[str, str]:
        return {"Idempotency-Key": key, **self.as_(actor)}


@pytest.fixture
def who(issuer: LocalIssuer) -> Tokens:
    return Tokens(issuer)


async def customer_of(client: httpx.AsyncClient) -> str:
    tier = f"tier-{uuid.uuid4().hex[:6]}"
    assert (await client.post("/internal/tiers", json={"name": tier, "credits_per_period": CREDITS})).status_code == 201
    created = await client.post("/internal/customers", json={"name": "Agency", "tier": tier})
    assert created.status_code == 201
    return str(created.json()["id"])


async def funded(client: httpx.AsyncClient, customer: str) -> dict[str, Any]:
    resp = await client.get(f"/internal/customers/{customer}/balance")
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    return body


async def twice(
    client: httpx.AsyncClient, who: Tokens, path: str, body: Any, key: str
) -> tuple[httpx.Response, httpx.Response]:
    """Send a command, then send it again with the same key as a client whose first answer was lost."""
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    first = await client.post(path, headers=who.keyed(key), **kw)
    again = await client.post(path, headers=who.keyed(key), **kw)
    assert again.status_code == first.status_code, (first.text, again.text)
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in first.headers
    return first, again


async def test_each_command_sent_again_with_its_key_changes_the_books_once(
    ledger: tuple[httpx.AsyncClient, Any], who: Tokens
) -> None:
    client, app = ledger
    tier, _ = await twice(client, who, "/internal/tiers", {"name": "gold", "credits_per_period": CREDITS}, "k-tier")
    assert tier.status_code == 201
    assert await count(app, "SELECT count(*) FROM tiers WHERE name = 'gold'") == 1

    customer, _ = await twice(client, who, "/internal/customers", {"name": "Agency", "tier": "gold"}, "k-customer")
    assert customer.status_code == 201
    assert await count(app, "SELECT count(*) FROM customers") == 1
    cid = customer.json()["id"]

    agreement_body = {"customer_id": cid, "starts_at": "2025-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"}
    agreement, _ = await twice(client, who, "/internal/agreements", agreement_body, "k-agreement")
    assert agreement.status_code == 201
    assert await count(app, "SELECT count(*) FROM agreements") == 1
    balance = await funded(client, cid)
    assert (balance["funded"], balance["remaining"]) == (CREDITS, CREDITS)

    assignment_body = {"org_id": "org-1", "customer_id": cid, "starts_at": "2025-01-01T05:00:00Z"}
    assignment, _ = await twice(client, who, "/internal/org-assignments", assignment_body, "k-assign")
    assert assignment.status_code == 201
    assert await count(app, "SELECT count(*) FROM org_assignments") == 1

    funding = agreement.json()["funding_transaction_id"]
    reversal, _ = await twice(client, who, f"/internal/transactions/{funding}/reverse", {"reason": "typo"}, "k-reverse")
    assert reversal.status_code == 201  # the first answer, replayed: not the 200 of "reversed already"
    assert await count(app, "SELECT count(*) FROM transactions WHERE type = 'reversal'") == 1
    assert (await funded(client, cid))["remaining"] == 0

    closed, _ = await twice(client, who, "/internal/months/2025-01/close", None, "k-close")
    assert closed.status_code == 201 and closed.json()["already_closed"] is False
    assert await count(app, "SELECT count(*) FROM month_closes") == 1
    assert await count(app, "SELECT count(*) FROM statements") == 1

    # Without the key, the same requests are new commands: the ledger's own rules answer them.
    again = await client.post("/internal/tiers", json={"name": "gold", "credits_per_period": CREDITS})
    assert again.status_code == 409


async def test_the_same_key_sent_concurrently_runs_the_command_once(
    ledger: tuple[httpx.AsyncClient, Any], who: Tokens
) -> None:
    client, app = ledger
    cid = await customer_of(client)
    body = {"customer_id": cid, "starts_at": "2026-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"}
    answers = await asyncio.gather(*(client.post("/internal/agreements", json=body, headers=who.keyed("k-race"))
                                     for _ in range(6)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(201) >= 1 and set(statuses) <= {201, 409}, [a.text for a in answers]
    for a in answers:
        if a.status_code == 409:
            assert a.headers["content-type"] == PROBLEM and a.json()["title"] == "Request in progress"
    assert len({a.json()["id"] for a in answers if a.status_code == 201}) == 1
    assert await count(app, "SELECT count(*) FROM agreements") == 1
    assert (await funded(client, cid))["funded"] == CREDITS
    # Once the first has answered, a retry gets its answer.
    retry = await client.post("/internal/agreements", json=body, headers=who.keyed("k-race"))
    assert retry.status_code == 201 and retry.headers["idempotent-replayed"] == "true"

    # A reversal raced the same way is posted once.
    funding = retry.json()["funding_transaction_id"]
    answers = await asyncio.gather(*(client.post(f"/internal/transactions/{funding}/reverse",
                                                 headers=who.keyed("k-race-reverse")) for _ in range(4)))
    assert {a.status_code for a in answers} <= {201, 409} and 201 in {a.status_code for a in answers}
    assert await count(app, "SELECT count(*) FROM transactions WHERE type = 'reversal'") == 1


async def test_a_key_sent_with_another_request_is_refused_and_changes_nothing(
    ledger: tuple[httpx.AsyncClient, Any], who: Tokens
) -> None:
    client, app = ledger
    cid = await customer_of(client)
    body = {"customer_id": cid, "starts_at": "2026-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"}
    first = await client.post("/internal/agreements", json=body, headers=who.keyed("k-1"))
    assert first.status_code == 201
    other = await client.post("/internal/agreements", json=body | {"credits": 7}, headers=who.keyed("k-1"))
    assert other.status_code == 422 and other.headers["content-type"] == PROBLEM
    assert other.json()["title"] == "Idempotency-Key reused"
    elsewhere = await client.post("/internal/expire-agreements", headers=who.keyed("k-1"))
    assert elsewhere.status_code == 422
    # The same object written with another layout is the same request.
    layout = json.dumps({"ends_at": body["ends_at"], "starts_at": body["starts_at"], "customer_id": cid}, indent=2)
    same = await client.post("/internal/agreements", content=layout,
                             headers=who.keyed("k-1") | {"content-type": "application/json"})
    assert same.status_code == 201 and same.json() == first.json()
    assert await count(app, "SELECT count(*) FROM agreements") == 1
    assert (await funded(client, cid))["funded"] == CREDITS


async def test_two_actors_sending_the_same_key_are_two_commands(
    ledger: tuple[httpx.AsyncClient, Any], who: Tokens
) -> None:
    client, app = ledger
    cid = await customer_of(client)
    body = {"customer_id": cid, "starts_at": "2026-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"}
    alice = await client.post("/internal/agreements", json=body, headers=who.keyed("shared-key", "alice"))
    bob = await client.post("/internal/agreements", json=body, headers=who.keyed("shared-key", "bob"))
    assert alice.status_code == bob.status_code == 201
    assert alice.json()["id"] != bob.json()["id"] and "idempotent-replayed" not in bob.headers
    assert await count(app, "SELECT count(*) FROM agreements") == 2
    assert (await funded(client, cid))["funded"] == 2 * CREDITS


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "")],
        [("Idempotency-Key", "k" * 256)],
        [("Idempotency-Key", b"caf\xc3\xa9")],
        [("Idempotency-Key", "tab\tinside")],
        [("Idempotency-Key", "one"), ("Idempotency-Key", "two")],
    ],
    ids=["empty", "too-long", "not-ascii", "control-character", "twice"],
)
async def test_a_malformed_key_is_refused_with_400_and_nothing_is_done(
    ledger: tuple[httpx.AsyncClient, Any], headers: list[tuple[str, Any]]
) -> None:
    client, app = ledger
    resp = await client.post("/internal/tiers", json={"name": "silver", "credits_per_period": 5}, headers=headers)
    assert resp.status_code == 400 and resp.headers["content-type"] == PROBLEM, resp.text
    assert resp.json()["title"] == "Invalid Idempotency-Key"
    assert await count(app, "SELECT count(*) FROM tiers") == 0
    trail = (await client.get("/internal/audit")).json()["items"]
    assert [(e["kind"], e["status"], e["problem_title"]) for e in trail] == [
        ("ledger.tier.create", 400, "Invalid Idempotency-Key")
    ]
    key_255 = "k" * 254 + "~"
    ok = await client.post("/internal/tiers", json={"name": "silver", "credits_per_period": 5},
                           headers={"Idempotency-Key": key_255})
    assert ok.status_code == 201


def digest(method: str, path: str, body: dict[str, Any] | None) -> str:
    """The request digest as documented: SHA-256 of method, path and the body with sorted keys, no spaces."""
    text = b"" if body is None else json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(f"{method} {path}\n".encode() + text).hexdigest()


async def test_every_command_request_is_audited_with_who_what_when_and_the_outcome(
    ledger: tuple[httpx.AsyncClient, Any], who: Tokens
) -> None:
    client, app = ledger
    before = datetime.now(UTC)
    tier_body = {"name": "gold", "credits_per_period": CREDITS}
    await client.post("/internal/tiers", json=tier_body, headers=who.as_("alice"))
    customer_body = {"tier": "gold", "name": "Agency"}
    await client.post("/internal/customers", json=customer_body, headers=who.keyed("c-1", "bob"))
    await client.post("/internal/customers", json=customer_body, headers=who.keyed("c-1", "bob"))  # a replay
    missing = str(uuid.uuid4())
    refused = {"customer_id": missing, "starts_at": "2026-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"}
    assert (
        await client.post("/internal/agreements", json=refused, headers=who.keyed("a-1", "alice"))
    ).status_code == 404
    assert (await client.post("/internal/agreements", content=b"{not json",
                              headers={"content-type": "application/json"})).status_code == 422
    not_ended = f"/internal/months/{datetime.now(UTC).year + 1}-01/close"
    assert (await client.post(not_ended, headers=who.as_("carol"))).status_code == 409
    after = datetime.now(UTC)

    trail = (await client.get("/internal/audit")).json()
    entries = trail["items"]
    assert trail["next_cursor"] is None
    assert [(e["actor"], e["kind"], e["status"], e["replay"]) for e in entries] == [
        ("carol", "ledger.month.close", 409, False),
        ("admin-1", "ledger.agreement.create", 422, False),
        ("alice", "ledger.agreement.create", 404, False),
        ("bob", "ledger.customer.create", 201, True),
        ("bob", "ledger.customer.create", 201, False),
        ("alice", "ledger.tier.create", 201, False),
    ]
    by_kind = {(e["kind"], e["replay"], e["status"]): e for e in entries}
    tier = by_kind[("ledger.tier.create", False, 201)]
    assert (tier["method"], tier["path"], tier["body"], tier["idempotency_key"]) == (
        "POST", "/internal/tiers", tier_body, None
    )
    assert tier["body_digest"] == digest("POST", "/internal/tiers", tier_body)
    assert tier["problem_type"] is None and tier["problem_title"] is None and tier["service"] == "ledger"
    replay = by_kind[("ledger.customer.create", True, 201)]
    assert replay["idempotency_key"] == "c-1" and replay["body"] == customer_body
    assert replay["body_digest"] == by_kind[("ledger.customer.create", False, 201)]["body_digest"]
    failed = by_kind[("ledger.agreement.create", False, 404)]
    assert (failed["problem_type"], failed["problem_title"], failed["body"]) == (
        "https://billing.example/problems/not-found", "Customer not found", refused
    )
    not_json = by_kind[("ledger.agreement.create", False, 422)]
    assert not_json["body"] is None and not_json["body_digest"] is not None
    close = by_kind[("ledger.month.close", False, 409)]
    assert close["path"] == not_ended and close["body"] is None
    for e in entries:
        assert before <= datetime.fromisoformat(e["recorded_at"]) <= after

    # Filters, and pages that walk the same entries in the same order.
    only_alice = (await client.get("/internal/audit", params={"actor": "alice"})).json()["items"]
    assert [e["id"] for e in only_alice] == [e["id"] for e in entries if e["actor"] == "alice"]
    agreements = (await client.get("/internal/audit", params={"kind": "ledger.agreement.create"})).json()["items"]
    assert len(agreements) == 2
    assert (await client.get("/internal/audit", params={"from": after.isoformat()})).json()["items"] == []
    assert len((await client.get("/internal/audit", params={"to": after.isoformat()})).json()["items"]) == 6
    walked, cursor = [], None
    while True:
        page = (
            await client.get("/internal/audit", params={"limit": 4} | ({"cursor": cursor} if cursor else {}))
        ).json()
        walked += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert walked == entries
    for bad in ({"cursor": "nope"}, {"from": "yesterday"}, {"to": "2026-01-01T00:00:00"}, {"limit": "0"}):
        resp = await client.get("/internal/audit", params=bad)
        assert resp.status_code == 422 and resp.headers["content-type"] == PROBLEM, bad
    assert await count(app, "SELECT count(*) FROM audit_log") == 6


async def test_keys_are_kept_24_hours_and_then_forgotten(
    ledger: tuple[httpx.AsyncClient, Any], who: Tokens
) -> None:
    client, app = ledger
    now = [datetime(2026, 3, 1, 12, tzinfo=UTC)]
    app.state.runtime.state["commands"] = CommandJournal(clock=lambda: now[0])
    await client.post("/internal/tiers", json={"name": "gold", "credits_per_period": CREDITS})
    body = {"name": "Agency", "tier": "gold"}
    first = await client.post("/internal/customers", json=body, headers=who.keyed("day-key"))
    assert first.status_code == 201

    now[0] += timedelta(hours=23, minutes=59)
    kept = await client.post("/internal/customers", json=body, headers=who.keyed("day-key"))
    assert kept.headers.get("idempotent-replayed") == "true" and kept.json()["id"] == first.json()["id"]
    assert await count(app, "SELECT count(*) FROM idempotency_keys WHERE key = 'day-key'") == 1

    now[0] += timedelta(minutes=2)  # 24 h 1 min after the key's first request
    assert (await client.post("/internal/tiers", json={"name": "silver", "credits_per_period": 1})).status_code == 201
    assert await count(app, "SELECT count(*) FROM idempotency_keys WHERE key = 'day-key'") == 0
    fresh = await client.post("/internal/customers", json=body, headers=who.keyed("day-key"))
    assert fresh.status_code == 201 and "idempotent-replayed" not in fresh.headers
    assert fresh.json()["id"] != first.json()["id"]
    assert await count(app, "SELECT count(*) FROM customers") == 2
    times = [e["recorded_at"] for e in (await client.get("/internal/audit")).json()["items"]]
    assert datetime.fromisoformat(times[0]) == now[0]
    assert datetime.fromisoformat(times[-1]) == datetime(2026, 3, 1, 12, tzinfo=UTC)


async def test_a_key_left_running_by_a_crash_answers_409_not_a_second_run(
    ledger: tuple[httpx.AsyncClient, Any], who: Tokens
) -> None:
    client, app = ledger
    cid = await customer_of(client)
    body = {"customer_id": cid, "starts_at": "2026-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"}
    # What a crash between the reservation and the answer leaves: the key reserved, no answer stored.
    raw = json.dumps(body).encode()
    async with app.state.runtime.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO idempotency_keys (actor, key, request_digest, kind, created_at)"
            " VALUES ($1, $2, $3, $4, now())",
            "alice",
            "crashed",
            request_digest("POST", "/internal/agreements", raw)[0],
            "ledger.agreement.create",
        )
    resp = await client.post("/internal/agreements", content=raw,
                             headers=who.keyed("crashed") | {"content-type": "application/json"})
    assert resp.status_code == 409 and resp.headers["retry-after"] == "1"
    assert await count(app, "SELECT count(*) FROM agreements") == 0


@pytest.mark.parametrize("service", ["collector", "pricer", "ledger"])
async def test_the_audit_log_is_append_only_for_the_services_role(database: Database, service: str) -> None:
    pool = await create_pool(database.dsn(service), service, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, service, ROOT / "services" / service / "migrations")
            await conn.execute(
                """INSERT INTO audit_log (recorded_at, actor, kind, method, path, status, replay)
                   VALUES (now(), 'alice', 'x.y', 'POST', '/internal/x', 201, false)"""
            )
            for sql in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
            assert await conn.fetchval("SELECT actor FROM audit_log") == "alice"
    finally:
        await pool.close()
    # Not even a superuser changes it without first dropping the trigger.
    admin = await asyncpg.connect(database.admin_dsn)
    try:
        for sql in (
            "UPDATE {s}.audit_log SET actor = 'mallory'",
            "DELETE FROM {s}.audit_log",
            "TRUNCATE {s}.audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await admin.execute(sql.format(s=service))
        assert await admin.fetchval(f"SELECT count(*) FROM {service}.audit_log") == 1
    finally:
        await admin.close()
