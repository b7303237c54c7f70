"""The Kubernetes manifests, rendered by kustomize (base and the local-cluster overlay) and checked without a
cluster: every object valid against the Kubernetes JSON schemas (and KEDA's), every variable each service
requires in production set in its Deployment and accepted by its settings, KEDA on the topics and groups the
services really consume, and the hardening an operator expects (non-root, read-only root, probes, PDBs,
NetworkPolicies that leave only the api reachable)."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from cli.settings_doc import SERVICES as SETTINGS
from shared.settings import env_name, read_settings
from shared.topics import CHARGES, PARTITIONS, READINGS, READINGS_V1, TOPICS, TRANSACTIONS, TopicSettings
from tests.support.manifests import RENDERINGS, ROOT, SERVICES, container_env, containers, find, render, the

KUBERNETES = "1.32"
KEDA_SCHEMA = json.loads((Path(__file__).parents[1] / "support" / "schemas" / "keda-scaledobject.json").read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# What each ScaledObject must watch: the topics each service consumes (the .v2 ones the redesign moves to).
SCALED_ON = {"pricer": {READINGS, READINGS_V1}, "ledger": {CHARGES}, "api": {CHARGES, TRANSACTIONS}}


@pytest.fixture(scope="module", params=RENDERINGS)
def rendering(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def deployment(objects: list[dict], service: str) -> dict:
    return the(objects, "Deployment", f"billing-{service}")


def test_every_object_is_valid_against_the_kubernetes_and_keda_schemas(rendering):
    _, objects = rendering
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, KEDA_SCHEMA)
        else:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Job", "ScaledObject", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds


def test_a_typo_in_a_manifest_would_be_refused():
    objects = render("base")
    bad = json.loads(json.dumps(deployment(objects, "api")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)
    scaled = json.loads(json.dumps(the(objects, "ScaledObject", "billing-api")))
    scaled["spec"]["replicas"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMA)


@pytest.mark.parametrize("service", SERVICES)
def test_each_deployment_sets_every_variable_its_service_requires_in_production(rendering, service, monkeypatch):
    _, objects = rendering
    (container,) = containers(deployment(objects, service))
    env = container_env(objects, container)
    cls = SETTINGS[service]
    assert env["BILLING_ENV"] == "production"
    assert env.get("BILLING_ALLOW_LOCAL_HOSTS", "false") == "false"
    for name in cls.PRODUCTION_REQUIRED:
        assert env.get(env_name(cls, name)), f"{service}: {env_name(cls, name)} is not set"
    # And the service's own settings accept them as production values.
    for key in [k for k in os.environ if k.startswith(("API_", "COLLECTOR_", "PRICER_", "LEDGER_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    read_settings(cls)


def test_the_topics_job_creates_the_topics_with_the_clusters_replication(rendering, monkeypatch):
    which, objects = rendering
    (container,) = containers(the(objects, "Job", "billing-topics"))
    assert container["args"] == ["topics"]
    env = container_env(objects, container)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = read_settings(TopicSettings)
    assert s.billing_env == "production"
    expected = (3, 2) if which == "base" else (1, 1)
    assert (s.replication_factor, s.min_insync_replicas) == expected


@pytest.mark.parametrize("prefix", [None, "staging."])
def test_keda_scales_on_the_real_topics_groups_and_broker_of_each_service(rendering, prefix):
    _, objects = rendering
    overrides = {"billing": {"KAFKA_TOPIC_PREFIX": prefix}} if prefix is not None else None
    scaled = {o["spec"]["scaleTargetRef"]["name"].removeprefix("billing-"): o for o in find(objects, "ScaledObject")}
    assert set(scaled) == set(SCALED_ON)
    for service, obj in scaled.items():
        target = deployment(objects, service)
        assert "replicas" not in target["spec"], f"{service}: KEDA owns the replica count"
        (container,) = containers(target)
        assert obj["spec"]["scaleTargetRef"].get("envSourceContainerName", container["name"]) == container["name"]
        env = container_env(objects, container, overrides)
        settings = SETTINGS[service](topic_prefix=env["KAFKA_TOPIC_PREFIX"])
        topics = set()
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] != "kafka":
                continue
            meta = trigger["metadata"]
            assert not {"bootstrapServers", "consumerGroup", "topic"} & set(meta), "hard-coded in the trigger"
            assert env[meta["bootstrapServersFromEnv"]] == env["KAFKA_BOOTSTRAP_SERVERS"]
            # The group the service's consumers join (shared.runtime: the prefix, then the service's name).
            assert env[meta["consumerGroupFromEnv"]] == settings.topic(service)
            topics.add(env[meta["topicFromEnv"]])
        assert topics == {settings.topic(t) for t in SCALED_ON[service]}
        assert obj["spec"]["maxReplicaCount"] <= min(TOPICS[t].partitions for t in SCALED_ON[service]) <= PARTITIONS


def test_only_keda_scaled_deployments_go_without_replicas():
    objects = render("base")
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in find(objects, "ScaledObject")}
    for obj in find(objects, "Deployment"):
        assert ("replicas" in obj["spec"]) == (obj["metadata"]["name"] not in scaled), obj["metadata"]["name"]


def dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), flags=re.M)
    return int(users[-1])


def test_every_pod_runs_non_root_read_only_without_capabilities_on_the_versioned_image(rendering):
    _, objects = rendering
    workloads = find(objects, "Deployment") + find(objects, "Job")
    assert workloads
    for obj in workloads:
        pod = obj["spec"]["template"]["spec"]
        name = obj["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == dockerfile_uid(), name
        assert pod.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: no writable /tmp"
            assert c["image"] == f"cf-billing:{VERSION}", name


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_probes_a_service_and_a_disruption_budget(rendering, service):
    _, objects = rendering
    dep = deployment(objects, service)
    (c,) = containers(dep)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    port = c["ports"][0]["containerPort"]
    assert port == SETTINGS[service].model_fields["port"].default
    svc = the(objects, "Service", f"billing-{service}")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    (pdb,) = [p for p in find(objects, "PodDisruptionBudget") if p["spec"]["selector"] == dep["spec"]["selector"]]
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1


def _selects(policy: dict, labels: dict) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def test_network_policies_leave_only_the_api_reachable_and_internal_routes_to_the_api(rendering):
    _, objects = rendering
    policies = [p for p in find(objects, "NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]]
    for obj in find(objects, "Deployment") + find(objects, "Job"):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        name = labels["app.kubernetes.io/name"]
        mine = [p for p in policies if _selects(p, labels)]
        assert mine, f"{name}: no ingress policy selects it (open to everything)"
        rules = [rule for p in mine for rule in p["spec"].get("ingress", [])]
        if name == "billing-api":
            assert any("from" not in r for r in rules), "the api is not reachable from outside"
            assert all([p["port"] for p in r["ports"]] == [8080] for r in rules)
            continue
        for rule in rules:
            assert rule.get("from"), f"{name}: a rule open to every source"
            for peer in rule["from"]:
                allowed = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                assert set(peer) == {"podSelector"}, f"{name}: a namespace or IP peer"
                assert allowed == "billing-api" or (name == "billing-sim" and allowed == "billing-collector")
        if name in {f"billing-{s}" for s in SERVICES}:
            assert rules, f"{name}: not even the api may call it"


def test_the_overlay_changes_values_not_how_the_deployments_read_them():
    base, overlay = render("base"), render("overlays/local-cluster")
    for service in SERVICES:
        def wiring(objects):
            (c,) = containers(deployment(objects, service))  # noqa: B023 - called in this iteration
            return [(e["name"], sorted(e.get("valueFrom", {}))) for e in c["env"]]

        assert wiring(base) == wiring(overlay)
    assert {o["metadata"].get("namespace") for o in overlay} == {"billing"}
