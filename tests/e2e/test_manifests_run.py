"""The four services started here with exactly the environment the deployment manifests give them (the
k8s local-cluster overlay's Deployments with its ConfigMap and Secrets; docker-compose.yml), in
BILLING_ENV=production, become ready; the api then forwards admin reads to the three others and accepts the
simulator's tokens and the collector reads the simulated Cloud Foundry with the manifests' client secret,
so the URLs, the issuer and the secret are right as well as present.

What is changed to run them on this machine, and nothing else: each host:port of the manifests (kafka:9092,
postgres:5432, the simulator, the services' own names) is mapped to the local stand-in, the DSNs' database
name to a fresh database, ``<SVC>_HOST=0.0.0.0`` to 127.0.0.1, each service gets a free port, and
``BILLING_ALLOW_LOCAL_HOSTS=true`` lets the production profile accept those 127.0.0.1 addresses (it lifts
only the loopback rule: the DSNs' passwords, the client secret and every required variable are still the
manifests'). The broker is the test's own, so the topics and consumer groups keep the manifests' names.
The database roles and passwords are the ones deploy/service-roles.sql creates for those manifests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from simulator.oidc import mint_token
from tests.conftest import dsn_with
from tests.sim_server import free_port
from tests.support.manifests import (
    SERVICES,
    compose,
    compose_env,
    container_env,
    containers,
    expand,
    map_hosts,
    render,
    the,
)
from tests.support.private_kafka import private_kafka
from tests.support.processes import stop_all

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BILLING = ROOT / ".venv" / "bin" / "billing"
ROLES_SQL = ROOT / "deploy" / "service-roles.sql"
PORTS = {"api": 8080, "collector": 8081, "pricer": 8082, "ledger": 8083}


@pytest.fixture
async def service_database(infra) -> AsyncIterator[str]:
    """A fresh database prepared by deploy/service-roles.sql (the manifests' roles and passwords)."""
    name = f"billing_manifest_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(infra.pg_admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn_with(infra.pg_admin_dsn, database=name))
    try:
        await conn.execute(ROLES_SQL.read_text())
    finally:
        await conn.close()
    try:
        yield name
    finally:
        conn = await asyncpg.connect(infra.pg_admin_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


def k8s_environment() -> tuple[dict[str, dict[str, str]], list[str], dict[str, str], dict[str, int]]:
    """(env per service, simulator args, simulator env, service name -> port) of the local-cluster overlay."""
    objects = render("overlays/local-cluster")
    envs = {}
    for svc in SERVICES:
        (container,) = containers(the(objects, "Deployment", f"billing-{svc}"))
        envs[svc] = container_env(objects, container)
    (sim,) = containers(the(objects, "Deployment", "billing-sim"))
    sim_env = container_env(objects, sim)
    names = {f"billing-{svc}": port for svc, port in PORTS.items()} | {"billing-sim": 8090}
    return envs, [expand(a, sim_env) for a in sim["args"]], sim_env, names


def compose_environment() -> tuple[dict[str, dict[str, str]], list[str], dict[str, str], dict[str, int]]:
    services = compose()["services"]
    envs = {svc: compose_env(svc) for svc in SERVICES}
    for svc in SERVICES:
        assert services[svc]["command"] == [svc]
    names = dict(PORTS) | {"sim": 8090}
    return envs, list(services["sim"]["command"]), compose_env("sim"), names


def local_args(args: list[str], port: int) -> list[str]:
    out = list(args)
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    return out


async def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 90) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        for _ in range(int(seconds * 10)):
            assert proc.poll() is None, f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                resp = await client.get(url, timeout=5)
                if resp.status_code == 200:
                    return resp
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not ready in {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("manifest", ["k8s local-cluster", "docker-compose"])
async def test_the_services_run_in_production_with_the_manifests_environment(
    manifest, infra, service_database, tmp_path
):
    envs, sim_args, sim_env, names = k8s_environment() if manifest.startswith("k8s") else compose_environment()
    for env in envs.values():
        assert env["BILLING_ENV"] == "production" and "BILLING_ALLOW_LOCAL_HOSTS" not in env
    pg = urlsplit(infra.pg_admin_dsn)
    async with private_kafka(tmp_path) as kafka:
        local = {name: free_port() for name in names}
        kafka_host, kafka_port = kafka.bootstrap.split(":")
        hosts = {(name, port): ("127.0.0.1", local[name]) for name, port in names.items()}
        hosts |= {("kafka", 9092): (kafka_host, int(kafka_port)), ("postgres", 5432): (pg.hostname, pg.port)}
        databases = {"billing": service_database}
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        sim_name = next(n for n in names if n.endswith("sim"))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            key_file = tmp_path / "oidc-key.pem"
            sim_process_env = base | map_hosts(sim_env, hosts, databases) | {"SIM_OIDC_KEY_FILE": str(key_file)}
            logs = {name: tmp_path / f"{name}.log" for name in ["sim", *SERVICES]}
            with logs["sim"].open("wb") as log:
                procs["sim"] = subprocess.Popen(
                    [str(BILLING), *local_args(sim_args, local[sim_name])],
                    cwd=tmp_path, env=sim_process_env, stdout=log, stderr=log,
                )
            issuer = sim_process_env["SIM_OIDC_ISSUER"]
            await wait_for(f"{issuer}/.well-known/openid-configuration", procs["sim"], logs["sim"])

            for svc in SERVICES:
                own = next(n for n, p in names.items() if p == PORTS[svc])
                env = base | map_hosts(envs[svc], hosts, databases)
                env |= {f"{svc.upper()}_PORT": str(local[own]), "BILLING_ALLOW_LOCAL_HOSTS": "true"}
                with logs[svc].open("wb") as log:
                    procs[svc] = subprocess.Popen([str(BILLING), svc], cwd=ROOT, env=env, stdout=log, stderr=log)
            urls = {svc: f"http://127.0.0.1:{local[next(n for n, p in names.items() if p == PORTS[svc])]}"
                    for svc in SERVICES}
            for svc in SERVICES:
                ready = await wait_for(f"{urls[svc]}/readyz", procs[svc], logs[svc])
                body = ready.json()
                assert body["status"] == "ready" and set(body["checks"].values()) == {"ok"}, (svc, body)

            token = mint_token(["usage.admin"], issuer=issuer, key_file=key_file)
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
                for path in ("/admin/customers", "/admin/prices", "/admin/readings"):
                    answer = await client.get(urls["api"] + path, timeout=30)
                    assert answer.status_code == 200, (path, answer.text)
                # A reading of this hour (the collector's schedule may have taken it already): Cloud Foundry and
                # UAA answered the collector with the manifests' URLs and client secret.
                reading = await client.post(urls["api"] + "/admin/readings", json={}, timeout=60)
                assert reading.status_code in (200, 201), reading.text  # 200: the schedule had taken it
                assert reading.json()["errors"] == [] and reading.json()["measurements"] > 0, reading.text
        finally:
            stop_all(procs.values(), grace=45)
