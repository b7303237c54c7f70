"""``billing topics`` on the real broker: it creates every topic of the table with its settings, sets the
retention of a topic that has the wrong one (keeping the topic's other overrides), reports a topic whose
partitions it cannot change and exits non-zero, and ``--check`` reports without changing anything."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.api.completeness import MAX_HOURS
from services.ledger.settings import LedgerSettings
from shared.settings import SettingsError, read_settings
from shared.topics import (
    ASSIGNMENTS,
    CHARGES,
    DAY_MS,
    READINGS,
    READINGS_V1,
    TOPICS,
    TopicSettings,
    configured,
    delete_topics,
    dlq,
    inspect_topics,
    run_with,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def prefix(infra) -> AsyncIterator[str]:
    name = f"tt{uuid.uuid4().hex[:8]}."
    yield name
    await delete_topics(infra.kafka, prefix=name)


def settings_for(infra, prefix: str) -> TopicSettings:
    return TopicSettings(kafka_bootstrap_servers=infra.kafka, topic_prefix=prefix)


async def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (resp,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        return {e["config_names"]: e["config_value"] for e in resp.to_object()["resources"][0]["config_entries"]}
    finally:
        await admin.close()


async def create_raw(bootstrap: str, topic: str, partitions: int, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=configs)])
        for _ in range(100):  # until the broker's metadata shows it, as `billing topics` will read it
            if topic in await admin.list_topics():
                break
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


def test_the_table_holds_the_v2_topics_and_every_dlq_outlives_the_completeness_report():
    assert {READINGS, READINGS_V1, CHARGES} <= set(TOPICS)
    # A month is reported after it closes: the report's longest range plus the ledger's close delay.
    look_back_ms = MAX_HOURS * 3600 * 1000 + LedgerSettings().month_close_delay_hours * 3600 * 1000
    wanted = configured(TopicSettings())
    for name in TOPICS:
        assert wanted[dlq(name)]["retention.ms"] > look_back_ms
        if wanted[name]["retention.ms"] != -1:  # -1: kept forever (the assignments)
            assert wanted[dlq(name)]["retention.ms"] >= wanted[name]["retention.ms"]
    assert all(w["retention.ms"] >= 7 * DAY_MS or w["retention.ms"] == -1 for w in wanted.values())
    # Every org assignment stays readable: a new pricer learns them all from the beginning of the topic.
    assert wanted[ASSIGNMENTS]["retention.ms"] == -1


def test_production_needs_the_clusters_replication_and_keeps_min_insync_within_it():
    with pytest.raises(SettingsError) as exc:
        read_settings(TopicSettings, billing_env="production", kafka_bootstrap_servers="kafka-0.kafka:9092")
    assert "KAFKA_TOPIC_REPLICATION_FACTOR is not set" in str(exc.value)
    assert "KAFKA_TOPIC_MIN_INSYNC_REPLICAS is not set" in str(exc.value)
    with pytest.raises(SettingsError, match="KAFKA_TOPIC_MIN_INSYNC_REPLICAS is larger"):
        read_settings(TopicSettings, replication_factor=1, min_insync_replicas=2)
    s = read_settings(
        TopicSettings,
        billing_env="production",
        kafka_bootstrap_servers="kafka-0.kafka:9092",
        replication_factor=3,
        min_insync_replicas=2,
    )
    assert {w["replication.factor"] for w in configured(s).values()} == {3}
    assert {w["min.insync.replicas"] for w in configured(s).values()} == {2}


async def test_apply_creates_every_topic_as_configured_and_check_then_passes(infra, prefix):
    s = settings_for(infra, prefix)
    out = io.StringIO()
    assert await run_with(True, s, out) == 1  # nothing exists yet
    assert out.getvalue().count(": missing,") == len(configured(s))

    assert await run_with(False, s, io.StringIO()) == 0
    states = await inspect_topics(s)
    assert [st.status for st in states] == ["ok"] * len(configured(s))
    for st in states:
        assert st.actual is not None
        assert {k: st.actual[k] for k in st.wanted} == st.wanted
    out = io.StringIO()
    assert await run_with(True, s, out) == 0
    assert f"{len(states)} as configured, 0 not" in out.getvalue()


async def test_a_wrong_retention_is_reported_then_set_keeping_the_topics_other_overrides(infra, prefix):
    s = settings_for(infra, prefix)
    topic = prefix + dlq(CHARGES)
    await create_raw(infra.kafka, topic, 12, {"retention.ms": str(DAY_MS), "segment.ms": "3600000"})

    out = io.StringIO()
    assert await run_with(True, s, out) == 1
    line = next(x for x in out.getvalue().splitlines() if x.startswith(topic + ":"))
    assert "differs" in line and f"retention.ms={DAY_MS} (configured {configured(s)[topic]['retention.ms']})" in line
    assert (await topic_config(infra.kafka, topic))["retention.ms"] == str(DAY_MS)  # --check changed nothing

    assert await run_with(False, s, io.StringIO()) == 0
    config = await topic_config(infra.kafka, topic)
    assert config["retention.ms"] == str(configured(s)[topic]["retention.ms"])
    assert config["segment.ms"] == "3600000"
    assert await run_with(True, s, io.StringIO()) == 0


async def test_a_topic_with_other_partitions_is_reported_and_left_alone(infra, prefix):
    s = settings_for(infra, prefix)
    topic = prefix + READINGS
    await create_raw(infra.kafka, topic, 3, {})

    out = io.StringIO()
    assert await run_with(False, s, out) == 1
    assert f"{topic}: cannot be changed in place: partitions is 3, configured 12" in out.getvalue()
    (state,) = [st for st in await inspect_topics(s) if st.name == topic]
    assert state.actual is not None and state.actual["partitions"] == 3
    assert state.differences == {"partitions": (3, 12)}
    # The rest was created all the same.
    assert all(st.status == "ok" for st in await inspect_topics(s) if st.name != topic)


async def test_the_module_entry_point_that_kafka_sh_runs_applies_and_checks(infra, prefix):
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "KAFKA_TOPIC_PREFIX": prefix}
    check = [sys.executable, "-m", "shared.topics", "--check"]
    first = subprocess.run(check, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 1, first.stderr
    applied = subprocess.run([sys.executable, "-m", "shared.topics"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr
    assert f"created {len(configured(settings_for(infra, prefix)))}" in applied.stdout
    again = subprocess.run(check, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    bad = subprocess.run(check, cwd=ROOT, env={**env, "BILLING_ENV": "production"}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "KAFKA_TOPIC_REPLICATION_FACTOR is not set" in bad.stderr
