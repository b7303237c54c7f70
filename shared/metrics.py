"""Prometheus metrics shared by the services: consumer throughput, DLQ, lag, batch time."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["BATCH_SECONDS", "CONSUMER_LAG", "MESSAGES_CONSUMED", "MESSAGES_DEAD_LETTERED", "MESSAGES_PUBLISHED"]

MESSAGES_CONSUMED = Counter(
    "billing_messages_consumed_total", "Messages consumed and processed", ["topic", "group"]
)
MESSAGES_DEAD_LETTERED = Counter(
    "billing_messages_dead_lettered_total", "Messages sent to the DLQ", ["topic", "group"]
)
MESSAGES_PUBLISHED = Counter("billing_messages_published_total", "Messages published", ["topic"])
CONSUMER_LAG = Gauge(
    "billing_consumer_lag", "High-water mark minus position, per partition", ["topic", "group", "partition"]
)
BATCH_SECONDS = Histogram(
    "billing_batch_seconds",
    "Time to process one consumed batch (handler, publish, commit)",
    ["topic", "group"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
