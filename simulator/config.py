"""Simulator configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from simulator.faults import FaultConfig

__all__ = ["DEFAULT_START", "SimConfig"]

DEFAULT_START = datetime(2026, 10, 1, tzinfo=UTC)


@dataclass
class SimConfig:
    """Everything ``create_app`` needs. Defaults give a small world on 127.0.0.1:8090."""

    seed: int = 1
    orgs: int = 4
    spaces_per_org: int = 3
    apps: int = 200
    services: int = 60
    plans: int = 6
    start: datetime = DEFAULT_START
    """The simulated clock's initial hour (UTC)."""
    token_ttl_seconds: int = 600
    """Lifetime of UAA (CF) access tokens, in real wall-clock seconds."""
    client_id: str = "billing-collector"
    client_secret: str = "sim-secret"
    oidc_client_id: str = "billing-user"
    oidc_client_secret: str = "sim-secret"
    issuer: str | None = None
    """OIDC issuer URL; None means $SIM_OIDC_ISSUER or http://127.0.0.1:8090."""
    oidc_key_file: str | None = None
    """RSA key PEM path; None means $SIM_OIDC_KEY_FILE or .local/sim/oidc-key.pem."""
    faults: FaultConfig = field(default_factory=FaultConfig)
