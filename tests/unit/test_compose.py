"""docker-compose.yml, read (no Docker engine here): the services wait for the topics job, only the api is
published (on the host's loopback), and every service gets each setting its production profile requires,
in values that profile accepts."""

from __future__ import annotations

import os

import pytest

from cli.settings_doc import SERVICES as SETTINGS
from shared.settings import env_name, read_settings
from shared.topics import TopicSettings
from tests.support.manifests import SERVICES, compose, compose_env


def test_every_service_waits_for_the_topics_job_to_complete():
    services = compose()["services"]
    for name in SERVICES:
        depends = services[name]["depends_on"]
        assert depends["topics"] == {"condition": "service_completed_successfully"}, name
        assert depends["kafka"]["condition"] == depends["postgres"]["condition"] == "service_healthy", name
    assert services["topics"]["command"] == ["topics"]
    assert services["topics"]["depends_on"]["kafka"] == {"condition": "service_healthy"}
    assert services["topics"]["restart"] == "no"


def test_only_the_api_is_published_and_only_on_the_hosts_loopback():
    services = compose()["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"api"}
    for port in published["api"]:
        host_ip, _host_port, container_port = str(port).split(":")
        assert host_ip == "127.0.0.1" and container_port == "8080", port
    assert not any(s.get("network_mode") == "host" for s in services.values())


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_gets_every_production_setting(service, monkeypatch):
    env = compose_env(service)
    cls = SETTINGS[service]
    assert env["BILLING_ENV"] == "production" and "BILLING_ALLOW_LOCAL_HOSTS" not in env
    for name in cls.PRODUCTION_REQUIRED:
        assert env.get(env_name(cls, name)), f"{service}: {env_name(cls, name)} is not set"
    for key in [k for k in os.environ if k.startswith(("API_", "COLLECTOR_", "PRICER_", "LEDGER_", "KAFKA_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = read_settings(cls)
    assert settings.host == "0.0.0.0"  # reachable on the compose network


def test_the_topics_job_runs_in_production_on_one_broker(monkeypatch):
    for key, value in compose_env("topics").items():
        monkeypatch.setenv(key, value)
    s = read_settings(TopicSettings)
    assert (s.billing_env, s.replication_factor, s.min_insync_replicas) == ("production", 1, 1)


def test_the_simulator_accepts_the_collectors_client_secret():
    command = compose()["services"]["sim"]["command"]
    assert command[command.index("--client-secret") + 1] == compose_env("collector")["COLLECTOR_CLIENT_SECRET"]
    assert compose_env("sim")["SIM_OIDC_ISSUER"] == compose_env("api")["API_OIDC_ISSUER"]
