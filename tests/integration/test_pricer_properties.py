"""Property: for any multiset of measurements, in any order, with any duplication and any batching, the
charges the pricer stores are the same, and each exact amount is value × microcredits_per_unit / unit
with the price valid at its reading hour. Runs the readings handler directly against the real
PostgreSQL (and publishes to the real broker), which is much faster than going through a consumer.

A price added between batches that covers a gap of the catalog re-prices the unpriced charges of the
gap (revision 2), and measurements redelivered afterwards never add a revision."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.pricer.app import MIGRATIONS
from services.pricer.handlers import Pricer
from services.pricer.schemas import PriceIn
from shared import ids
from shared.contracts import MeasurementTaken
from shared.db import create_pool, migrate
from shared.kafka import Publisher, Received
from shared.topics import CHARGES

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
# Added between batches when an example asks: covers part of plan-a's gap.
LATE = ("cfservices", "plan-a", 3, 2, T0 + timedelta(hours=40), T0 + timedelta(hours=60))


@dataclass
class Env:
    pricer: Pricer
    pool: Any
    base_ids: list[UUID]


def _price_in(meter: str, kind: str, mpu: int, unit: int, start: datetime, end: datetime | None) -> PriceIn:
    return PriceIn(
        meter=meter, resource_kind=kind, unit_of_measure="unit", microcredits_per_unit=mpu, unit=unit,
        valid_from=start, valid_until=end,
    )


@pytest.fixture
async def env(infra, database, topic_prefix) -> AsyncIterator[Env]:
    pool = await create_pool(database.dsn("pricer"), "pricer")
    publisher = Publisher(infra.kafka, client_id="pricer-property-test")
    await publisher.start()
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "pricer", MIGRATIONS)
        pricer = Pricer(pool, publisher, topic_prefix + CHARGES)
        base_ids = [(await pricer.add_price(_price_in(*p)))[0].id for p in BASE]
        yield Env(pricer, pool, base_ids)
    finally:
        await publisher.stop()
        await pool.close()


def _oracle_price(hour: datetime, meter: str, kind: str, with_late: bool) -> tuple[int, int, int] | None:
    """(index in BASE or -1 for LATE, mpu, unit) of the price valid at ``hour``: a linear scan."""
    candidates = [(i, p) for i, p in enumerate(BASE)] + ([(-1, LATE)] if with_late else [])
    for i, (m, k, mpu, unit, start, end) in candidates:
        if m == meter and k == kind and start <= hour and (end is None or hour < end):
            return i, mpu, unit
    return None


measurements = st.builds(
    lambda key, h, r, v: (key, h, r, v),
    st.sampled_from(KEYS),
    st.integers(0, HOURS - 1),
    st.integers(0, 3),
    st.integers(0, 5 * 2**30),
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[tuple[Any, ...]], list[list[int]], int | None]:
    """Distinct measurements, then a delivery sequence of indices into them (each at least once, any
    repeats, any order) cut into batches, and where (if anywhere) the late price is added."""
    distinct = draw(st.lists(measurements, min_size=1, max_size=25, unique_by=lambda t: (t[0][0], t[1], t[2])))
    order = draw(st.permutations(list(range(len(distinct)))))
    repeats = draw(st.lists(st.integers(0, len(distinct) - 1), max_size=15))
    sequence = list(order) + repeats
    sequence = draw(st.permutations(sequence))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(sequence) - 1)), max_size=6)))
    batches = [sequence[a:b] for a, b in zip([0, *cuts], [*cuts, len(sequence)], strict=True) if sequence[a:b]]
    late_after = draw(st.one_of(st.none(), st.integers(0, len(batches))))
    return distinct, batches, late_after


def _measurement(key: tuple[str, str], h: int, r: int, value: int) -> MeasurementTaken:
    meter, kind = key
    hour = T0 + timedelta(hours=h)
    resource = f"{meter}-{kind}-res-{r}"
    return MeasurementTaken(
        id=ids.measurement_id(hour, meter, resource), reading_id=ids.reading_id(hour), reading_hour=hour,
        meter=meter, resource_id=resource, resource_kind=kind, org_id=f"org-{r % 2}", value=value,
        unit="MB" if meter == "cfapps" else "instance", taken_at=hour + timedelta(hours=1),
    )


async def _reset(env: Env, late_id: UUID | None) -> None:
    async with env.pool.acquire() as conn:
        await conn.execute("TRUNCATE charges, unpriced_charges, charge_outbox")
        if late_id is not None:
            await conn.execute("DELETE FROM prices WHERE id = $1", late_id)
            await conn.execute("UPDATE catalog_state SET version = version + 1")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=deliveries())
async def test_stored_charges_do_not_depend_on_order_duplication_or_batching(env: Env, case: Any) -> None:
    distinct_specs, batches, late_after = case
    distinct = [_measurement(*spec) for spec in distinct_specs]
    late_id: UUID | None = None
    delivered_before_late: set[UUID] = set()
    offset = 0
    try:
        for n, batch in enumerate(batches):
            if late_after == n:
                late_id = (await env.pricer.add_price(_price_in(*LATE)))[0].id
            items = []
            for i in batch:
                items.append(Received(distinct[i], distinct[i].resource_id.encode(), 0, offset))
                offset += 1
            rejects = await env.pricer.handle_readings(items)
            assert rejects == []
            if late_id is None:
                delivered_before_late.update(distinct[i].id for i in batch)
        if late_after == len(batches):
            late_id = (await env.pricer.add_price(_price_in(*LATE)))[0].id

        async with env.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT measurement_id, revision, reading_hour, meter, resource_kind, value, price_id, "
                "amount_numerator, amount_denominator FROM charges ORDER BY measurement_id, revision"
            )
            unpriced = {r["measurement_id"] for r in await conn.fetch("SELECT measurement_id FROM unpriced_charges")}
            outbox = await conn.fetchval("SELECT count(*) FROM charge_outbox")

        by_measurement: dict[UUID, list[Any]] = {}
        for r in rows:
            by_measurement.setdefault(r["measurement_id"], []).append(r)
        assert set(by_measurement) == {m.id for m in distinct}
        expected_unpriced = set()
        for m in distinct:
            revisions = by_measurement[m.id]
            with_late = late_id is not None
            found = _oracle_price(m.reading_hour, m.meter, m.resource_kind, with_late)
            base_found = _oracle_price(m.reading_hour, m.meter, m.resource_kind, False)
            if found is not None and base_found is None and m.id in delivered_before_late:
                # Unpriced when first stored, re-priced by the late price.
                assert [r["revision"] for r in revisions] == [1, 2]
                assert revisions[0]["price_id"] is None
            else:
                assert [r["revision"] for r in revisions] == [1]
            latest = revisions[-1]
            assert (latest["reading_hour"], latest["meter"], latest["resource_kind"], latest["value"]) == (
                m.reading_hour, m.meter, m.resource_kind, m.value,
            )
            if found is None:
                expected_unpriced.add(m.id)
                assert latest["price_id"] is None
                assert (latest["amount_numerator"], latest["amount_denominator"]) == (0, 1)
            else:
                index, mpu, unit = found
                assert latest["price_id"] == (late_id if index == -1 else env.base_ids[index])
                assert Fraction(latest["amount_numerator"], latest["amount_denominator"]) == Fraction(m.value * mpu, unit)
        assert unpriced == expected_unpriced
        assert outbox == 0  # every re-priced revision was published
    finally:
        await _reset(env, late_id)
