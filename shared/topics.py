"""Topic names and how each topic is sized: the public contract between the services and every internal
subscriber, and the one place that says how a broker must hold them.

``TOPICS`` is a table keyed by topic name: partitions and retention per topic (a new topic is one line).
The replication factor and ``min.insync.replicas`` are the cluster's shape, not a topic's: they come from
``TopicSettings`` (``KAFKA_TOPIC_REPLICATION_FACTOR``, ``KAFKA_TOPIC_MIN_INSYNC_REPLICAS``; 1 and 1 on
the local single node, required in production, 3 and 2 in the Kubernetes manifests). Every topic has a
``<topic>.dlq`` companion, kept longer than the completeness report looks back.

``billing topics`` (or ``python -m shared.topics``, which ``deploy/local/kafka.sh start`` runs) creates
what is missing and sets the retention, ``min.insync.replicas`` and message size of what exists; it
cannot change an existing topic's partitions (that would move keys to other partitions and break their
order) or replication factor (a reassignment), so it reports those and exits non-zero. ``billing topics
--check`` changes nothing and reports every topic's actual settings against these.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import Kind, ProfileSettings, kafka_servers_field, load_settings, topic_prefix_field

__all__ = [
    "ALERTS",
    "ALL_TOPICS",
    "ASSIGNMENTS",
    "CHARGES",
    "CHARGES_V2",
    "DAY_MS",
    "DLQ_RETENTION_MS",
    "MAX_MESSAGE_BYTES",
    "PARTITIONS",
    "READINGS",
    "READINGS_V1",
    "TOPICS",
    "TRANSACTIONS",
    "TopicSettings",
    "TopicSpec",
    "TopicState",
    "TopicsError",
    "apply_topics",
    "configured",
    "delete_topics",
    "dlq",
    "ensure_topics",
    "inspect_topics",
    "main",
    "report",
    "run",
    "run_with",
]

READINGS = "usage.readings.v2"  # batches (shared.contracts.MeasurementsTaken)
READINGS_V1 = "usage.readings.v1"  # one measurement per message: still accepted by the pricer
CHARGES = "usage.charges.v3"  # batches (shared.contracts.ChargesComputed): flat, graduated and volume prices
# The previous version (flat prices only; usage.charges.v1 is retired): no longer published, still created and
# read by the ledger and the api so that what it retains is drained (docs/price-models.md, section 3).
CHARGES_V2 = "usage.charges.v2"
TRANSACTIONS = "ledger.transactions.v1"
ALERTS = "ledger.alerts.v1"
ASSIGNMENTS = "ledger.assignments.v1"  # org assignments (shared.contracts.OrgAssigned), kept forever
PARTITIONS = 12

DAY_MS = 24 * 3600 * 1000
# The completeness report covers up to 31 days per request and reads the DLQs from their beginning; a
# month is reported once it has closed (LEDGER_MONTH_CLOSE_DELAY_HOURS, 4 days by default) and may be
# looked at again in the following weeks. 90 days keeps every dead letter of the last month and the one
# before readable by it, with room to investigate.
DLQ_RETENTION_MS = 90 * DAY_MS
# The producer sends record batches of up to 4 MiB (shared.kafka.Publisher, max_request_size) and the
# local broker accepts them (message.max.bytes); a cluster's default is about 1 MB, so each topic says so.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    """How one topic is held: its partitions and how long its messages are kept (its DLQ's too)."""

    partitions: int
    retention_ms: int
    dlq_retention_ms: int = DLQ_RETENTION_MS
    dlq_partitions: int = PARTITIONS


# One line per topic. Retention: the input topics keep 30 days, enough for a consumer to catch up after an
# outage across a month close (the collector keeps every reading in its own schema anyway); the ledger's
# transactions keep 90 days, the api's read model being rebuilt from them after a loss of its schema.
TOPICS: Mapping[str, TopicSpec] = {
    READINGS: TopicSpec(partitions=PARTITIONS, retention_ms=30 * DAY_MS),
    READINGS_V1: TopicSpec(partitions=PARTITIONS, retention_ms=30 * DAY_MS),
    CHARGES: TopicSpec(partitions=PARTITIONS, retention_ms=30 * DAY_MS),
    CHARGES_V2: TopicSpec(partitions=PARTITIONS, retention_ms=30 * DAY_MS),
    TRANSACTIONS: TopicSpec(partitions=PARTITIONS, retention_ms=90 * DAY_MS),
    ALERTS: TopicSpec(partitions=PARTITIONS, retention_ms=30 * DAY_MS),
    # Every assignment stays readable (retention -1: never deleted): a new pricer learns all of them from the
    # beginning. They are few (one per org and change of customer).
    ASSIGNMENTS: TopicSpec(partitions=PARTITIONS, retention_ms=-1),
}


def dlq(topic: str) -> str:
    """The dead-letter companion of ``topic``."""
    return f"{topic}.dlq"


ALL_TOPICS: tuple[str, ...] = tuple(t for base in TOPICS for t in (base, dlq(base)))


class TopicSettings(ProfileSettings):
    """What ``billing topics`` needs: the broker, the prefix, and the cluster's replication."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    PRODUCTION_REQUIRED: ClassVar[Mapping[str, Kind]] = {
        "kafka_bootstrap_servers": "servers",
        "replication_factor": "value",
        "min_insync_replicas": "value",
    }

    kafka_bootstrap_servers: str = kafka_servers_field()
    topic_prefix: str = topic_prefix_field()
    replication_factor: int = Field(
        default=1,
        ge=1,
        le=16,
        validation_alias=AliasChoices("KAFKA_TOPIC_REPLICATION_FACTOR"),
        description="Replicas of each topic `billing topics` creates (a single local node: 1; a cluster: 3).",
    )
    min_insync_replicas: int = Field(
        default=1,
        ge=1,
        le=16,
        validation_alias=AliasChoices("KAFKA_TOPIC_MIN_INSYNC_REPLICAS"),
        description="`min.insync.replicas` of each topic: an acks=all write needs this many copies (a cluster: 2).",
    )

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> TopicSettings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                "KAFKA_TOPIC_MIN_INSYNC_REPLICAS is larger than KAFKA_TOPIC_REPLICATION_FACTOR: no write could succeed"
            )
        return self


def configured(settings: TopicSettings) -> dict[str, dict[str, Any]]:
    """Every topic (with the prefix) and the settings it must have on the broker."""
    out: dict[str, dict[str, Any]] = {}
    for base, spec in TOPICS.items():
        for name, partitions, retention in (
            (base, spec.partitions, spec.retention_ms),
            (dlq(base), spec.dlq_partitions, spec.dlq_retention_ms),
        ):
            out[settings.topic_prefix + name] = {
                "partitions": partitions,
                "replication.factor": settings.replication_factor,
                "min.insync.replicas": settings.min_insync_replicas,
                "retention.ms": retention,
                "max.message.bytes": MAX_MESSAGE_BYTES,
            }
    return out


ALTERABLE = ("min.insync.replicas", "retention.ms", "max.message.bytes")


@dataclass(frozen=True)
class TopicState:
    """One topic as the broker holds it against what it must be."""

    name: str
    wanted: Mapping[str, Any]
    actual: Mapping[str, Any] | None  # None: the topic does not exist

    @property
    def differences(self) -> dict[str, tuple[Any, Any]]:
        """Setting -> (actual, wanted) for every setting that differs."""
        if self.actual is None:
            return {}
        return {k: (self.actual.get(k), v) for k, v in self.wanted.items() if self.actual.get(k) != v}

    @property
    def status(self) -> Literal["ok", "missing", "differs"]:
        if self.actual is None:
            return "missing"
        return "differs" if self.differences else "ok"

    @property
    def fixable(self) -> bool:
        """Whether ``apply_topics`` can make it right (a retention, not partitions or replicas)."""
        return all(k in ALTERABLE for k in self.differences)


class TopicsError(Exception):
    """The broker refused to create or change a topic."""


def _raise_errors(results: Iterable[Mapping[str, Any]], name_key: str, doing: str) -> None:
    """Raise ``TopicsError`` naming every refused topic (aiokafka returns the errors, it never raises)."""
    refused = [f"{r[name_key]}: {r.get('error_message') or r['error_code']}" for r in results if r["error_code"]]
    if refused:
        raise TopicsError(f"the broker refused {doing} " + "; ".join(refused))


def _admin(bootstrap_servers: str) -> Any:
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)


async def _describe(admin: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The actual settings of those of ``names`` that exist."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    existing = set(await admin.list_topics())
    present = [n for n in names if n in existing]
    if not present:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for topic in await admin.describe_topics(present):
        parts = topic["partitions"]
        out[topic["topic"]] = {
            "partitions": len(parts),
            "replication.factor": min((len(p["replicas"]) for p in parts), default=0),
        }
    resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in present]
    for response in await admin.describe_configs(resources):
        for res in response.to_object()["resources"]:
            entries = {e["config_names"]: e for e in res["config_entries"]}
            actual = out[res["resource_name"]]
            for key in ALTERABLE:
                value = entries.get(key, {}).get("config_value")
                actual[key] = int(value) if value is not None and value.lstrip("-").isdigit() else value
            # The overrides already set on the topic: altering its configs replaces the whole set, so the
            # ones this module does not manage are sent back unchanged (config_source 1 = a topic's own).
            actual["_overrides"] = {
                k: e["config_value"] for k, e in entries.items() if e.get("config_source") == 1 and k not in ALTERABLE
            }
    return out


async def _settle(admin: Any, wanted: Mapping[str, Mapping[str, Any]], seconds: float = 15.0) -> None:
    """Wait until the broker's metadata shows what was just created or set (it does so a moment later), so
    that a ``--check`` right after ``billing topics`` sees it; what cannot be fixed is not waited for."""
    for _ in range(int(seconds / 0.2)):
        actual = await _describe(admin, list(wanted))
        states = [TopicState(name, want, actual.get(name)) for name, want in wanted.items()]
        if all(st.status == "ok" or (st.status == "differs" and not st.fixable) for st in states):
            return
        await asyncio.sleep(0.2)


async def inspect_topics(settings: TopicSettings) -> list[TopicState]:
    """Every configured topic as the broker holds it; changes nothing."""
    wanted = configured(settings)
    admin = _admin(settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        actual = await _describe(admin, list(wanted))
    finally:
        await admin.close()
    return [TopicState(name, want, actual.get(name)) for name, want in wanted.items()]


async def apply_topics(settings: TopicSettings) -> list[TopicState]:
    """Create the missing topics and set the retention, min.insync.replicas and message size of the
    existing ones; returns the states found before (what was missing or different, and so changed)."""
    from aiokafka.admin import NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    wanted = configured(settings)
    admin = _admin(settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        actual = await _describe(admin, list(wanted))
        states = [TopicState(name, want, actual.get(name)) for name, want in wanted.items()]
        missing = [s for s in states if s.status == "missing"]
        if missing:
            created = await admin.create_topics(
                [
                    NewTopic(
                        name=s.name,
                        num_partitions=s.wanted["partitions"],
                        replication_factor=s.wanted["replication.factor"],
                        topic_configs={k: str(s.wanted[k]) for k in ALTERABLE},
                    )
                    for s in missing
                ]
            )
            _raise_errors(created.to_object()["topic_errors"], "topic", "creating")
        changes = [s for s in states if s.status == "differs" and any(k in ALTERABLE for k in s.differences)]
        if changes:
            altered = await admin.alter_configs(
                [
                    ConfigResource(
                        ConfigResourceType.TOPIC,
                        s.name,
                        configs={**(s.actual or {}).get("_overrides", {}), **{k: str(s.wanted[k]) for k in ALTERABLE}},
                    )
                    for s in changes
                ]
            )
            for response in altered:
                _raise_errors(response.to_object()["resources"], "resource_name", "setting the configs of")
        if missing or changes:
            await _settle(admin, wanted)
        return states
    finally:
        await admin.close()


async def ensure_topics(
    bootstrap_servers: str, topics: tuple[str, ...] = ALL_TOPICS, partitions: int | None = None, prefix: str = ""
) -> list[str]:
    """Create the topics (each with ``prefix`` before its name) that do not exist yet, with one replica,
    the table's retention and ``partitions`` (default: the table's, else ``PARTITIONS``); returns the names
    it created. The quick path for tests and benchmarks on the local node; ``apply_topics`` is the full one."""
    from aiokafka.admin import NewTopic

    specs = {name: (spec.partitions, spec.retention_ms) for name, spec in TOPICS.items()}
    specs |= {dlq(name): (spec.dlq_partitions, spec.dlq_retention_ms) for name, spec in TOPICS.items()}
    admin = _admin(bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if prefix + t not in existing]
        if missing:
            new = []
            for t in missing:
                count, retention = specs.get(t, (PARTITIONS, None))
                configs = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
                if retention is not None:
                    configs["retention.ms"] = str(retention)
                new.append(NewTopic(name=prefix + t, num_partitions=partitions or count, replication_factor=1,
                                    topic_configs=configs))
            await admin.create_topics(new)
        return [prefix + t for t in missing]
    finally:
        await admin.close()


async def delete_topics(bootstrap_servers: str, prefix: str = "", names: tuple[str, ...] = ()) -> None:
    """Delete the topics whose names start with ``prefix`` (never all: a prefix is required), or ``names``."""
    if not prefix and not names:
        raise ValueError("name a prefix or the topics to delete")
    admin = _admin(bootstrap_servers)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if (prefix and t.startswith(prefix)) or t in names]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


SHOWN = ("partitions", "replication.factor", "min.insync.replicas", "retention.ms", "max.message.bytes")


def report(states: Iterable[TopicState]) -> list[str]:
    """One line per topic: each setting as actual (and the configured value where it differs)."""
    lines = []
    for s in states:
        if s.actual is None:
            cells = ["missing"] + [f"{k}=-/{s.wanted[k]}" for k in SHOWN]
        else:
            diff = s.differences
            cells = [s.status] + [
                f"{k}={s.actual.get(k)}" + (f" (configured {s.wanted[k]})" if k in diff else "") for k in SHOWN
            ]
        lines.append(f"{s.name}: " + ", ".join(cells))
    return lines


def run(check: bool) -> int:
    """``billing topics [--check]`` on the settings of the environment: the exit status (0: all as
    configured; 1: a difference remains; 2: bad settings)."""
    return asyncio.run(run_with(check, load_settings(TopicSettings, "topics"), sys.stdout))


async def run_with(check: bool, s: TopicSettings, out: Any) -> int:
    """``run`` on given settings, writing its report to ``out``."""
    where = (
        f"{s.kafka_bootstrap_servers} (replication {s.replication_factor}, "
        f"min.insync.replicas {s.min_insync_replicas})"
    )
    if check:
        states = await inspect_topics(s)
        for line in report(states):
            print(line, file=out)
        bad = [st for st in states if st.status != "ok"]
        print(f"topics on {where}: {len(states) - len(bad)} as configured, {len(bad)} not", file=out)
        return 1 if bad else 0
    before = await apply_topics(s)
    created = [st.name for st in before if st.status == "missing"]
    altered = [st.name for st in before if st.status == "differs" and any(k in ALTERABLE for k in st.differences)]
    stuck = [st for st in before if not st.fixable]
    for st in stuck:
        wrong = ", ".join(f"{k} is {a}, configured {w}" for k, (a, w) in st.differences.items() if k not in ALTERABLE)
        print(f"{st.name}: cannot be changed in place: {wrong}", file=out)
    print(
        f"topics on {where}: {len(before)} configured; created {len(created)}, settings updated on {len(altered)}, "
        f"{len(stuck)} left different (partitions or replicas)",
        file=out,
    )
    return 1 if stuck else 0


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m shared.topics [--check]``: what ``deploy/local/kafka.sh`` runs."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = run(check="--check" in args)
    except TopicsError as exc:
        print(f"billing topics: {exc}", file=sys.stderr)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
