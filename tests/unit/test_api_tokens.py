"""The api's token verification, against a local OIDC issuer (an in-process Starlette app reached through
httpx's ASGI transport: no network). The issuer, ``LocalIssuer``, is in tests/support/tokens.py, with
which the api's integration tests also run a real issuer on a random port."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from shared.auth import AuthError, IssuerUnavailableError, JwksCache, TokenVerifier
from tests.support.tokens import AUDIENCE, LocalIssuer, attacks


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


Setup = tuple[LocalIssuer, TokenVerifier, Clock]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    issuer = LocalIssuer()
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app())) as client:
        jwks = JwksCache(issuer.url, client, ttl_seconds=600, refetch_min_interval_seconds=10, monotonic=clock)
        verifier = TokenVerifier(jwks, issuer=issuer.url, audience=AUDIENCE, leeway_seconds=30)
        yield issuer, verifier, clock


async def test_valid_rs256_and_es256_tokens_give_subject_scopes_and_customers(setup: Setup) -> None:
    issuer, verifier, _ = setup
    customer = str(uuid.uuid4())
    for key in (issuer.rsa, issuer.ec):
        token = issuer.mint(key=key, sub="alice", scopes=["usage.read"], customers=[customer, "not-a-uuid"])
        p = await verifier.verify(token)
        assert p.subject == "alice"
        assert p.can_read and not p.is_admin
        assert {str(c) for c in p.customers} == {customer}
    admin = await verifier.verify(issuer.token(scopes=["usage.admin"]))
    assert admin.is_admin and admin.can_read


@pytest.mark.parametrize(
    "name",
    [
        "malformed",
        "malformed_segments",
        "garbage_base64",
        "alg_none",
        "alg_none_with_signature",
        "hs256_with_rsa_public_key",
        "hs256_no_kid",
        "rs384",
        "es256_signed_claims_rs256_kid",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "unknown_kid",
        "no_kid",
        "tampered_payload",
        "signed_by_stranger",
        "no_exp",
    ],
)
async def test_every_attack_token_is_refused(setup: Setup, name: str) -> None:
    issuer, verifier, _ = setup
    token = attacks(issuer, str(uuid.uuid4()))[name]
    with pytest.raises(AuthError):
        await verifier.verify(token)


async def test_clock_skew_is_tolerated_within_the_leeway_only(setup: Setup) -> None:
    issuer, verifier, _ = setup
    await verifier.verify(issuer.token(exp_in=-10))  # expired 10 s ago: within 30 s of skew
    await verifier.verify(issuer.token(nbf_in=10))  # valid in 10 s: within the skew
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify(issuer.token(exp_in=-45))
    with pytest.raises(AuthError):
        await verifier.verify(issuer.token(nbf_in=45))


async def test_keys_are_fetched_once_and_cached(setup: Setup) -> None:
    issuer, verifier, _ = setup
    for _ in range(5):
        await verifier.verify(issuer.token(sub=f"u{_}"))
    assert issuer.jwks_fetches == 1


class Slow(httpx.AsyncBaseTransport):
    """The issuer at some distance: every answer takes a moment, as over a network."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.02)
        return await self.inner.handle_async_request(request)


async def test_concurrent_first_requests_share_one_fetch_and_are_all_verified() -> None:
    issuer, clock = LocalIssuer(), Clock()
    transport = Slow(httpx.ASGITransport(app=issuer.app()))
    async with httpx.AsyncClient(transport=transport) as client:
        jwks = JwksCache(issuer.url, client, ttl_seconds=600, refetch_min_interval_seconds=10, monotonic=clock)
        verifier = TokenVerifier(jwks, issuer=issuer.url, audience=AUDIENCE, leeway_seconds=30)
        await _verify_at_once(issuer, verifier, clock)


async def _verify_at_once(issuer: LocalIssuer, verifier: TokenVerifier, clock: Clock) -> None:
    subjects = [f"u{i}" for i in range(6)]
    principals = await asyncio.gather(*(verifier.verify(issuer.token(sub=s)) for s in subjects))
    assert [p.subject for p in principals] == subjects
    assert issuer.jwks_fetches == 1
    # a rotated key seen by several requests at once: one refetch, every one of them verified
    new = issuer.rotate()
    clock.t += 11
    rotated = await asyncio.gather(*(verifier.verify(issuer.mint(key=new, sub=s)) for s in subjects))
    assert [p.subject for p in rotated] == subjects
    assert issuer.jwks_fetches == 2


async def test_unknown_kid_refetches_once_then_refuses_and_is_rate_limited(setup: Setup) -> None:
    issuer, verifier, clock = setup
    await verifier.verify(issuer.token())
    assert issuer.jwks_fetches == 1
    clock.t += 11  # past the minimum refetch interval
    with pytest.raises(AuthError, match="unknown key"):
        await verifier.verify(issuer.mint(kid="ghost-1"))
    assert issuer.jwks_fetches == 2  # exactly one refetch
    with pytest.raises(AuthError, match="unknown key"):
        await verifier.verify(issuer.mint(kid="ghost-2"))
    assert issuer.jwks_fetches == 2  # a second unknown kid right after does not refetch


async def test_a_rotated_key_is_picked_up_by_the_refetch(setup: Setup) -> None:
    issuer, verifier, clock = setup
    await verifier.verify(issuer.token())
    new = issuer.rotate()
    clock.t += 11
    p = await verifier.verify(issuer.mint(key=new, sub="after-rotation"))
    assert p.subject == "after-rotation"
    assert issuer.jwks_fetches == 2


async def test_keys_expire_after_their_ttl(setup: Setup) -> None:
    issuer, verifier, clock = setup
    await verifier.verify(issuer.token())
    clock.t += 601
    await verifier.verify(issuer.token(sub="later"))
    assert issuer.jwks_fetches == 2


async def test_issuer_down_without_cached_keys_is_unavailable_not_unauthorized(setup: Setup) -> None:
    issuer, verifier, clock = setup
    issuer.down = True
    with pytest.raises(IssuerUnavailableError):
        await verifier.verify(issuer.token())
    # and with keys cached, an outage at refresh time keeps the old keys
    issuer.down = False
    clock.t += 11
    await verifier.verify(issuer.token(sub="a"))
    issuer.down = True
    clock.t += 601
    assert (await verifier.verify(issuer.token(sub="b"))).subject == "b"


async def test_discovery_naming_another_issuer_is_refused(setup: Setup) -> None:
    issuer, _, clock = setup
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app())) as client:
        jwks = JwksCache("http://other.test", client, monotonic=clock)
        verifier = TokenVerifier(jwks, issuer="http://other.test", audience=AUDIENCE)
        with pytest.raises(IssuerUnavailableError):
            await verifier.verify(issuer.token(iss="http://other.test"))


async def test_verified_tokens_are_cached_but_still_expire() -> None:
    issuer = LocalIssuer()
    now = [time.time()]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app())) as client:
        jwks = JwksCache(issuer.url, client)
        verifier = TokenVerifier(
            jwks, issuer=issuer.url, audience=AUDIENCE, leeway_seconds=0, cache_seconds=3600, clock=lambda: now[0]
        )
        token = issuer.token(exp_in=60)
        await verifier.verify(token)
        now[0] += 30
        await verifier.verify(token)  # from the cache
        now[0] += 40  # now past exp
        with pytest.raises(AuthError):
            await verifier.verify(token)
