"""The two settings profiles: ``local`` keeps the local stack's defaults; ``production`` has no default for
any URL, secret, DSN or issuer and refuses values that only make sense on a developer's machine, naming
the variable in one line."""

from __future__ import annotations

import pytest

from services.api.settings import ApiSettings
from services.collector.settings import CollectorSettings
from services.ledger.settings import LedgerSettings
from services.pricer.settings import PricerSettings
from shared.settings import SettingsError, read_settings
from tests.support.production import REQUIRED

GOOD = {
    "database_url": "postgresql://billing_svc:Xk2-not-the-role@db.billing.internal:5432/billing",
    "kafka_bootstrap_servers": "kafka-0.kafka:9092,kafka-1.kafka:9092",
    "oidc_issuer": "https://login.example.gov/oauth2",
    "ledger_url": "http://billing-ledger:8083",
    "pricer_url": "http://billing-pricer:8082",
    "collector_url": "http://billing-collector:8081",
    "cf_api_url": "https://api.sys.example.gov",
    "uaa_url": "https://uaa.sys.example.gov",
    "client_secret": "a-real-uaa-secret",
}


def good(cls: type) -> dict[str, str]:
    return {k: v for k, v in GOOD.items() if k in cls.model_fields}


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch):
    for name in ("BILLING_ENV", "BILLING_ALLOW_LOCAL_HOSTS", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    for names in REQUIRED.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("cls", list(REQUIRED))
def test_local_is_the_default_and_points_at_the_local_stack(cls):
    s = read_settings(cls)
    assert s.billing_env == "local"
    assert "@127.0.0.1:5433/" in s.database_url.get_secret_value()
    assert s.kafka_bootstrap_servers == "127.0.0.1:9092"


@pytest.mark.parametrize("cls", list(REQUIRED))
def test_production_without_settings_names_every_required_variable_in_one_line(cls):
    with pytest.raises(SettingsError) as exc:
        read_settings(cls, billing_env="production")
    message = str(exc.value)
    assert "\n" not in message
    assert [name for name in REQUIRED[cls] if f"{name} is not set" in message] == REQUIRED[cls]


@pytest.mark.parametrize("cls", list(REQUIRED))
def test_production_with_every_required_setting_starts(cls):
    s = read_settings(cls, billing_env="production", **good(cls))
    assert s.billing_env == "production"


@pytest.mark.parametrize(
    ("cls", "field", "value", "words"),
    [
        (ApiSettings, "oidc_issuer", "http://127.0.0.1:8090", "API_OIDC_ISSUER points at this machine (127.0.0.1)"),
        (ApiSettings, "ledger_url", "http://localhost:8083", "API_LEDGER_URL points at this machine (localhost)"),
        (ApiSettings, "pricer_url", "http://[::1]:8082", "API_PRICER_URL points at this machine (::1)"),
        (CollectorSettings, "client_secret", "sim-secret", "COLLECTOR_CLIENT_SECRET is the simulator's client secret"),
        (CollectorSettings, "uaa_url", "uaa.example.gov", "COLLECTOR_UAA_URL is not an http(s) URL"),
        (
            PricerSettings,
            "database_url",
            "postgresql://pricer:pricer@db.internal:5432/billing",
            "PRICER_DATABASE_URL has the role name as its password",
        ),
        (
            LedgerSettings,
            "database_url",
            "postgresql://ledger:Xk2@127.0.0.1:5433/billing",
            "LEDGER_DATABASE_URL points at this machine (127.0.0.1)",
        ),
        (LedgerSettings, "kafka_bootstrap_servers", "kafka-0:9092,localhost:9092", "KAFKA_BOOTSTRAP_SERVERS points at"),
    ],
)
def test_production_refuses_a_local_or_simulator_value_naming_its_variable(cls, field, value, words):
    with pytest.raises(SettingsError) as exc:
        read_settings(cls, billing_env="production", **(good(cls) | {field: value}))
    assert words in str(exc.value)
    # Locally the same value is fine: it is the local stack's.
    read_settings(cls, **{field: value})


def test_the_collector_refuses_the_simulators_time_header_in_production():
    with pytest.raises(SettingsError, match="COLLECTOR_SIM_TIME_HEADER is on"):
        read_settings(CollectorSettings, billing_env="production", sim_time_header=True, **good(CollectorSettings))


def test_allow_local_hosts_lifts_only_the_loopback_rule():
    local = good(ApiSettings) | {"oidc_issuer": "http://127.0.0.1:8090", "ledger_url": "http://127.0.0.1:8083"}
    read_settings(ApiSettings, billing_env="production", allow_local_hosts=True, **local)
    with pytest.raises(SettingsError, match="has the role name as its password"):
        read_settings(
            ApiSettings,
            billing_env="production",
            allow_local_hosts=True,
            **(local | {"database_url": "postgresql://api:api@127.0.0.1:5433/billing"}),
        )


def test_a_bad_value_is_named_by_its_variable(monkeypatch):
    monkeypatch.setenv("BILLING_ENV", "prod")
    with pytest.raises(SettingsError, match=r"^BILLING_ENV: Input should be 'local' or 'production'"):
        read_settings(PricerSettings)
    monkeypatch.setenv("BILLING_ENV", "local")
    monkeypatch.setenv("PRICER_PORT", "70000")
    with pytest.raises(SettingsError, match=r"^PRICER_PORT: Input should be less than or equal to 65535"):
        read_settings(PricerSettings)
