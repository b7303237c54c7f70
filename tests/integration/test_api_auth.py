"""The token attack matrix against the running api (real issuer on a random port, real database): every
forged, expired, misdirected or malformed token is answered 401 with a problem document and a Bearer
challenge, a valid token without the scope 403, and a reader asking for a customer it may not see gets
exactly the answer a non-existent customer gets — never data."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from tests.support.api_factories import txn
from tests.support.api_harness import ApiHarness, harness  # noqa: F401  (fixture)
from tests.support.tokens import attacks

pytestmark = pytest.mark.integration

A, B = uuid.uuid4(), uuid.uuid4()


def routes(customer: uuid.UUID) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/customers/{customer}/balance"),
        ("GET", f"/v1/customers/{customer}/usage?from=2026-10-01T04:00:00Z&to=2026-11-01T04:00:00Z&granularity=month"),
        ("GET", f"/v1/customers/{customer}/transactions"),
        ("GET", f"/v1/customers/{customer}/statements/2026-10"),
        ("GET", "/v1/customers"),
        ("GET", "/admin/entitlements"),
        ("POST", "/admin/customers"),
        ("POST", "/admin/months/2026-10/close"),
    ]


async def seed(h: ApiHarness) -> None:
    await h.publish_ledger(
        [
            txn(A, "funding", 5_000_000, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC)),
            txn(B, "funding", 7_000_000, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC)),
        ]
    )
    await h.until_count("customer", 2)


async def test_no_token_and_every_attack_token_are_401_on_every_route(harness: ApiHarness) -> None:
    h = harness
    await seed(h)
    tokens = attacks(h.issuer, str(A))
    await asyncio.sleep(0.6)  # past the minimum refetch interval, so the unknown kid may refetch once
    for method, path in routes(A):
        r = await h.client.request(method, path)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["content-type"] == "application/problem+json"
        for bad_header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "bearer  "):
            r = await h.client.request(method, path, headers={"authorization": bad_header})
            assert r.status_code == 401, (path, bad_header)
        for name, token in tokens.items():
            r = await h.client.request(method, path, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 401, (name, path, r.status_code, r.text)
            assert 'error="invalid_token"' in r.headers["www-authenticate"], name
            body = r.json()
            assert body["status"] == 401 and "funded" not in r.text, name


async def test_an_unknown_kid_refetches_the_keys_once_then_is_refused(harness: ApiHarness) -> None:
    h = harness
    await seed(h)
    ok = await h.client.get(f"/v1/customers/{A}/balance", headers=h.headers(customers=[str(A)]))
    assert ok.status_code == 200
    fetched = h.issuer.jwks_fetches
    await asyncio.sleep(0.6)
    ghost = h.issuer.mint(kid="ghost", customers=[str(A)])
    r = await h.client.get(f"/v1/customers/{A}/balance", headers={"authorization": f"Bearer {ghost}"})
    assert r.status_code == 401
    assert h.issuer.jwks_fetches == fetched + 1
    ghost = h.issuer.mint(kid="ghost-2", customers=[str(A)])
    r = await h.client.get(f"/v1/customers/{A}/balance", headers={"authorization": f"Bearer {ghost}"})
    assert r.status_code == 401
    assert h.issuer.jwks_fetches == fetched + 1  # rate-limited: no second refetch right away
    # a key the issuer starts publishing is accepted once the interval has passed
    new = h.issuer.rotate()
    await asyncio.sleep(0.6)
    rotated = h.issuer.mint(key=new, customers=[str(A)])
    r = await h.client.get(f"/v1/customers/{A}/balance", headers={"authorization": f"Bearer {rotated}"})
    assert r.status_code == 200


async def test_a_valid_token_without_the_scope_is_403(harness: ApiHarness) -> None:
    h = harness
    await seed(h)
    no_scope = h.headers(scopes=[], customers=[str(A)])
    other_scope = h.headers(scopes=["openid", "usage.write"], customers=[str(A)])
    reader = h.headers(scopes=["usage.read"], customers=[str(A)])
    for method, path in routes(A):
        for headers in (no_scope, other_scope):
            r = await h.client.request(method, path, headers=headers)
            assert r.status_code == 403, (path, r.text)
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        if path.startswith("/admin/"):
            r = await h.client.request(method, path, headers=reader)
            assert r.status_code == 403, path
            assert 'scope="usage.admin"' in r.headers["www-authenticate"]


async def test_a_reader_never_learns_about_a_customer_it_may_not_see(harness: ApiHarness) -> None:
    h = harness
    await seed(h)
    reader_b = h.headers(customers=[str(B)], sub="reader-b")
    nobody = uuid.uuid4()
    for (_, path_a), (_, path_none) in zip(routes(A)[:4], routes(nobody)[:4], strict=True):
        other = await h.client.get(path_a, headers=reader_b)
        missing = await h.client.get(path_none, headers=reader_b)
        assert other.status_code == missing.status_code == 404, (path_a, other.text)
        assert other.content == missing.content  # byte for byte the same answer
        assert other.headers["content-type"] == "application/problem+json"
        assert str(A) not in other.text and "5000000" not in other.text
    # while its own customer answers
    own = await h.client.get(f"/v1/customers/{B}/balance", headers=reader_b)
    assert own.status_code == 200 and own.json()["funded"] == 7_000_000
    listed = await h.client.get("/v1/customers", headers=reader_b)
    assert [c["customer_id"] for c in listed.json()["items"]] == [str(B)]
    # and an admin sees both
    admin = await h.client.get(f"/v1/customers/{A}/balance", headers=h.admin)
    assert admin.status_code == 200 and admin.json()["funded"] == 5_000_000
