"""How the ledger deals a consumed batch out to its posting lanes (services/ledger/handlers.py): every
message of a partition in one lane, in the order consumed, nothing lost or repeated."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.ledger.handlers import lanes_of
from shared.kafka import Received


@given(
    partitions=st.lists(st.integers(min_value=0, max_value=23), min_size=1, max_size=200),
    lanes=st.integers(min_value=1, max_value=8),
)
def test_a_partition_stays_in_one_lane_in_its_order(partitions: list[int], lanes: int) -> None:
    batch: list[Received[Any]] = [Received(None, None, p, offset) for offset, p in enumerate(partitions)]
    parts = lanes_of(batch, lanes)
    assert len(parts) == min(lanes, len(set(partitions))) and all(parts)
    assert sorted((r.partition, r.offset) for p in parts for r in p) == sorted((r.partition, r.offset) for r in batch)
    lane_of: dict[int, int] = {}
    for n, part in enumerate(parts):
        for r in part:
            assert lane_of.setdefault(r.partition, n) == n  # one lane per partition
        assert [r.offset for r in part] == sorted(r.offset for r in part)  # consumed order kept
    # as even as the partitions allow: lane sizes in partitions differ by at most one
    per_lane = [len({r.partition for r in p}) for p in parts]
    assert max(per_lane) - min(per_lane) <= 1
