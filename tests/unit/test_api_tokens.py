"""The api's token verification, against a local OIDC issuer (an in-process Starlette app reached through
httpx's ASGI transport: no network). Also home of ``LocalIssuer``/``serve_issuer``, which the api's
integration tests use to run a real issuer on a random port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.api.auth import AuthError, IssuerUnavailableError, JwksCache, TokenVerifier

AUDIENCE = "billing-api"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class SigningKey:
    def __init__(self, kid: str, alg: str) -> None:
        self.kid, self.alg = kid, alg
        if alg == "RS256":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
        self.pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.signer = jwk.construct(self.pem, alg)  # parsing a PEM per token is slow

    def jwk(self) -> dict[str, str]:
        pub = self.private.public_key().public_numbers()
        if self.alg == "RS256":
            return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": _uint(pub.n), "e": _uint(pub.e)}
        return {
            "kty": "EC",
            "use": "sig",
            "alg": "ES256",
            "kid": self.kid,
            "crv": "P-256",
            "x": _b64(pub.x.to_bytes(32, "big")),
            "y": _b64(pub.y.to_bytes(32, "big")),
        }


@functools.cache
def _default_key(kid: str, alg: str, tag: str = "") -> SigningKey:
    return SigningKey(kid, alg)  # RSA key generation is slow: one per process is enough


class LocalIssuer:
    """A tiny OIDC issuer for tests: discovery, a JWKS it can rotate, and token minting (and forging)."""

    def __init__(self, url: str = "http://issuer.test") -> None:
        self.url = url
        self.rsa = _default_key("rsa-1", "RS256")
        self.ec = _default_key("ec-1", "ES256")
        self.published: list[SigningKey] = [self.rsa, self.ec]
        self.jwks_fetches = 0
        self.down = False

    def app(self) -> Starlette:
        async def discovery(request: Request) -> JSONResponse:
            if self.down:
                return JSONResponse({"error": "down"}, status_code=503)
            return JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/.well-known/jwks.json"})

        async def jwks(request: Request) -> JSONResponse:
            if self.down:
                return JSONResponse({"error": "down"}, status_code=503)
            self.jwks_fetches += 1
            return JSONResponse({"keys": [k.jwk() for k in self.published]})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/.well-known/jwks.json", jwks),
            ]
        )

    def claims(
        self,
        *,
        scopes: Sequence[str] = ("usage.read",),
        customers: Sequence[str] = (),
        sub: str = "user-1",
        aud: str = AUDIENCE,
        iss: str | None = None,
        exp_in: int = 300,
        nbf_in: int = 0,
        **extra: Any,
    ) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.url if iss is None else iss,
            "sub": sub,
            "aud": aud,
            "iat": now,
            "nbf": now + nbf_in,
            "exp": now + exp_in,
            "jti": uuid.uuid4().hex,
            "scope": " ".join(scopes),
            "customers": list(customers),
            **extra,
        }

    def mint(self, key: SigningKey | None = None, kid: str | None = None, **claims: Any) -> str:
        key = key or self.rsa
        return jwt.encode(self.claims(**claims), key.signer, algorithm=key.alg, headers={"kid": kid or key.kid})

    def token(self, scopes: Sequence[str] = ("usage.read",), customers: Sequence[str] = (), **kw: Any) -> str:
        return self.mint(scopes=scopes, customers=customers, **kw)

    def forge(self, header: dict[str, Any], claims: dict[str, Any], signature: bytes | None = None, secret: bytes | None = None) -> str:
        """A token signed by hand: ``secret`` makes an HS256 MAC, ``signature`` is used as given."""
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        if secret is not None:
            signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + _b64(signature or b"")

    def rotate(self) -> SigningKey:
        new = SigningKey(f"rsa-{len(self.published) + 1}", "RS256")
        self.published.append(new)
        return new


def attacks(issuer: LocalIssuer, customer: str) -> dict[str, str]:
    """Tokens that must all be refused (401), by name."""
    valid = issuer.token(customers=[customer])
    head, payload, sig = valid.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    tampered_claims["scope"] = "usage.read usage.admin"
    stranger = _default_key("rsa-1", "RS256", "stranger")  # same kid as a published key, other key material
    return {
        "malformed": "not-a-token",
        "malformed_segments": "a.b.c.d",
        "garbage_base64": "eyJhbGciOiJSUzI1NiJ9.@@@.xyz",
        "alg_none": issuer.forge({"alg": "none", "kid": "rsa-1"}, issuer.claims(customers=[customer])),
        "alg_none_with_signature": issuer.forge({"alg": "none", "kid": "rsa-1"}, issuer.claims(customers=[customer]), signature=b"x"),
        "hs256_with_rsa_public_key": issuer.forge(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, issuer.claims(customers=[customer]), secret=issuer.rsa.public_pem
        ),
        "hs256_no_kid": issuer.forge({"alg": "HS256"}, issuer.claims(customers=[customer]), secret=issuer.rsa.public_pem),
        "rs384": jwt.encode(issuer.claims(customers=[customer]), jwk.construct(issuer.rsa.pem, "RS384"), algorithm="RS384", headers={"kid": "rsa-1"}),
        "es256_signed_claims_rs256_kid": jwt.encode(
            issuer.claims(customers=[customer]), issuer.ec.signer, algorithm="ES256", headers={"kid": "rsa-1"}
        ),
        "expired": issuer.token(customers=[customer], exp_in=-120),
        "not_yet_valid": issuer.token(customers=[customer], nbf_in=600, exp_in=1200),
        "wrong_issuer": issuer.token(customers=[customer], iss="http://evil.test"),
        "wrong_audience": issuer.token(customers=[customer], aud="another-api"),
        "unknown_kid": issuer.mint(kid="never-published", customers=[customer]),
        "no_kid": jwt.encode(issuer.claims(customers=[customer]), issuer.rsa.signer, algorithm="RS256"),
        "tampered_payload": f"{head}.{_b64(json.dumps(tampered_claims).encode())}.{sig}",
        "signed_by_stranger": issuer.mint(key=stranger, customers=[customer]),
        "no_exp": jwt.encode(
            {k: v for k, v in issuer.claims(customers=[customer]).items() if k != "exp"},
            issuer.rsa.signer,
            algorithm="RS256",
            headers={"kid": "rsa-1"},
        ),
    }


@contextlib.asynccontextmanager
async def serve_issuer(issuer: LocalIssuer) -> AsyncIterator[LocalIssuer]:
    """Run ``issuer`` with uvicorn on a random local port; sets ``issuer.url``."""
    server = uvicorn.Server(uvicorn.Config(issuer.app(), host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none"))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        issuer.url = f"http://127.0.0.1:{port}"
        yield issuer
    finally:
        server.should_exit = True
        await task


# ------------------------------------------------------------------------------------------ unit tests


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def setup() -> AsyncIterator[tuple[LocalIssuer, TokenVerifier, Clock]]:
    issuer = LocalIssuer()
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app())) as client:
        jwks = JwksCache(issuer.url, client, ttl_seconds=600, refetch_min_interval_seconds=10, monotonic=clock)
        verifier = TokenVerifier(jwks, issuer=issuer.url, audience=AUDIENCE, leeway_seconds=30)
        yield issuer, verifier, clock


async def test_valid_rs256_and_es256_tokens_give_subject_scopes_and_customers(setup):
    issuer, verifier, _ = setup
    customer = str(uuid.uuid4())
    for key in (issuer.rsa, issuer.ec):
        p = await verifier.verify(issuer.mint(key=key, sub="alice", scopes=["usage.read"], customers=[customer, "not-a-uuid"]))
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
async def test_every_attack_token_is_refused(setup, name):
    issuer, verifier, _ = setup
    token = attacks(issuer, str(uuid.uuid4()))[name]
    with pytest.raises(AuthError):
        await verifier.verify(token)


async def test_clock_skew_is_tolerated_within_the_leeway_only(setup):
    issuer, verifier, _ = setup
    await verifier.verify(issuer.token(exp_in=-10))  # expired 10 s ago: within 30 s of skew
    await verifier.verify(issuer.token(nbf_in=10))  # valid in 10 s: within the skew
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify(issuer.token(exp_in=-45))
    with pytest.raises(AuthError):
        await verifier.verify(issuer.token(nbf_in=45))


async def test_keys_are_fetched_once_and_cached(setup):
    issuer, verifier, _ = setup
    for _ in range(5):
        await verifier.verify(issuer.token(sub=f"u{_}"))
    assert issuer.jwks_fetches == 1


async def test_unknown_kid_refetches_once_then_refuses_and_is_rate_limited(setup):
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


async def test_a_rotated_key_is_picked_up_by_the_refetch(setup):
    issuer, verifier, clock = setup
    await verifier.verify(issuer.token())
    new = issuer.rotate()
    clock.t += 11
    p = await verifier.verify(issuer.mint(key=new, sub="after-rotation"))
    assert p.subject == "after-rotation"
    assert issuer.jwks_fetches == 2


async def test_keys_expire_after_their_ttl(setup):
    issuer, verifier, clock = setup
    await verifier.verify(issuer.token())
    clock.t += 601
    await verifier.verify(issuer.token(sub="later"))
    assert issuer.jwks_fetches == 2


async def test_issuer_down_without_cached_keys_is_unavailable_not_unauthorized(setup):
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


async def test_discovery_naming_another_issuer_is_refused(setup):
    issuer, _, clock = setup
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app())) as client:
        jwks = JwksCache("http://other.test", client, monotonic=clock)
        verifier = TokenVerifier(jwks, issuer="http://other.test", audience=AUDIENCE)
        with pytest.raises(IssuerUnavailableError):
            await verifier.verify(issuer.token(iss="http://other.test"))


async def test_verified_tokens_are_cached_but_still_expire():
    issuer = LocalIssuer()
    now = [time.time()]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app())) as client:
        jwks = JwksCache(issuer.url, client)
        verifier = TokenVerifier(jwks, issuer=issuer.url, audience=AUDIENCE, leeway_seconds=0, cache_seconds=3600, clock=lambda: now[0])
        token = issuer.token(exp_in=60)
        await verifier.verify(token)
        now[0] += 30
        await verifier.verify(token)  # from the cache
        now[0] += 40  # now past exp
        with pytest.raises(AuthError):
            await verifier.verify(token)
