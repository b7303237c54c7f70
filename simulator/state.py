"""The live state of one simulator server (shared by its routes and middleware)."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field

from simulator.clock import SimClock
from simulator.config import SimConfig
from simulator.faults import FaultState
from simulator.foundation import Foundation
from simulator.oidc import SigningKey, default_issuer, load_signing_key

__all__ = ["IssuedToken", "SimState", "TokenStore"]


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scope: str
    jti: str


class TokenStore:
    """Opaque UAA access tokens kept in memory with their (monotonic, wall-clock) expiry."""

    SCOPE = "cloud_controller.admin_read_only cloud_controller.global_auditor"

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}

    def issue(self, ttl_seconds: int) -> IssuedToken:
        now = time.monotonic()
        self._expiry = {t: exp for t, exp in self._expiry.items() if exp > now}
        token = secrets.token_urlsafe(32)
        self._expiry[token] = now + ttl_seconds
        return IssuedToken(token, ttl_seconds, self.SCOPE, uuid.uuid4().hex)

    def is_valid(self, token: str) -> bool:
        expiry = self._expiry.get(token)
        return expiry is not None and time.monotonic() < expiry


@dataclass
class SimState:
    config: SimConfig
    foundation: Foundation
    clock: SimClock
    faults: FaultState
    tokens: TokenStore = field(default_factory=TokenStore)
    _signing_key: SigningKey | None = None

    @classmethod
    def from_config(cls, config: SimConfig) -> SimState:
        foundation = Foundation(
            config.seed, config.orgs, config.spaces_per_org, config.apps, config.services, config.plans
        )
        return cls(config, foundation, SimClock(config.start), FaultState(config.faults))

    @property
    def issuer(self) -> str:
        return self.config.issuer or default_issuer()

    def signing_key(self) -> SigningKey:
        """The OIDC key, loaded (or generated) on first use."""
        if self._signing_key is None:
            self._signing_key = load_signing_key(self.config.oidc_key_file)
        return self._signing_key
