"""A local OIDC issuer for the services' tests: ``LocalIssuer`` (discovery, a rotatable JWKS, token minting and
forging), ``attacks`` (tokens that must all be refused), ``serve_issuer`` (the issuer on a random port) and
``bearer`` (the Authorization header of a token, by default an admin's, for the internal routes)."""

from __future__ import annotations

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

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.sim_server import serve_app

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

    def forge(
        self, header: dict[str, Any], claims: dict[str, Any], signature: bytes | None = None,
        secret: bytes | None = None,
    ) -> str:
        """A token signed by hand: ``secret`` makes an HS256 MAC, ``signature`` is used as given."""
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        if secret is not None:
            signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + _b64(signature or b"")

    def bearer(self, scopes: Sequence[str] = ("usage.admin",), sub: str = "admin-1", **kw: Any) -> dict[str, str]:
        """The Authorization header of a token of this issuer (an admin's by default, valid for an hour)."""
        kw.setdefault("exp_in", 3600)
        return {"authorization": f"Bearer {self.mint(scopes=scopes, sub=sub, **kw)}"}

    def rotate(self) -> SigningKey:
        new = SigningKey(f"rsa-{len(self.published) + 1}", "RS256")
        self.published.append(new)
        return new


def attacks(issuer: LocalIssuer, customer: str, scopes: Sequence[str] = ("usage.read",)) -> dict[str, str]:
    """Tokens that must all be refused (401), by name; each would grant ``scopes`` if it were accepted."""

    def claims(**kw: Any) -> dict[str, Any]:
        return issuer.claims(scopes=scopes, customers=[customer], **kw)

    def token(**kw: Any) -> str:
        return issuer.mint(scopes=scopes, customers=[customer], **kw)

    def tampered(**changes: Any) -> str:
        """A valid token whose payload was changed after signing (the signature kept)."""
        head, payload, sig = token().split(".")
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return f"{head}.{_b64(json.dumps(doc | changes).encode())}.{sig}"

    stranger = _default_key("rsa-1", "RS256", "stranger")  # same kid as a published key, other key material
    public = issuer.rsa.public_pem
    return {
        "malformed": "not-a-token",
        "malformed_segments": "a.b.c.d",
        "garbage_base64": "eyJhbGciOiJSUzI1NiJ9.@@@.xyz",
        "alg_none": issuer.forge({"alg": "none", "kid": "rsa-1"}, claims()),
        "alg_none_with_signature": issuer.forge({"alg": "none", "kid": "rsa-1"}, claims(), signature=b"x"),
        "hs256_with_rsa_public_key": issuer.forge(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), secret=public
        ),
        "hs256_no_kid": issuer.forge({"alg": "HS256"}, claims(), secret=public),
        "rs384": jwt.encode(
            claims(), jwk.construct(issuer.rsa.pem, "RS384"), algorithm="RS384", headers={"kid": "rsa-1"}
        ),
        "es256_signed_claims_rs256_kid": jwt.encode(
            claims(), issuer.ec.signer, algorithm="ES256", headers={"kid": "rsa-1"}
        ),
        "expired": token(exp_in=-120),
        "not_yet_valid": token(nbf_in=600, exp_in=1200),
        "wrong_issuer": token(iss="http://evil.test"),
        "wrong_audience": token(aud="another-api"),
        "unknown_kid": token(kid="never-published"),
        "no_kid": jwt.encode(claims(), issuer.rsa.signer, algorithm="RS256"),
        "tampered_payload": tampered(scope="usage.read usage.admin", sub="someone-else"),
        "tampered_expiry": tampered(exp=int(time.time()) + 10 * 365 * 86400),
        "tampered_issuer": tampered(iss="http://evil.test"),
        "signed_by_stranger": token(key=stranger),
        "no_exp": jwt.encode(
            {k: v for k, v in claims().items() if k != "exp"},
            issuer.rsa.signer,
            algorithm="RS256",
            headers={"kid": "rsa-1"},
        ),
    }


@contextlib.asynccontextmanager
async def serve_issuer(issuer: LocalIssuer) -> AsyncIterator[LocalIssuer]:
    """Run ``issuer`` with uvicorn on a random local port; sets ``issuer.url``."""
    async with serve_app(issuer.app()) as url:
        issuer.url = url
        yield issuer
