"""Each service as its own process, as `make up` runs it: ready when its database and Kafka answer,
Prometheus metrics, JSON logs, and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import orjson
import pytest

from tests.sim_server import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BILLING = ROOT / ".venv" / "bin" / "billing"


async def wait_ready(url: str, proc: asyncio.subprocess.Process, seconds: float = 60) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        for _ in range(int(seconds * 10)):
            if proc.returncode is not None:
                raise AssertionError(f"the service exited with {proc.returncode}")
            try:
                resp = await client.get(f"{url}/readyz")
                if resp.status_code == 200:
                    return resp
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} was not ready in {seconds} s")


@pytest.mark.parametrize("service", ["collector", "pricer", "ledger", "api"])
async def test_a_service_becomes_ready_serves_ops_routes_and_exits_cleanly_on_sigterm(
    service, infra, database, topic_prefix, tmp_path
):
    port = free_port()
    up = service.upper()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka,
        "KAFKA_TOPIC_PREFIX": topic_prefix,
        f"{up}_DATABASE_URL": database.dsn(service),
        f"{up}_PORT": str(port),
        "COLLECTOR_SCHEDULE_ENABLED": "false",
    }
    log_path = tmp_path / f"{service}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(str(BILLING), service, env=env, stdout=log, stderr=log, cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}"
            ready = await wait_ready(url, proc)
            checks = ready.json()["checks"]
            assert checks["database"] == "ok" and checks["kafka"] == "ok"
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{url}/healthz")).json() == {"status": "ok"}
                metrics = await client.get(f"{url}/metrics")
                assert metrics.status_code == 200 and "billing_messages_published_total" in metrics.text
                missing = await client.get(f"{url}/no-such-route")
                assert missing.status_code == 404
                assert missing.headers["content-type"] == "application/problem+json"
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), timeout=45)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    # uvicorn re-raises SIGTERM once it has shut down gracefully, as process managers expect.
    assert code in (0, -signal.SIGTERM)
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line.startswith(b"{")]
    assert lines, log_path.read_text()
    assert all({"time", "level", "service", "message"} <= set(line) for line in lines)
    messages = [line["message"] for line in lines]
    assert "service started" in messages and "service stopped" in messages
    assert messages.index("service stopped") > messages.index("service started")
    # The DSN's password never reaches the log.
    assert f"{service}:{service}@" not in log_path.read_text()
