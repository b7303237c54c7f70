"""Topic names: the public contract between the services and every internal subscriber.

Run ``python -m shared.topics`` to create them (12 partitions each, plus ``<topic>.dlq``) on the broker
named by ``KAFKA_BOOTSTRAP_SERVERS``; ``deploy/local/kafka.sh start`` does so.
"""

from __future__ import annotations

import asyncio
import os

__all__ = [
    "READINGS",
    "READINGS_V1",
    "CHARGES",
    "TRANSACTIONS",
    "ALERTS",
    "ALL_TOPICS",
    "PARTITIONS",
    "dlq",
    "ensure_topics",
    "delete_topics",
]

READINGS = "usage.readings.v2"  # batches (shared.contracts.MeasurementsTaken)
READINGS_V1 = "usage.readings.v1"  # one measurement per message: still accepted by the pricer
CHARGES = "usage.charges.v2"  # batches (shared.contracts.ChargesComputed); usage.charges.v1 is retired
TRANSACTIONS = "ledger.transactions.v1"
ALERTS = "ledger.alerts.v1"
PARTITIONS = 12


def dlq(topic: str) -> str:
    """The dead-letter companion of ``topic``."""
    return f"{topic}.dlq"


ALL_TOPICS: tuple[str, ...] = tuple(
    t for base in (READINGS, READINGS_V1, CHARGES, TRANSACTIONS, ALERTS) for t in (base, dlq(base))
)


async def ensure_topics(
    bootstrap_servers: str, topics: tuple[str, ...] = ALL_TOPICS, partitions: int = PARTITIONS, prefix: str = ""
) -> list[str]:
    """Create the topics (each with ``prefix`` before its name) that do not exist yet; returns the
    names it created."""
    topics = tuple(prefix + t for t in topics)
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(name=t, num_partitions=partitions, replication_factor=1) for t in missing]
            )
        return missing
    finally:
        await admin.close()


async def delete_topics(bootstrap_servers: str, prefix: str = "", names: tuple[str, ...] = ()) -> None:
    """Delete the topics whose names start with ``prefix`` (never all: a prefix is required), or ``names``."""
    from aiokafka.admin import AIOKafkaAdminClient

    if not prefix and not names:
        raise ValueError("name a prefix or the topics to delete")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if (prefix and t.startswith(prefix)) or t in names]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


def main() -> None:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    created = asyncio.run(ensure_topics(servers, prefix=os.environ.get("KAFKA_TOPIC_PREFIX", "")))
    print(f"topics: {len(ALL_TOPICS)} present, created now: {', '.join(created) or 'none'}")


if __name__ == "__main__":
    main()
