"""With Kafka gone, the api stays ready (it answers reads from its read model, and says how fresh that is)
while a consumer service that needs the broker leaves the load balancer. The broker is the test's own,
killed mid-test; the shared one is never touched."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from shared.kafka import Outgoing, Publisher, encode
from shared.topics import TRANSACTIONS
from tests.sim_server import free_port
from tests.support.api_factories import txn
from tests.support.private_kafka import private_kafka
from tests.support.processes import stop_all
from tests.support.tokens import LocalIssuer, serve_issuer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BILLING = ROOT / ".venv" / "bin" / "billing"


async def readyz(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.get(f"{url}/readyz", timeout=10)


async def until(predicate, seconds: float = 60.0) -> None:
    for _ in range(int(seconds * 10)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


async def test_the_api_stays_ready_without_kafka_and_says_how_fresh_its_read_model_is(database, tmp_path):
    issuer = LocalIssuer()
    async with private_kafka(tmp_path) as kafka, serve_issuer(issuer):
        ports = {"api": free_port(), "ledger": free_port()}
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "KAFKA_TOPIC_PREFIX": "",
            "API_DATABASE_URL": database.dsn("api"),
            "LEDGER_DATABASE_URL": database.dsn("ledger"),
            "API_PORT": str(ports["api"]),
            "LEDGER_PORT": str(ports["ledger"]),
            "API_OIDC_ISSUER": issuer.url,
            "API_QUERY_CACHE_SECONDS": "0",
            "LEDGER_AUTO_CLOSE_MONTHS": "false",
        }
        procs = {}
        for name in ports:
            with (tmp_path / f"{name}.log").open("wb") as log:  # the child keeps its own descriptor
                procs[name] = subprocess.Popen([str(BILLING), name], cwd=ROOT, env=env, stdout=log, stderr=log)
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        try:
            async with httpx.AsyncClient() as client:

                async def all_ready() -> bool:
                    for name in ports:
                        assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]
                        try:
                            if (await readyz(client, url[name])).status_code != 200:
                                return False
                        except httpx.TransportError:
                            return False
                    return True

                await until(all_ready)
                body = (await readyz(client, url["api"])).json()
                assert body["checks"]["kafka"] == "ok" and body["read_model"]["last_batch_at"] is None

                # One transaction through the broker: the api's read model applies a batch.
                customer = uuid.uuid4()
                publisher = Publisher(kafka.bootstrap, client_id="test")
                await publisher.start()
                try:
                    message = txn(customer, "funding", 5_000_000, occurred_at=datetime.now(UTC))
                    await publisher.publish(TRANSACTIONS, [Outgoing(str(customer).encode(), encode(message))])
                finally:
                    await publisher.stop()

                async def applied() -> bool:
                    return (await readyz(client, url["api"])).json()["read_model"]["last_batch_at"] is not None

                await until(applied)

                kafka.kill()

                async def ledger_out() -> bool:
                    return (await readyz(client, url["ledger"])).status_code == 503

                await until(ledger_out, 30)
                ledger_body = (await readyz(client, url["ledger"])).json()
                assert ledger_body["checks"]["kafka"].startswith("failed")
                assert ledger_body["checks"]["database"] == "ok"

                answer = await readyz(client, url["api"])
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["status"] == "ready"
                assert body["checks"]["kafka"].startswith("failed") and body["checks"]["database"] == "ok"
                assert body["not_required"] == ["kafka"]
                assert body["read_model"]["consumers"]["transactions"]["age_seconds"] >= 0

                token = issuer.token(scopes=("usage.read",), customers=(str(customer),))
                balance = await client.get(
                    f"{url['api']}/v1/customers/{customer}/balance", headers={"Authorization": f"Bearer {token}"}
                )
                assert balance.status_code == 200, balance.text
                assert int(balance.headers["Read-Model-Age"]) >= 0
                assert balance.json()["funded"] == 5_000_000

                # And it stays so: its consumers keep retrying the broker, the process keeps answering.
                for _ in range(10):
                    await asyncio.sleep(0.5)
                    assert (await readyz(client, url["api"])).status_code == 200
                assert procs["api"].poll() is None
        finally:
            stop_all(procs.values(), grace=45)
