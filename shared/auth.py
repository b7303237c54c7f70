"""Bearer-token authentication, the same in every service: JWTs verified with python-jose against the
issuer's keys. The api verifies the tokens of its callers; the collector, the pricer and the ledger verify
the token of every ``/internal/*`` request themselves (the api forwards its caller's token), so a command
is authenticated where it lands (README, "Security model").

- The keys come from the issuer's JWKS, found by OIDC discovery (``<issuer>/.well-known/openid-configuration``,
  whose ``issuer`` must equal the configured one) and cached; they are refreshed after ``jwks_cache_seconds``,
  and once more (at most every ``jwks_refetch_min_interval_seconds``) when a token names an unknown ``kid``.
- Algorithm allow-list: RS256 with RSA keys and ES256 with P-256 keys, nothing else. The header's ``alg``
  must be allowed *and* match the key named by ``kid`` — so ``alg: none``, HS256 and "HS256 signed with
  the RSA public key as the secret" never reach a signature check.
- Claims: ``iss`` and ``aud`` must equal the configured values, ``exp`` and ``sub`` are required, ``exp``
  and ``nbf`` are checked with a small leeway (clock skew).
- Subject: ``sub`` is required, at most 256 characters, without control characters (it is recorded as the
  actor of commands and must be safe to store and to show).
- Rights: ``scope`` (separated by single spaces as RFC 6749 says, or a list) carries ``usage.read``
  and/or ``usage.admin``; the
  ``customers`` claim (a list of customer ids) entitles the caller to those customers — the issuer is
  trusted to put there only what the subject may see. The admin-managed entitlements in the api's own
  schema (``/admin/entitlements``: subject -> customer) add to it; ``usage.admin`` sees every customer.
  A caller gets the same 404 for a customer it may not see as for one that does not exist
  (the api's ``handlers.Api._ensure_visible``).

``Authenticator`` is what a service holds: the verifier built from its settings (on first use, with its own
HTTP client for the issuer, closed with the service) and the check of a request against a scope.

One module of ~400 lines on purpose: what a token must be to be accepted is reviewed as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import httpx
from jose import jwk, jwt
from jose.backends.base import Key
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError
from starlette.requests import Request

__all__ = [
    "ALLOWED_ALGORITHMS",
    "MAX_SUBJECT",
    "SCOPE_ADMIN",
    "SCOPE_READ",
    "AuthError",
    "AuthSettings",
    "Authenticator",
    "ForbiddenError",
    "IssuerUnavailableError",
    "JwksCache",
    "Principal",
    "TokenVerifier",
    "bearer_token",
]

log = logging.getLogger(__name__)

SCOPE_READ = "usage.read"
SCOPE_ADMIN = "usage.admin"

# alg -> (JWK key type, required curve or None)
ALLOWED_ALGORITHMS: dict[str, tuple[str, str | None]] = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}

MAX_TOKEN_BYTES = 16_384
MAX_SUBJECT = 256  # characters of ``sub``: it is recorded as the actor of commands (shared/commands.py)
_JWS_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


class AuthSettings(Protocol):
    """The settings a service's token verification reads (``shared.settings.ServiceSettings`` has them)."""

    oidc_issuer: str
    oidc_audience: str
    clock_skew_seconds: int
    jwks_cache_seconds: float
    jwks_refetch_min_interval_seconds: float
    oidc_timeout_seconds: float
    token_cache_size: int
    token_cache_seconds: float


class AuthError(Exception):
    """The request carries no acceptable bearer token: 401."""

    def __init__(self, detail: str, *, missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.missing = missing


class ForbiddenError(Exception):
    """A valid token without the scope a route needs: 403."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"this route needs the scope {scope}")
        self.scope = scope


class IssuerUnavailableError(Exception):
    """The issuer's keys cannot be fetched and none are cached: 503."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and what the token grants."""

    subject: str
    scopes: frozenset[str]
    customers: frozenset[UUID]
    expires_at: int
    not_before: int | None = None
    # The bearer token itself: the api forwards it to the service that owns a command (never logged).
    token: str = field(default="", repr=False, compare=False)

    @property
    def is_admin(self) -> bool:
        return SCOPE_ADMIN in self.scopes

    @property
    def can_read(self) -> bool:
        return self.is_admin or SCOPE_READ in self.scopes


@dataclass(frozen=True, slots=True)
class _Jwk:
    alg: str
    key: Key


class JwksCache:
    """The issuer's signing keys by ``kid``, found by discovery and cached."""

    def __init__(
        self,
        issuer: str,
        client: httpx.AsyncClient,
        *,
        ttl_seconds: float = 600,
        refetch_min_interval_seconds: float = 10,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self._client = client
        self._ttl = ttl_seconds
        self._min_interval = refetch_min_interval_seconds
        self._monotonic = monotonic
        self._keys: dict[str, _Jwk] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last attempt, successful or not
        self._lock = asyncio.Lock()
        self.fetches = 0  # JWKS documents fetched (for metrics and tests)

    async def key(self, kid: str, alg: str) -> Key:
        now = self._monotonic()
        if self._fetched_at is None or now - self._fetched_at > self._ttl:
            if self._may_refetch():
                await self._refresh(reason="expired", since=self._attempted_at)
            else:
                await self._settled()  # a fetch started a moment ago may still be under way: its keys
            if not self._keys:
                # The last attempt failed a moment ago: do not hammer an issuer that is down.
                raise IssuerUnavailableError("the token issuer's keys cannot be fetched")
        found = self._keys.get(kid)
        if found is None:
            if self._may_refetch():
                await self._refresh(reason="unknown kid", since=self._attempted_at)
            else:
                await self._settled()
            found = self._keys.get(kid)
        if found is None:
            raise AuthError("the token is signed with an unknown key")
        if found.alg != alg:
            raise AuthError(f"the key {kid} does not sign {alg}")
        return found.key

    async def _settled(self) -> None:
        """Wait for a fetch under way (concurrent requests share it rather than fail while it runs)."""
        if self._lock.locked():
            async with self._lock:
                pass

    def _may_refetch(self) -> bool:
        return self._attempted_at is None or self._monotonic() - self._attempted_at >= self._min_interval

    async def _refresh(self, reason: str, since: float | None) -> None:
        async with self._lock:
            if self._attempted_at != since:
                return  # another request refreshed while this one waited
            self._attempted_at = self._monotonic()
            try:
                keys = await self._fetch()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning(
                    "cannot fetch the issuer's keys",
                    extra={"issuer": self.issuer, "error": repr(exc), "reason": reason},
                )
                if not self._keys:
                    raise IssuerUnavailableError("the token issuer's keys cannot be fetched") from exc
                return  # keep serving with the keys we have
            self._keys = keys
            self._fetched_at = self._attempted_at
            log.info("issuer keys fetched", extra={"issuer": self.issuer, "kids": sorted(keys), "reason": reason})

    async def _fetch(self) -> dict[str, _Jwk]:
        discovery_url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        resp = await self._client.get(discovery_url)
        resp.raise_for_status()
        doc = resp.json()
        if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
            raise ValueError("the discovery document names another issuer")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ValueError("the discovery document has no usable jwks_uri")
        resp = await self._client.get(jwks_uri)
        resp.raise_for_status()
        self.fetches += 1
        body = resp.json()
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise ValueError("the JWKS document has no keys list")  # noqa: TRY004 - caught with fetch errors
        keys: dict[str, _Jwk] = {}
        for raw in body["keys"]:
            parsed = _parse_jwk(raw)
            if parsed is not None:
                keys[parsed[0]] = parsed[1]
        return keys


def _parse_jwk(raw: Any) -> tuple[str, _Jwk] | None:
    """A signing key we accept, or None (other types, curves, uses and algorithms are ignored)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str) or raw.get("use", "sig") != "sig":
        return None
    kty, crv = raw.get("kty"), raw.get("crv")
    alg = raw.get("alg")
    if alg is None:
        alg = next((a for a, (t, c) in ALLOWED_ALGORITHMS.items() if t == kty and c == crv), None)
    if alg not in ALLOWED_ALGORITHMS or ALLOWED_ALGORITHMS[alg] != (kty, crv):
        return None
    if "d" in raw:
        return None  # a private key has no business in a JWKS
    try:
        key = jwk.construct(raw, algorithm=alg)
    except Exception:  # noqa: BLE001 - jose raises several types for a bad key; a bad key is not usable
        log.warning("ignoring an unusable JWK", extra={"kid": raw.get("kid")})
        return None
    return raw["kid"], _Jwk(alg, key)


class TokenVerifier:
    """Turns a bearer token into a :class:`Principal`, or raises :class:`AuthError`."""

    def __init__(
        self,
        jwks: JwksCache,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: int = 30,
        cache_size: int = 4096,
        cache_seconds: float = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._clock = clock
        self._cache_size = cache_size
        self._cache_seconds = cache_seconds
        # token -> (principal, verified at): the same bytes verify the same way, so only time is rechecked.
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None:
            principal, verified_at = hit
            if now - verified_at <= self._cache_seconds and self._in_time(principal, now):
                self._cache.move_to_end(token)
                return principal
            del self._cache[token]
        principal = await self._verify(token)
        if not self._in_time(principal, now):  # the same clock as the cache's (jose uses its own)
            raise AuthError("the token has expired or is not valid yet")
        if self._cache_size:
            self._cache[token] = (principal, now)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    def _in_time(self, p: Principal, now: float) -> bool:
        if now > p.expires_at + self._leeway:
            return False
        return p.not_before is None or now >= p.not_before - self._leeway

    async def _verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES or not _JWS_SHAPE.match(token):
            raise AuthError("the token is not a compact JWS")
        try:
            header = jwt.get_unverified_header(token)
        except JWTError:
            raise AuthError("the token header cannot be read") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise AuthError(f"token algorithm {str(alg)[:20]!r} is not allowed (RS256, ES256)")
        if "crit" in header:
            raise AuthError("token header extensions (crit) are not supported")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise AuthError("the token header has no key id (kid)")
        key = await self.jwks.key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require_exp": True,
                    "require_iss": True,
                    "require_aud": True,
                    "require_sub": True,
                    "leeway": self._leeway,
                },
            )
        except ExpiredSignatureError:
            raise AuthError("the token has expired") from None
        except JWTClaimsError as exc:
            raise AuthError(f"the token's claims are not acceptable: {exc}") from None
        except JWTError:
            raise AuthError("the token's signature does not verify") from None
        return _principal(claims, token)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _principal(claims: dict[str, Any], token: str) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT or _CONTROL.search(sub):
        raise AuthError("the token has no usable subject")
    raw_scope = claims.get("scope", "")
    if isinstance(raw_scope, str):
        # RFC 6749 3.3: scopes are separated by a single space (not by any whitespace).
        scopes = frozenset(s for s in raw_scope.split(" ") if s)
    elif isinstance(raw_scope, list) and all(isinstance(s, str) for s in raw_scope):
        scopes = frozenset(raw_scope)
    else:
        raise AuthError("the token's scope claim is malformed")
    customers: set[UUID] = set()
    raw_customers = claims.get("customers", [])
    if not isinstance(raw_customers, list):
        raise AuthError("the token's customers claim is malformed")
    for c in raw_customers:
        try:
            customers.add(UUID(str(c)))
        except ValueError:
            continue  # an id that is no customer id entitles to nothing
    exp = claims["exp"]
    nbf = claims.get("nbf")
    return Principal(
        subject=sub,
        scopes=scopes,
        customers=frozenset(customers),
        expires_at=int(exp),
        not_before=int(nbf) if isinstance(nbf, (int, float)) else None,
        token=token,
    )


def bearer_token(request: Request) -> str:
    """The token of ``Authorization: Bearer <token>``, or AuthError."""
    header = request.headers.get("authorization")
    if header is None:
        raise AuthError("send a bearer token: Authorization: Bearer <token>", missing=True)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError("the Authorization header must be: Bearer <token>")
    return token


class Authenticator:
    """A service's token verification: the verifier built from its settings on first use (with its own HTTP
    client for the issuer; ``aclose`` at stop) and the check of a request against a scope."""

    def __init__(self, settings: AuthSettings, realm: str = "billing") -> None:
        self._settings = settings
        self.realm = realm  # of the WWW-Authenticate challenge
        self._client: httpx.AsyncClient | None = None
        self._verifier: TokenVerifier | None = None

    @property
    def verifier(self) -> TokenVerifier:
        if self._verifier is None:
            s = self._settings
            self._client = httpx.AsyncClient(timeout=s.oidc_timeout_seconds, follow_redirects=False)
            jwks = JwksCache(
                s.oidc_issuer,
                self._client,
                ttl_seconds=s.jwks_cache_seconds,
                refetch_min_interval_seconds=s.jwks_refetch_min_interval_seconds,
            )
            self._verifier = TokenVerifier(
                jwks,
                issuer=s.oidc_issuer,
                audience=s.oidc_audience,
                leeway_seconds=s.clock_skew_seconds,
                cache_size=s.token_cache_size,
                cache_seconds=s.token_cache_seconds,
            )
        return self._verifier

    async def principal(self, request: Request, scope: str) -> Principal:
        """The verified caller of ``request`` holding ``scope`` (``usage.admin`` holds every scope);
        AuthError (401), ForbiddenError (403) or IssuerUnavailableError (503) otherwise."""
        principal = await self.verifier.verify(bearer_token(request))
        if scope not in principal.scopes and not principal.is_admin:
            raise ForbiddenError(scope)
        return principal

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client, self._verifier = None, None
