"""The deployment manifests as the tests read them: the kustomize renderings of deploy/k8s and
docker-compose.yml, each service's environment resolved the way Kubernetes (and KEDA) or compose resolve it,
and the host mapping that points a manifest's environment at this machine's stack."""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RENDERINGS = ("base", "overlays/local-cluster")
SERVICES = ("api", "collector", "pricer", "ledger")

Obj = dict[str, Any]


def render(which: str) -> list[Obj]:
    """``kustomize build deploy/k8s/<which>`` (the pinned kustomize, built on first use)."""
    done = subprocess.run(
        [str(K8S / "kustomize.sh"), "build", str(K8S / which)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        pytest.fail(f"kustomize build {which} failed: {done.stderr[-2000:]}", pytrace=False)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def the(objects: list[Obj], kind: str, name: str) -> Obj:
    (obj,) = find(objects, kind, name)
    return obj


def _data(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} | dict(
            obj.get("stringData") or {}
        )
    return dict(obj.get("data") or {})


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of an env value (``$$`` escapes; unknown references stay)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), value)


def container_env(
    objects: list[Obj], container: Obj, overrides: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, str]:
    """The environment a container starts with: each ConfigMap/Secret reference resolved against the
    rendered objects (``overrides`` replaces keys of a ConfigMap by its name before the hash suffix), then
    ``$(VAR)`` references expanded in order, as the kubelet and KEDA's resolver do. A reference to a
    missing object or key fails the test (the pod would not start)."""
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in ("ConfigMap", "Secret")}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        kind, ref = ("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source else (
            "Secret", source["secretKeyRef"])
        obj = by_name.get((kind, ref["name"]))
        assert obj is not None, f"{item['name']}: no {kind} {ref['name']} in the rendering"
        data = _data(obj)
        base_name = re.sub(r"-[a-z0-9]{10}$", "", ref["name"])
        data |= dict((overrides or {}).get(base_name, {}))
        assert ref["key"] in data, f"{item['name']}: {kind} {ref['name']} has no key {ref['key']}"
        env[item["name"]] = data[ref["key"]]
    return env


def containers(obj: Obj) -> list[Obj]:
    return list(obj["spec"]["template"]["spec"]["containers"])


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def compose_env(service: str) -> dict[str, str]:
    """A compose service's environment (YAML anchors and merge keys resolved by the loader)."""
    env = compose()["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


Address = tuple[str, int]


def map_hosts(env: Mapping[str, str], hosts: Mapping[Address, Address], databases: Mapping[str, str]) -> dict[str, str]:
    """``env`` pointed at this machine: every ``host:port`` of a URL, DSN or broker list that ``hosts`` maps
    is replaced (and a DSN's database by ``databases``), ``<SVC>_HOST=0.0.0.0`` becomes 127.0.0.1. Nothing
    else changes; a host:port the mapping does not know fails the test (it would be left pointing nowhere)."""
    out = {}
    for name, value in env.items():
        if name.endswith("_HOST") and value == "0.0.0.0":
            out[name] = "127.0.0.1"
        elif "://" in value:
            parts = urlsplit(value)
            key = (parts.hostname or "", parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0))
            assert key in hosts, f"{name}: no local stand-in for {key[0]}:{key[1]}"
            host, port = hosts[key]
            auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
            path = parts.path
            if parts.scheme.startswith("postgres"):
                path = "/" + databases[path.lstrip("/")]
            out[name] = urlunsplit((parts.scheme, f"{auth}{host}:{port}", path, parts.query, parts.fragment))
        elif name == "KAFKA_BOOTSTRAP_SERVERS":
            mapped = []
            for server in value.split(","):
                host, _, port = server.strip().rpartition(":")
                assert (host, int(port)) in hosts, f"{name}: no local stand-in for {server}"
                h, p = hosts[(host, int(port))]
                mapped.append(f"{h}:{p}")
            out[name] = ",".join(mapped)
        else:
            out[name] = value
    return out
