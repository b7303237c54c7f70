"""Property: for any set of measurements, delivered in any order, with any repeats, batched any way (v2
batches of any grouping and part size, or v1 single messages, mixed), the charges the pricer stores are
the same: each measurement counts once (exactly one revision 1), its exact amount is value ×
microcredits_per_unit / unit with the price valid at its reading hour (an independent Fraction model),
and what it publishes never carries a measurement twice as new: every message published is a stored batch,
byte for byte. Runs the readings handlers directly against the real PostgreSQL, publishing through a
recorder, which is much faster than going through a consumer (the broker tests do that).

A price added between deliveries that covers a gap of the catalog re-prices the unpriced charges of the
gap (revision 2), and measurements delivered again afterwards never add a revision."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.pricer.app import MIGRATIONS
from services.pricer.handlers import Pricer
from services.pricer.schemas import PriceIn
from shared import ids
from shared.batches import (
    Item,
    decode_charges,
    decode_measurements,
    encode_measurements,
    measurement_batches,
    shard_of,
)
from shared.contracts import MeasurementTaken
from shared.db import create_pool, migrate
from shared.kafka import Outgoing, Received
from shared.topics import CHARGES
from shared.wire import decoder_for
from tests.support.documents import unpacked

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 7, 0, tzinfo=UTC)
HOURS = 72  # 2026-03-07 .. 2026-03-09 UTC: crosses the DST start in New York
KEYS = [("cfapps", ""), ("cfservices", "plan-a"), ("cfservices", "plan-b")]

# The catalog every example starts with (UTC boundaries, half-open [from, until)):
#   cfapps        : 7/3 from T0 until NY midnight 2026-03-08 (05:00Z), then 11/5 open-ended
#   cfservices/a  : 1,000,000/730 from T0+10h until T0+40h; nothing after (a gap to fill later)
#   cfservices/b  : none at all
BASE = [
    ("cfapps", "", 7, 3, T0, datetime(2026, 3, 8, 5, tzinfo=UTC)),
    ("cfapps", "", 11, 5, datetime(2026, 3, 8, 5, tzinfo=UTC), None),
    ("cfservices", "plan-a", 1_000_000, 730, T0 + timedelta(hours=10), T0 + timedelta(hours=40)),
]
# Added between deliveries when an example asks: covers part of plan-a's gap.
LATE = ("cfservices", "plan-a", 3, 2, T0 + timedelta(hours=40), T0 + timedelta(hours=60))

decode_v1 = decoder_for(MeasurementTaken)


@dataclass
class Recorder:
    """Stands for the broker: what the pricer published, in order."""

    sent: list[tuple[str, Outgoing]] = field(default_factory=list)

    async def publish(self, topic: str, messages: Iterable[Outgoing]) -> int:
        batch = [(topic, m) for m in messages]
        self.sent.extend(batch)
        return len(batch)


@dataclass
class Env:
    pricer: Pricer
    pool: asyncpg.Pool
    recorder: Recorder
    topic: str
    base_ids: list[UUID]


def _price_in(meter: str, kind: str, mpu: int, unit: int, start: datetime, end: datetime | None) -> PriceIn:
    return PriceIn(
        meter=meter, resource_kind=kind, unit_of_measure="unit", microcredits_per_unit=mpu, unit=unit,
        valid_from=start, valid_until=end,
    )


@pytest.fixture
async def env(database: Any, topic_prefix: str) -> AsyncIterator[Env]:
    pool = await create_pool(database.dsn("pricer"), "pricer")
    recorder = Recorder()
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "pricer", MIGRATIONS)
        pricer = Pricer(pool, recorder, topic_prefix + CHARGES)  # type: ignore[arg-type]
        base_ids = [(await pricer.add_price(_price_in(*p)))[0].id for p in BASE]
        yield Env(pricer, pool, recorder, topic_prefix + CHARGES, base_ids)
    finally:
        await pool.close()


def _oracle_price(hour: datetime, meter: str, kind: str, with_late: bool) -> tuple[int, int, int] | None:
    """(index in BASE or -1 for LATE, mpu, unit) of the price valid at ``hour``: a linear scan."""
    candidates = list(enumerate(BASE)) + ([(-1, LATE)] if with_late else [])
    for i, (m, k, mpu, unit, start, end) in candidates:
        if m == meter and k == kind and start <= hour and (end is None or hour < end):
            return i, mpu, unit
    return None


Spec = tuple[tuple[str, str], int, int, int]  # (meter, kind), hour index, resource index, value
measurements = st.tuples(st.sampled_from(KEYS), st.integers(0, HOURS - 1), st.integers(0, 5), st.integers(0, 5 * 2**30))


@dataclass(frozen=True)
class Delivery:
    """One call of a readings handler: the measurements (indices), on v1 or as v2 batches of ``part`` items."""

    items: tuple[int, ...]
    v1: bool
    part: int


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Spec], list[Delivery], int | None]:
    """Distinct measurements, then a delivery sequence of indices into them (each at least once, any
    repeats, any order) cut into handler calls, each on v1 or v2 (v2 batches split into parts of any size),
    and where (if anywhere) the late price is added."""
    distinct = draw(st.lists(measurements, min_size=1, max_size=20, unique_by=lambda t: (t[0][0], t[1], t[2])))
    order = draw(st.permutations(list(range(len(distinct)))))
    repeats = draw(st.lists(st.integers(0, len(distinct) - 1), max_size=15))
    sequence = draw(st.permutations(list(order) + repeats))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(sequence) - 1)), max_size=6)))
    calls = [
        Delivery(tuple(sequence[a:b]), draw(st.booleans()), draw(st.integers(1, 4)))
        for a, b in zip([0, *cuts], [*cuts, len(sequence)], strict=True) if sequence[a:b]
    ]
    late_after = draw(st.one_of(st.none(), st.integers(0, len(calls))))
    return distinct, calls, late_after


def _resource(spec: Spec) -> str:
    (meter, kind), _, r, _ = spec
    return f"{meter}-{kind}-res-{r}"


def _hour(spec: Spec) -> datetime:
    return T0 + timedelta(hours=spec[1])


def _v1(spec: Spec) -> bytes:
    (meter, kind), _, r, value = spec
    hour, resource = _hour(spec), _resource(spec)
    return MeasurementTaken(
        id=ids.measurement_id(hour, meter, resource), reading_id=ids.reading_id(hour), reading_hour=hour,
        meter=meter, resource_id=resource, resource_kind=kind, org_id=f"org-{r % 2}", value=value,
        unit="MB" if meter == "cfapps" else "instance", taken_at=hour + timedelta(hours=1),
    ).model_dump_json().encode()


def _v2(specs: Sequence[Spec], part: int) -> list[bytes]:
    """The measurements as the collector would batch them (several parts per shard when ``part`` is small)."""
    groups: dict[tuple[datetime, str], list[Item]] = {}
    for spec in specs:
        (meter, kind), _, r, value = spec
        groups.setdefault((_hour(spec), meter), []).append(
            Item(_resource(spec), "", f"org-{r % 2}", "", "", "", kind, value)
        )
    out = []
    for (hour, meter), items in sorted(groups.items()):
        unit = "MB" if meter == "cfapps" else "instance"
        for b in measurement_batches(hour, meter, unit, items, reading_id=ids.reading_id(hour),
                                     taken_at=hour + timedelta(hours=1), max_items=part):
            out.append(encode_measurements(b))
    return out


async def _deliver(env: Env, call: Delivery, specs: list[Spec], offset: int) -> int:
    chosen = [specs[i] for i in call.items]
    if call.v1:
        batch = [Received(decode_v1(_v1(s)), _resource(s).encode(), 0, offset + n) for n, s in enumerate(chosen)]
        assert await env.pricer.handle_readings_v1(batch) == []
    else:
        batch = []
        for n, raw in enumerate(_v2(chosen, call.part)):
            decoded = decode_measurements(raw)  # as the consumer hands it over: a repeat counts once
            assert decoded.rejected == [] and decoded.message is not None
            batch.append(Received(decoded.message, b"k", 0, offset + n))
        assert await env.pricer.handle_readings(batch) == []
    return offset + len(batch)


async def _reset(env: Env, late_id: UUID | None) -> None:
    env.recorder.sent.clear()
    async with env.pool.acquire() as conn:
        await conn.execute("TRUNCATE charge_batches, unpublished_batches, unpriced_shards, priced_hours")
        if late_id is not None:
            await conn.execute("DELETE FROM prices WHERE id = $1", late_id)
            await conn.execute("UPDATE catalog_state SET version = version + 1")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(case=deliveries())
async def test_stored_charges_do_not_depend_on_order_repeats_batching_or_topic_version(env: Env, case: Any) -> None:
    specs, calls, late_after = case
    late_id: UUID | None = None
    delivered_before_late: set[int] = set()
    offset = 0
    try:
        for n, call in enumerate(calls):
            if late_after == n:
                late_id = (await env.pricer.add_price(_price_in(*LATE)))[0].id
            offset = await _deliver(env, call, specs, offset)
            if late_id is None:
                delivered_before_late.update(call.items)
        if late_after == len(calls):
            late_id = (await env.pricer.add_price(_price_in(*LATE)))[0].id

        async with env.pool.acquire() as conn:
            rows = await conn.fetch("SELECT reading_hour, meter, shard, seq, message FROM charge_batches")
            outbox = await conn.fetchval("SELECT count(*) FROM unpublished_batches")
            unpriced = {tuple(r) for r in await conn.fetch("SELECT * FROM unpriced_shards")}
            priced_hours = {tuple(r) for r in await conn.fetch("SELECT price_id, reading_hour FROM priced_hours")}
            messages = await unpacked(conn, "pricer", [r["message"] for r in rows])
        stored = set(messages)
        assert outbox == 0  # every re-priced batch went out

        # Every measurement's charges, as (revision, price id, exact amount), from the stored batches.
        charges: dict[tuple[datetime, str, str], list[tuple[int, UUID | None, Fraction]]] = {}
        for r, message in zip(rows, messages, strict=True):
            c = decode_charges(message).message
            assert c is not None and (c.reading_hour, c.meter, c.shard) == (r["reading_hour"], r["meter"], r["shard"])
            for i, rid in enumerate(c.resource_id):
                p = None if c.price[i] < 0 else c.prices[c.price[i]].id
                charges.setdefault((c.reading_hour, c.meter, rid), []).append(
                    (c.revision[i], p, Fraction(c.amount_numerator[i], c.amount_denominator[i])))
        assert set(charges) == {(_hour(s), s[0][0], _resource(s)) for s in specs}

        expected_unpriced: set[tuple[datetime, str, int, str]] = set()
        expected_hours: set[tuple[UUID, datetime]] = set()
        for n, spec in enumerate(specs):
            (meter, kind), _, _, value = spec
            hour = _hour(spec)
            revisions = sorted(charges[(hour, meter, _resource(spec))])
            found = _oracle_price(hour, meter, kind, late_id is not None)
            base_found = _oracle_price(hour, meter, kind, False)
            if found is not None and base_found is None and n in delivered_before_late:
                # Unpriced when first stored, re-priced by the late price: one revision 1, one revision 2.
                assert [r[0] for r in revisions] == [1, 2]
                assert revisions[0][1:] == (None, 0)
            else:
                assert [r[0] for r in revisions] == [1]
            _, price_id, amount = revisions[-1]
            if found is None:
                expected_unpriced.add((hour, meter, shard_of(_resource(spec)), kind))
                assert (price_id, amount) == (None, 0)
            else:
                index, mpu, unit = found
                assert price_id == (late_id if index == -1 else env.base_ids[index])
                assert amount == Fraction(value * mpu, unit)
            expected_hours.update((p, hour) for _, p, _ in revisions if p is not None)
        assert unpriced == expected_unpriced
        assert priced_hours == expected_hours

        # What went out: only stored batches, byte for byte, on the charges topic, keyed by shard; each
        # stored batch at least once. So a measurement's revision is never published twice as different news.
        sent = env.recorder.sent
        assert {topic for topic, _ in sent} <= {env.topic}
        assert {m.value for _, m in sent} == stored
        for _, m in sent:
            c = decode_charges(m.value).message
            assert c is not None and m.key == b"shard-%d" % c.shard
    finally:
        await _reset(env, late_id)
