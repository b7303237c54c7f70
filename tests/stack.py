"""The services as subprocesses on a fresh database and topic set, for end-to-end tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.sim_server import free_port
from tests.support.processes import stop_all

ROOT = Path(__file__).resolve().parent.parent
KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
PORT_ENV = {"collector": "COLLECTOR_PORT", "pricer": "PRICER_PORT", "ledger": "LEDGER_PORT", "api": "API_PORT"}


@dataclass
class Stack:
    """``dsn(role)`` names the database of each service's role; ``prefix`` its topics."""

    dsn: Callable[[str], str]
    prefix: str
    logs: Path
    sim_args: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def admin_headers(self, subject: str = "stack-admin") -> dict[str, str]:
        """An admin's bearer token of the simulator's issuer, for the services' internal routes."""
        from simulator.oidc import mint_token

        return {"authorization": f"Bearer {mint_token(['usage.admin'], subject=subject, issuer=self.url('sim'))}"}

    def env(self) -> dict[str, str]:
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": KAFKA, "KAFKA_TOPIC_PREFIX": self.prefix,
               "COLLECTOR_SCHEDULE_ENABLED": "false", "LEDGER_AUTO_CLOSE_MONTHS": "false"}
        for svc in ("collector", "pricer", "ledger", "api"):
            env[f"{svc.upper()}_DATABASE_URL"] = self.dsn(svc)
        for svc, port in self.ports.items():
            if svc in PORT_ENV:
                env[PORT_ENV[svc]] = str(port)
        if "sim" in self.ports:
            for svc in ("collector", "pricer", "ledger", "api"):  # one issuer: every service verifies its tokens
                env[f"{svc.upper()}_OIDC_ISSUER"] = self.url("sim")
            env["SIM_OIDC_ISSUER"] = self.url("sim")
            env.setdefault("COLLECTOR_CF_API_URL", self.url("sim"))
            env.setdefault("COLLECTOR_UAA_URL", self.url("sim"))
        for svc in ("ledger", "pricer", "collector"):
            if svc in self.ports:
                env[f"API_{svc.upper()}_URL"] = self.url(svc)
        return env

    async def start(self, *names: str) -> None:
        for name in names:
            self.ports[name] = free_port()
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in names:
            args = [str(ROOT / ".venv/bin/billing"), name]
            if name == "sim":
                args += ["--port", str(self.ports[name]), "--log-level", "warning", *self.sim_args]
            with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
                self.procs[name] = subprocess.Popen(  # noqa: ASYNC220 - a quick fork; readiness is awaited below
                    args, cwd=ROOT, env=self.env(), stdout=log, stderr=log
                )
        async with httpx.AsyncClient() as c:
            for name in names:
                path = "/healthz" if name == "sim" else "/readyz"
                for _ in range(600):
                    if self.procs[name].poll() is not None:
                        raise RuntimeError(f"{name} exited; see {self.logs / (name + '.log')}")
                    try:
                        if (await c.get(self.url(name) + path)).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"{name} not ready")

    def rss_mb(self, name: str) -> float:
        try:
            for line in Path(f"/proc/{self.procs[name].pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, KeyError):
            pass
        return 0.0

    def stop(self) -> None:
        stop_all(self.procs.values(), grace=30)
