"""Cloud Foundry v3 API / UAA / OIDC simulator with a deterministic, seeded foundation."""

from simulator.app import create_app
from simulator.config import SimConfig
from simulator.faults import FaultConfig
from simulator.foundation import (
    AppState,
    ExpectedMeasurement,
    Foundation,
    Org,
    ProcessState,
    ServiceInstanceState,
    ServiceOffering,
    ServicePlan,
    Snapshot,
    Space,
)
from simulator.oidc import discovery_document, load_signing_key, mint_token

__all__ = [
    "AppState",
    "ExpectedMeasurement",
    "FaultConfig",
    "Foundation",
    "Org",
    "ProcessState",
    "ServiceInstanceState",
    "ServiceOffering",
    "ServicePlan",
    "SimConfig",
    "Snapshot",
    "Space",
    "create_app",
    "discovery_document",
    "load_signing_key",
    "mint_token",
]
