"""The parts of the command journal that need no database: the Idempotency-Key's format, the request
digest (the same request in another JSON layout is the same request), the actor (only ever the verified
token's subject), the api forwarding a command's key (checked first) and bringing back whether the answer
was a replay, and the merge of the services' audit trails into pages that walk every entry once, newest
first, whatever the page size."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.api.audit import SERVICES, merge
from services.api.forward import Forwarder, admin_operations
from shared.audit import AuditEntry, Service, audit_cursor
from shared.auth import Principal
from shared.commands import actor_of, request_digest
from shared.edge import ProblemError, idempotency_key, starlette_routes
from shared.http import exception_handlers


@pytest.mark.parametrize("key", ["a", "k" * 255, "0190b000-0000-7000-8000-000000000001", "with space ~!{}"])
def test_printable_ascii_keys_of_1_to_255_characters_are_accepted(key: str) -> None:
    assert idempotency_key(Headers({"idempotency-key": key})) == key


@pytest.mark.parametrize(
    "key", ["", "k" * 256, "caf\u00e9", "tab\there", "nul\x00", "ZV> ", " lead", " "]  # "ZV> ": found by the fuzz
)
def test_other_keys_are_refused_with_400(key: str) -> None:
    with pytest.raises(ProblemError) as refused:
        idempotency_key(Headers(raw=[(b"idempotency-key", key.encode("latin-1"))]))
    assert refused.value.status == 400 and refused.value.kind.slug == "invalid-idempotency-key"


def test_no_key_is_none_and_two_keys_are_refused() -> None:
    assert idempotency_key(Headers({})) is None
    with pytest.raises(ProblemError):
        idempotency_key(Headers(raw=[(b"idempotency-key", b"a"), (b"idempotency-key", b"b")]))


def test_the_digest_covers_method_path_and_the_canonical_body() -> None:
    digest, stored = request_digest("POST", "/internal/tiers", b'{"name": "gold", "credits_per_period": 5}')
    same, _ = request_digest("POST", "/internal/tiers", b'{"credits_per_period":5,\n "name":"gold"}')
    assert digest == same
    assert stored == '{"credits_per_period":5,"name":"gold"}'
    expected = hashlib.sha256(b'POST /internal/tiers\n{"credits_per_period":5,"name":"gold"}').hexdigest()
    assert digest == expected
    assert request_digest("POST", "/internal/customers", b'{"name":"gold","credits_per_period":5}')[0] != digest
    assert request_digest("PUT", "/internal/tiers", b'{"name":"gold","credits_per_period":5}')[0] != digest
    assert request_digest("POST", "/internal/tiers", b'{"name":"gold","credits_per_period":6}')[0] != digest
    empty = request_digest("POST", "/internal/months/2026-01/close", b"")
    assert empty == (hashlib.sha256(b"POST /internal/months/2026-01/close\n").hexdigest(), None)
    not_json = request_digest("POST", "/internal/tiers", b"name=gold")
    assert not_json == (hashlib.sha256(b"POST /internal/tiers\nname=gold").hexdigest(), None)
    # jsonb cannot hold NUL: such a body is digested, not stored.
    assert request_digest("POST", "/internal/tiers", b'{"name":"a\\u0000b"}')[1] is None


def request_of(principal: Principal | None) -> Request:
    request = Request({"type": "http", "method": "POST", "path": "/internal/tiers", "headers": [
        (b"x-billing-actor", b"mallory")], "query_string": b"", "state": {}})
    if principal is not None:
        request.state.principal = principal
    return request


def test_the_actor_is_the_token_subject_and_never_a_header() -> None:
    alice = Principal("alice", frozenset({"usage.admin"}), frozenset(), 2**40, token="t")
    assert actor_of(request_of(alice)) == "alice"
    with pytest.raises(RuntimeError, match="without an authenticated caller"):
        actor_of(request_of(None))


# ------------------------------------------------------------------------------------- forwarding


class Admin:
    realm = "test"

    async def principal(self, request: Request, scope: str) -> Principal:
        return Principal("admin-1", frozenset({"usage.admin"}), frozenset(), 2**40, token="t-admin")


@pytest.fixture
async def forwarded() -> AsyncIterator[tuple[httpx.AsyncClient, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def owner(request: Request) -> Response:
        seen.append({"path": request.url.path, "key": request.headers.get("idempotency-key"),
                     "authorization": request.headers.get("authorization")})
        return JSONResponse({"ok": True}, status_code=201, headers={"idempotent-replayed": "true", "location": "/x"})

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=Starlette(routes=[
        Route("/{rest:path}", owner, methods=["GET", "POST"])
    ]))) as upstream:
        forwarder = Forwarder(upstream, {s: f"http://{s}.test" for s in SERVICES})
        app = Starlette(routes=starlette_routes(admin_operations(lambda call: forwarder)),
                        exception_handlers=dict(exception_handlers))
        app.state.authenticator = Admin()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            yield client, seen


async def test_the_api_forwards_a_commands_key_and_refuses_a_malformed_one(
    forwarded: tuple[httpx.AsyncClient, list[dict[str, Any]]],
) -> None:
    client, seen = forwarded
    resp = await client.post("/admin/agreements", json={}, headers={"Idempotency-Key": "k-1"})
    assert resp.status_code == 201 and resp.headers["idempotent-replayed"] == "true"
    assert "location" not in resp.headers
    assert seen == [{"path": "/internal/agreements", "key": "k-1", "authorization": "Bearer t-admin"}]
    bad = await client.post("/admin/agreements", json={}, headers={"Idempotency-Key": "x" * 256})
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["type"].endswith("/invalid-idempotency-key")
    assert len(seen) == 1  # the owner never saw it
    await client.post("/admin/agreements", json={})
    assert seen[-1]["key"] is None


# ------------------------------------------------------------------------------------- merging


SCOPE = "0123456789abcdef"  # what the services' cursors are bound to (their filters)


def trail(rng: random.Random, service: Service, n: int, start: datetime) -> list[AuditEntry]:
    """A service's entries newest first; times often equal across services, never out of id order."""
    out, moment = [], start
    for i in range(1, n + 1):
        moment += timedelta(seconds=rng.choice([0, 0, 1, 2]))
        out.append(AuditEntry(
            id=i, service=service, recorded_at=moment, actor="a", kind=f"{service}.x", method="POST", path="/x",
            body_digest=None, body=None, status=201, problem_type=None, problem_title=None, idempotency_key=None,
            replay=False,
        ))
    return out[::-1]


def answer(entries: list[AuditEntry], position: str, limit: int) -> list[AuditEntry]:
    """What ``GET /internal/audit?cursor=position&limit=limit`` answers: entries after the position."""
    start = 0
    if position:
        cursors = [audit_cursor(SCOPE, e) for e in entries]
        start = cursors.index(position) + 1
    return entries[start:start + limit]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 50])
def test_merged_pages_walk_every_entry_once_newest_first(seed: int, limit: int) -> None:
    rng = random.Random(seed)
    start = datetime(2026, 10, 1, tzinfo=UTC)
    trails: dict[str, list[AuditEntry]] = {s: trail(rng, s, rng.randint(0, 12), start) for s in SERVICES}
    everything = sorted(
        (e for t in trails.values() for e in t), key=lambda e: (e.recorded_at, e.service, e.id), reverse=True
    )
    positions: dict[str, str] = {s: "" for s in SERVICES}
    walked: list[AuditEntry] = []
    for _ in range(100):
        fetched = {s: answer(trails[s], p, limit + 1) for s, p in positions.items()}
        page, positions = merge(fetched, positions, limit, SCOPE)
        assert len(page) <= limit
        walked += page
        if not positions:
            break
        assert page, "a page with nothing on it before the end"
    assert walked == everything
