"""Deterministic ids and Kafka partitioning: contracts other teams rely on."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from shared import ids
from shared.batches import shard_key
from shared.contracts import MeasurementTaken
from shared.kafka import _ShardPartitioner, model_decoder, retry_delay

HOUR = datetime(2026, 11, 1, 5, tzinfo=UTC)


def java_partition(java_murmur2: int, partitions: int) -> int:
    """What every Kafka client does with a key's murmur2 (a signed Java int): positive, modulo partitions."""
    return (java_murmur2 & 0x7FFFFFFF) % partitions


@given(st.binary(max_size=200).filter(lambda k: not k.startswith(b"shard-")), st.integers(1, 64))
def test_keys_other_than_shards_go_to_their_murmur2_partition(key: bytes, n: int) -> None:
    partitions = list(range(n))
    assert _ShardPartitioner()(key, partitions, partitions) == (aiokafka_murmur2(key) & 0x7FFFFFFF) % n


def test_murmur2_partitions_of_known_java_vectors() -> None:
    # org.apache.kafka.common.utils.Utils.murmur2 of these keys (signed Java ints), from Kafka's own tests.
    partitions = list(range(12))
    assert _ShardPartitioner()(b"21", partitions, partitions) == java_partition(-973932308, 12)
    assert _ShardPartitioner()(b"foobar", partitions, partitions) == java_partition(-790332482, 12)


@pytest.mark.parametrize("n", [1, 4, 5, 12, 24, 30])
def test_a_shard_key_goes_to_partition_shard_mod_partitions(n: int) -> None:
    partitions = list(range(n))
    got = [_ShardPartitioner()(shard_key(s), partitions, partitions) for s in range(24)]
    assert got == [s % n for s in range(24)]
    # Whatever the broker lists as available right now: a shard keeps its partition (its order).
    assert _ShardPartitioner()(shard_key(7), list(reversed(partitions)), partitions[:1]) == 7 % n


def test_keys_that_only_look_like_shards_are_hashed() -> None:
    partitions = list(range(12))
    for key in (b"shard-", b"shard-x", b"shard--1", b"shard-1a"):
        assert _ShardPartitioner()(key, partitions, partitions) == (aiokafka_murmur2(key) & 0x7FFFFFFF) % 12


def test_retry_delay_doubles_up_to_thirty_seconds() -> None:
    delays = [retry_delay(a) for a in range(1, 12)]
    assert delays[:4] == [0.4, 0.8, 1.6, 3.2]
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert max(delays) == 30.0


def test_model_decoder_words_a_refusal_with_the_contract() -> None:
    decode = model_decoder(MeasurementTaken.model_validate_json, MeasurementTaken)
    msg, refused = decode(b'{"value": -1}')
    assert msg is None and len(refused) == 1
    assert refused[0].reason.startswith("invalid MeasurementTaken: ") and refused[0].positions == ()


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
    assert ids.charge_id(m, 1) == uuid.uuid5(ids.NAMESPACE, f"charge|{m}|1")
    assert ids.reading_id(HOUR) == uuid.uuid5(ids.NAMESPACE, "reading|2026-11-01T05:00:00Z")


def test_uuid7_is_time_ordered() -> None:
    a, b = ids.uuid7(), ids.uuid7()
    assert a.version == 7 and b.version == 7
    assert a.bytes[:6] <= b.bytes[:6]
