"""OIDC issuer for the billing API's users: RSA key, JWKS, discovery document and token minting.

The private key lives in a PEM file (``SIM_OIDC_KEY_FILE``, default ``.local/sim/oidc-key.pem``
relative to the working directory), created on first use, so the ``billing token`` command (a
separate process) signs with the key the simulator publishes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "DEFAULT_KEY_FILE",
    "ISSUER_ENV",
    "KEY_FILE_ENV",
    "SigningKey",
    "default_issuer",
    "discovery_document",
    "jwks_document",
    "key_file_path",
    "load_signing_key",
    "mint_token",
]

KEY_FILE_ENV = "SIM_OIDC_KEY_FILE"
ISSUER_ENV = "SIM_OIDC_ISSUER"
DEFAULT_KEY_FILE = ".local/sim/oidc-key.pem"
DEFAULT_ISSUER = "http://127.0.0.1:8090"
DEFAULT_AUDIENCE = "billing-api"
ALGORITHM = "RS256"


def default_issuer() -> str:
    """``SIM_OIDC_ISSUER`` if set, else ``http://127.0.0.1:8090``."""
    return os.environ.get(ISSUER_ENV) or DEFAULT_ISSUER


def key_file_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The key file: ``path`` if given, else ``$SIM_OIDC_KEY_FILE``, else the default (cwd-relative)."""
    chosen = path if path is not None else (os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)
    return Path(chosen).expanduser().resolve()


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """An RSA signing key with its published JWK."""

    private_pem: str
    kid: str
    public_jwk: dict[str, str]

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError("the OIDC key file must hold an RSA private key")
        numbers = private.public_key().public_numbers()
        n, e = _b64url_uint(numbers.n), _b64url_uint(numbers.e)
        # RFC 7638 thumbprint as key id: stable for the same key, new for a new key
        canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
        kid = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
        jwk = {"kty": "RSA", "use": "sig", "alg": ALGORITHM, "kid": kid, "n": n, "e": e}
        return cls(pem.decode("ascii"), kid, jwk)


def _create_key_file(path: Path) -> None:
    """Generate a 2048-bit RSA key and publish it atomically at ``path`` (mode 0600).

    If another process wins the race, its key is kept.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic, fails if the file appeared meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def load_signing_key(path: str | os.PathLike[str] | None = None) -> SigningKey:
    """Read the RSA key from the key file, generating and saving it first if absent."""
    file = key_file_path(path)
    if not file.exists():
        _create_key_file(file)
    return SigningKey.from_pem(file.read_bytes())


def mint_token(
    scopes: Sequence[str],
    customers: Sequence[str] = (),
    subject: str = "dev-user",
    audience: str = DEFAULT_AUDIENCE,
    ttl: int = 3600,
    issuer: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    key: SigningKey | None = None,
    now: int | None = None,
) -> str:
    """A signed RS256 JWT (``kid`` in the header) for the billing API.

    Claims: iss, sub, aud, iat, nbf, exp, jti, scope (space-separated), customers (list).
    ``issuer`` defaults to :func:`default_issuer`; the key to the key file's (see module doc).
    """
    signing = key if key is not None else load_signing_key(key_file)
    issued = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer if issuer is not None else default_issuer(),
        "sub": subject,
        "aud": audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
        "scope": " ".join(scopes),
        "customers": list(customers),
    }
    return jwt.encode(claims, signing.private_pem, algorithm=ALGORITHM, headers={"kid": signing.kid})


def discovery_document(issuer: str) -> dict[str, Any]:
    """The ``/.well-known/openid-configuration`` document for ``issuer``."""
    base = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "token_endpoint": f"{base}/oidc/token",
        "authorization_endpoint": f"{base}/oidc/authorize",
        "response_types_supported": ["token"],
        "grant_types_supported": ["client_credentials"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [ALGORITHM],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["usage.read", "usage.admin"],
        "claims_supported": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "customers"],
    }


def jwks_document(key: SigningKey) -> dict[str, Any]:
    return {"keys": [dict(key.public_jwk)]}
