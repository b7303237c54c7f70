"""A Kafka broker of a test's own, started and killed by the test: for what cannot be done to the shared
one (stopping it while services run, or running services on the unprefixed topic and group names that the
deployment manifests give them). The same scripts as the local stack (deploy/local/kafka.sh) in a
temporary BILLING_LOCAL_DIR, on free ports, with the checkout's Kafka jars (``make install`` fetches them)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sim_server import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class PrivateKafka:
    bootstrap: str
    pid: int

    def kill(self) -> None:
        """SIGKILL the broker (only this test's own process)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return False
        return state != "Z"


def kafka_libs() -> Path:
    local = Path(os.environ.get("BILLING_LOCAL_DIR", ROOT / ".local"))
    return local / "kafka" / "libs"


@contextlib.asynccontextmanager
async def private_kafka(workdir: Path) -> AsyncIterator[PrivateKafka]:
    """A one-node KRaft broker with every topic of shared.topics (unprefixed), killed on exit."""
    libs = kafka_libs()
    if not any(libs.glob("kafka_2.13-*.jar")):
        pytest.fail(f"no Kafka jars in {libs}: run `make install` (deploy/local/kafka.sh install)", pytrace=False)
    local = workdir / "private-kafka"
    (local / "kafka").mkdir(parents=True)
    (local / "kafka" / "libs").symlink_to(libs.resolve())
    port = free_port()
    env = {
        **os.environ,
        "BILLING_LOCAL_DIR": str(local),
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_HEAP": "-Xms256m -Xmx512m",
        "KAFKA_TOPIC_PREFIX": "",
        "BILLING_ENV": "local",
    }
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "deploy" / "local" / "kafka.sh"), "start", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    pid_file = local / "kafka" / "kafka.pid"
    broker = PrivateKafka(f"127.0.0.1:{port}", int(pid_file.read_text()) if pid_file.exists() else -1)
    try:
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        yield broker
    finally:
        if broker.pid > 0:
            broker.kill()
            for _ in range(100):
                if not broker.alive():
                    break
                await asyncio.sleep(0.1)
