"""A service started with ``BILLING_ENV=production`` and any one required variable missing exits at once,
non-zero, with one line that names the variable (the process never gets as far as its database)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.production import REQUIRED

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BILLING = ROOT / ".venv" / "bin" / "billing"

# Real-looking values of every required variable (hosts that do not resolve here: a process that got past
# its settings would hang on them, not exit with status 2).
PRODUCTION_ENV = {
    "BILLING_ENV": "production",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-0.kafka.billing.invalid:9092",
    **{f"{svc}_OIDC_ISSUER": "https://login.example.invalid/oauth2" for svc in ("API", "COLLECTOR", "PRICER",
                                                                                 "LEDGER")},
    "API_LEDGER_URL": "http://billing-ledger.invalid:8083",
    "API_PRICER_URL": "http://billing-pricer.invalid:8082",
    "API_COLLECTOR_URL": "http://billing-collector.invalid:8081",
    "COLLECTOR_CF_API_URL": "https://api.sys.example.invalid",
    "COLLECTOR_UAA_URL": "https://uaa.sys.example.invalid",
    "COLLECTOR_CLIENT_SECRET": "a-real-uaa-secret",
    **{
        f"{svc}_DATABASE_URL": f"postgresql://billing_{svc.lower()}:Xk2-secret@db.example.invalid:5432/billing"
        for svc in ("API", "COLLECTOR", "PRICER", "LEDGER")
    },
}

CASES = [
    (cls.__name__.removesuffix("Settings").lower(), name) for cls, names in REQUIRED.items() for name in names
]


def test_the_production_environment_here_names_every_required_variable():
    assert {name for _, name in CASES} == set(PRODUCTION_ENV) - {"BILLING_ENV"}


@pytest.mark.parametrize(("service", "missing"), CASES)
def test_a_missing_required_variable_stops_the_service_naming_it(service, missing):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "COLLECTOR_", "PRICER_", "LEDGER_"))}
    env |= PRODUCTION_ENV
    del env[missing]
    done = subprocess.run(
        [str(BILLING), service], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0] == f"billing {service}: configuration error: BILLING_ENV=production: {missing} is not set"
