"""Deterministic ids and Kafka partitioning: contracts other teams rely on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from shared import ids
from shared.kafka import murmur2

HOUR = datetime(2026, 11, 1, 5, tzinfo=UTC)


@given(st.binary(max_size=200))
def test_murmur2_matches_the_kafka_client_reference(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


def test_murmur2_known_java_vectors() -> None:
    # Values of org.apache.kafka.common.utils.Utils.murmur2 (signed Java ints), from Kafka's own tests.
    assert murmur2(b"21") - (1 << 32) == -973932308
    assert murmur2(b"foobar") - (1 << 32) == -790332482


@given(st.text(min_size=1, max_size=60))
def test_fast_measurement_ids_equal_uuid5(resource: str) -> None:
    assert ids.measurement_ids(HOUR, "cfapps")(resource) == ids.measurement_id(HOUR, "cfapps", resource)
    assert ids.measurement_id(HOUR, "cfapps", resource) == uuid.uuid5(
        ids.NAMESPACE, f"measurement|2026-11-01T05:00:00Z|cfapps|{resource}"
    )


def test_ids_are_the_same_for_the_same_fact_whatever_the_time_zone_it_is_given_in() -> None:
    eastern = HOUR.astimezone(timezone(timedelta(hours=-5)))
    assert ids.measurement_id(eastern, "cfservices", "x") == ids.measurement_id(HOUR, "cfservices", "x")
    assert ids.reading_id(eastern) == ids.reading_id(HOUR)
    assert ids.measurement_id(HOUR, "cfapps", "x") != ids.measurement_id(HOUR + timedelta(hours=1), "cfapps", "x")
    m = ids.measurement_id(HOUR, "cfapps", "x")
    assert ids.charge_id(m, 1) != ids.charge_id(m, 2)


def test_uuid7_is_time_ordered() -> None:
    a, b = ids.uuid7(), ids.uuid7()
    assert a.version == 7 and b.version == 7
    assert a.bytes[:6] <= b.bytes[:6]
