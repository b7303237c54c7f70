"""The main job, end to end: the small demo scenario through every service as its own process, checked
against the seed's oracle to the microcredit (``make demo`` runs the full-size one)."""

from __future__ import annotations

import pytest

from cli.demo import run_demo
from cli.scenario import SMALL
from tests.stack import Stack

pytestmark = pytest.mark.e2e


async def test_the_small_demo_month_matches_the_seed_to_the_microcredit(
    infra, database, topic_prefix, tmp_path, monkeypatch
):
    stack = Stack(database.dsn, topic_prefix, tmp_path / "logs", sim_args=SMALL.sim_args())
    try:
        await stack.start("sim", "collector", "pricer", "ledger", "api")
        # The demo's own backfill runs in this process, as `billing demo` does.
        for key, value in stack.env().items():
            if key.startswith(("COLLECTOR_", "KAFKA_", "SIM_")):
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("COLLECTOR_CF_API_URL", stack.url("sim"))
        monkeypatch.setenv("COLLECTOR_UAA_URL", stack.url("sim"))
        ok = await run_demo(
            "small", api_url=stack.url("api"), sim_url=stack.url("sim"), kafka=infra.kafka, topic_prefix=topic_prefix
        )
    finally:
        stack.stop()
    assert ok, f"the ledger does not match the oracle; service logs in {tmp_path / 'logs'}"
