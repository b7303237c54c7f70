"""The posting rule, property-tested against an oracle that uses Python's Fraction.

For every (customer, billing month in America/New_York, price): the microcredits posted equal
floor(exact sum of that month's charges at their latest revision), whatever the order, batching,
duplication, replay or revision of the charges, across month boundaries and daylight-saving days, with an
org that moves between customers and an org that is unassigned until late in the stream (assigned through
the service, which posts what it held, or behind its back, so that the periodic sweep or a month close
posts it).

Charges travel as ``usage.charges.v2`` batches: a random stream of charges (with duplicates, in random
order) is cut into deliveries of random sizes; each delivery is dealt into per-shard batches, encoded and
decoded as the consumer does (a charge twice in one message counts once there), and posted through the
consumer's service call (``LedgerService.post_charges``, what the usage.charges.v2 handler calls per Kafka
batch); Kafka is not involved. Every example uses fresh customers, orgs and resources in the test's
database.

With graduated and volume prices (docs/price-models.md): per (customer, month, price) the microcredits
posted equal floor(f(exact total units of the month's charges at their latest revision)), f computed by the
independent ``reference_f`` (tests/support/price_models.py); the same stream of revisions (lowering units,
moving a charge between prices and models, unpricing it), duplicates, shuffles, held orgs and month
boundaries.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from fractions import Fraction
from typing import Literal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.batches import Price
from tests.support.ledger import (
    LONG_AGO,
    PRICE_A,
    PRICE_B,
    ChargeItem,
    LedgerDB,
    applied_revisions,
    assert_books_hold,
    banded_price,
    charges_batches,
    delivered,
    held_revisions,
    item,
    ledger_db,  # noqa: F401  (fixture)
    posted_by_group,
    remaining,
    usage,
)
from tests.support.price_models import RawBand, floor_of, reference_f

pytestmark = pytest.mark.integration

NEW_YORK = ZoneInfo("America/New_York")

# Hours chosen around the traps: New York month boundaries (in UTC they fall at 05:00 in winter and 04:00
# in summer) and the two daylight-saving days of 2026.
HOURS = [
    datetime(2026, 3, 1, 4, tzinfo=UTC),  # Feb 28 23:00 EST -> February
    datetime(2026, 3, 1, 5, tzinfo=UTC),  # Mar 1 00:00 EST -> March
    datetime(2026, 3, 8, 6, tzinfo=UTC),  # Mar 8 01:00 EST (spring forward day)
    datetime(2026, 3, 8, 7, tzinfo=UTC),  # Mar 8 03:00 EDT
    datetime(2026, 4, 1, 3, tzinfo=UTC),  # Mar 31 23:00 EDT -> March
    datetime(2026, 4, 1, 4, tzinfo=UTC),  # Apr 1 00:00 EDT -> April
    datetime(2026, 10, 31, 3, tzinfo=UTC),  # Oct 30 23:00 EDT -> October
    datetime(2026, 11, 1, 4, tzinfo=UTC),  # Nov 1 00:00 EDT -> November
    datetime(2026, 11, 1, 5, tzinfo=UTC),  # Nov 1 01:00 EDT (fall back day)
    datetime(2026, 11, 1, 6, tzinfo=UTC),  # Nov 1 01:00 EST, the repeated hour
]
DENOMINATORS = [1, 3, 7, 730, 730_000, 2**31 - 1]
ORGS = 3  # org 0: customer A; org 1: A, then B from a drawn hour; org 2: unassigned until late
RESOURCES = 8  # a few share a shard (a batch of several items), most do not
METER = "cfapps"


def oracle_month(hour: datetime) -> str:
    local = hour.astimezone(NEW_YORK)
    return f"{local.year:04d}-{local.month:02d}"


@dataclass(frozen=True)
class Version:
    """One revision of one measurement's charge."""

    hour_index: int
    resource: int
    revision: int
    amount: Fraction
    priced: bool
    price_b: bool
    over_unit: bool  # written unreduced over a multiple of its denominator, as a price's unit would


versions = st.builds(
    Version,
    hour_index=st.integers(0, len(HOURS) - 1),
    resource=st.integers(0, RESOURCES - 1),
    revision=st.integers(1, 4),
    amount=st.builds(Fraction, st.integers(0, 3_000_000), st.sampled_from(DENOMINATORS)),
    priced=st.sampled_from([True, True, True, False]),  # mostly priced; unpriced count as 0
    price_b=st.booleans(),
    over_unit=st.booleans(),
)


@dataclass(frozen=True)
class Scenario:
    versions: list[Version]
    order_seed: int
    duplicates: int
    batch_sizes: list[int]
    switch_hour: int
    assign_late_org_after: int  # delivery index after which org 2 gets its customer
    late_org_by: Literal["service", "behind its back"]
    close_february_after: int | None
    fund: int | None


scenarios = st.builds(
    Scenario,
    versions=st.lists(versions, min_size=1, max_size=40),
    order_seed=st.integers(0, 2**32),
    duplicates=st.integers(0, 15),
    batch_sizes=st.lists(st.integers(1, 25), min_size=1, max_size=6),
    switch_hour=st.integers(0, len(HOURS) - 1),
    assign_late_org_after=st.integers(0, 6),
    late_org_by=st.sampled_from(["service", "behind its back"]),
    close_february_after=st.none() | st.integers(0, 6),
    fund=st.none() | st.integers(1, 5_000_000),
)

Key = tuple[int, int]  # (hour index, resource)


def resource_id(tag: str, r: int) -> str:
    return f"{tag}-res-{r}"  # unique to the example


def build_stream(
    s: Scenario, orgs: list[str], tag: str
) -> tuple[list[tuple[datetime, ChargeItem]], dict[Key, Version]]:
    """The charges to send (with duplicates, shuffled) and, per measurement, its latest revision."""
    distinct: dict[tuple[int, int, int], Version] = {}
    for v in s.versions:
        distinct.setdefault((v.hour_index, v.resource, v.revision), v)  # one content per (measurement, revision)
    latest: dict[Key, Version] = {}
    for (h, r, rev), v in distinct.items():
        if (h, r) not in latest or latest[(h, r)].revision < rev:
            latest[(h, r)] = v
    charges = [
        (
            HOURS[v.hour_index],
            item(
                orgs[v.resource % ORGS],
                v.amount if v.priced else 0,
                resource=resource_id(tag, v.resource),
                revision=v.revision,
                price_id=(PRICE_B if v.price_b else PRICE_A) if v.priced else None,
                denominator=v.amount.denominator * 4 if v.over_unit and v.priced else None,
            ),
        )
        for v in distinct.values()
    ]
    rng = random.Random(s.order_seed)
    charges += [rng.choice(charges) for _ in range(s.duplicates)]
    rng.shuffle(charges)
    return charges, latest


def deliveries(charges: list[tuple[datetime, ChargeItem]], sizes: list[int]) -> list[list[tuple[datetime, ChargeItem]]]:
    """The stream cut as the consumer may receive it: runs of ``sizes`` charges, in turn."""
    out, i, k = [], 0, 0
    while i < len(charges):
        size = sizes[k % len(sizes)]
        out.append(charges[i : i + size])
        i += size
        k += 1
    return out


def oracle(
    latest: dict[Key, Version], customer_of: dict[Key, uuid.UUID]
) -> dict[tuple[uuid.UUID, str, uuid.UUID | None], int]:
    sums: dict[tuple[uuid.UUID, str, uuid.UUID | None], Fraction] = defaultdict(Fraction)
    for key, v in latest.items():
        price = (PRICE_B if v.price_b else PRICE_A) if v.priced else None
        amount = v.amount if v.priced else Fraction(0)
        sums[(customer_of[key], oracle_month(HOURS[v.hour_index]), price)] += amount
    return {k: v.numerator // v.denominator for k, v in sums.items() if v.numerator // v.denominator != 0}


async def assign_behind_its_back(db: LedgerDB, org: str, customer: uuid.UUID) -> None:
    """An assignment the ledger's posting did not see being made (a batch racing it): nothing is released."""
    await db.fetch(
        "INSERT INTO org_assignments (org_id, starts_at, customer_id) VALUES ($1, $2, $3)", org, LONG_AGO, customer
    )


async def two_customers(
    db: LedgerDB, switch_hour: int, fund: int | None
) -> tuple[uuid.UUID, uuid.UUID, str, list[str], datetime]:
    """An example's world: customers A and B of one tier; org 0 is A's, org 1 A's until HOURS[switch_hour]
    and B's from then, org 2 nobody's yet (the test assigns it); A funded with ``fund`` when given. Returns
    (A, B, the example's tag, its orgs, the switch hour)."""
    tier = db.made.get("tier") or await db.tier(credits=2_000_000)
    db.made["tier"] = tier
    # The database outlives the examples, a month close is an example's own event: every example starts with
    # every month open (its agreement and assignments start before February, which a closed February refuses).
    await db.fetch("DELETE FROM statements")
    await db.fetch("DELETE FROM month_closes")
    a, b = await db.customer("A", tier), await db.customer("B", tier)
    tag = uuid.uuid4().hex[:8]
    orgs = [f"{tag}-org{i}" for i in range(ORGS)]
    switch = HOURS[switch_hour]
    await db.service.assign_org(orgs[0], a, LONG_AGO)
    await db.service.assign_org(orgs[1], a, LONG_AGO)
    await db.service.assign_org(orgs[1], b, switch)
    if fund is not None:  # an agreement small enough to run out: the rule holds through overage too
        await db.service.create_agreement(a, LONG_AGO, datetime(2027, 1, 1, tzinfo=UTC), fund)
    return a, b, tag, orgs, switch


def owner_of(a: uuid.UUID, b: uuid.UUID, switch: datetime) -> Callable[[Key], uuid.UUID]:
    """Who owns a measurement (hour index, resource) in ``two_customers``'s world, org 2 once assigned to B."""

    def customer_of(key: Key) -> uuid.UUID:
        hour, org = HOURS[key[0]], key[1] % ORGS
        if org == 0:
            return a
        if org == 1:
            return b if hour >= switch else a
        return b

    return customer_of


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(s=scenarios)
async def test_posted_microcredits_equal_the_floor_of_the_exact_monthly_sum(ledger_db: LedgerDB, s: Scenario) -> None:
    db = ledger_db
    a, b, tag, orgs, switch = await two_customers(db, s.switch_hour, s.fund)

    async def assign_late_org() -> None:
        if s.late_org_by == "service":
            await db.service.assign_org(orgs[2], b, LONG_AGO)
        else:
            await assign_behind_its_back(db, orgs[2], b)

    charges, latest = build_stream(s, orgs, tag)
    late_org_assigned = False
    for i, delivery in enumerate(deliveries(charges, s.batch_sizes)):
        await db.service.post_charges(delivered(charges_batches(delivery, meter=METER)))
        if i == s.assign_late_org_after:
            await assign_late_org()
            late_org_assigned = True
        if s.close_february_after == i:
            await db.service.close_month(date(2026, 2, 1))
    if not late_org_assigned:
        # Everything of org 2 is held, at its latest revision.
        held = {(h, rid): rev for (h, _, org, rid), rev in (await held_revisions(db)).items() if org == orgs[2]}
        assert held == {(HOURS[h], resource_id(tag, r)): v.revision for (h, r), v in latest.items() if r % ORGS == 2}
        await assign_late_org()
    if s.late_org_by == "behind its back":
        await db.service.post_resolvable_held()  # the periodic sweep

    customer_of = owner_of(a, b, switch)

    expected = oracle(latest, {k: customer_of(k) for k in latest})
    assert await posted_by_group(db, [a, b]) == expected
    # The running state agrees: posted figures per group, and the applied revision of every measurement.
    groups = await db.fetch(
        """SELECT customer_id, to_char(month, 'YYYY-MM') AS month, price_id, posted FROM month_usage
            WHERE customer_id = ANY($1::uuid[]) AND posted <> 0""",
        [a, b],
    )
    nil = uuid.UUID(int=0)
    assert {
        (g["customer_id"], g["month"], None if g["price_id"] == nil else g["price_id"]): g["posted"] for g in groups
    } == expected
    applied = {k: v for k, v in (await applied_revisions(db)).items() if k[2].startswith(f"{tag}-")}
    assert applied == {(HOURS[h], METER, resource_id(tag, r)): v.revision for (h, r), v in latest.items()}
    assert [k for k in await held_revisions(db) if k[2] in orgs] == []
    await assert_books_hold(db.pool)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(s=scenarios, replays=st.integers(1, 3))
async def test_replaying_the_whole_stream_changes_nothing(ledger_db: LedgerDB, s: Scenario, replays: int) -> None:
    """The same charges again, in other orders and cut into other batches (a measurement re-batched with
    other ones of its shard), post nothing more."""
    db = ledger_db
    a = await db.customer("A")
    tag = uuid.uuid4().hex[:8]
    orgs = [f"{tag}-org{i}" for i in range(ORGS)]
    for org in orgs:
        await db.service.assign_org(org, a, LONG_AGO)
    charges, latest = build_stream(s, orgs, tag)
    for delivery in deliveries(charges, s.batch_sizes):
        await db.service.post_charges(delivered(charges_batches(delivery, meter=METER)))
    posted = await posted_by_group(db, [a])
    transactions = await db.fetchval("SELECT count(*) FROM transactions WHERE customer_id = $1", a)
    rng = random.Random(s.order_seed + 1)
    for _ in range(replays):
        again = list(charges)
        rng.shuffle(again)
        for delivery in deliveries(again, [rng.randint(1, 30)]):
            result = await db.service.post_charges(delivered(charges_batches(delivery, meter=METER)))
            assert result.changed == 0 and result.transactions == 0
    assert await posted_by_group(db, [a]) == posted == oracle(latest, dict.fromkeys(latest, a))
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE customer_id = $1", a) == transactions


# ------------------------------------------------------------------------------- graduated and volume prices

_edge = st.builds(Fraction, st.integers(1, 3_000), st.integers(1, 6))


@st.composite
def banded(draw: st.DrawFn, model: str) -> tuple[str, list[RawBand], int]:
    """A graduated or volume price: (model, bands, unit)."""
    edges = sorted(set(draw(st.lists(_edge, min_size=0, max_size=4))))
    n = len(edges) + 1
    rates = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n))
    fees = draw(st.lists(st.one_of(st.just(0), st.integers(0, 10**5)), min_size=n, max_size=n))
    ups: list[Fraction | None] = [*edges, None]
    return model, list(zip(ups, rates, fees, strict=True)), draw(st.sampled_from([1, 3, 730]))


@dataclass(frozen=True)
class Use:
    """One revision of one measurement's charge: its price (0: flat PRICE_A, 1: graduated, 2: volume, None:
    unpriced) and value (the flat price's amount is value / 7)."""

    hour_index: int
    resource: int
    revision: int
    price: int | None
    value: int


@dataclass(frozen=True)
class BandedScenario:
    prices: list[tuple[str, list[RawBand], int]]  # graduated, volume
    uses: list[Use]
    order_seed: int
    duplicates: int
    batch_sizes: list[int]
    switch_hour: int
    assign_late_org_after: int
    close_february_after: int | None
    fund: int | None


@st.composite
def banded_scenarios(draw: st.DrawFn) -> BandedScenario:
    prices = [draw(banded("graduated")), draw(banded("volume"))]
    # Values that put one charge exactly on a band edge of a price, so that totals land on edges.
    on_edge = sorted(
        {int(u * unit) for _, bands, unit in prices for u, _, _ in bands if u and (u * unit).denominator == 1}
    )
    values = st.one_of(st.integers(0, 4_000), st.sampled_from(on_edge)) if on_edge else st.integers(0, 4_000)
    uses = draw(
        st.lists(
            st.builds(
                Use,
                hour_index=st.integers(0, len(HOURS) - 1),
                resource=st.integers(0, RESOURCES - 1),
                revision=st.integers(1, 4),
                price=st.sampled_from([0, 1, 1, 2, 2, None]),
                value=values,
            ),
            min_size=1,
            max_size=40,
        )
    )
    return BandedScenario(
        prices,
        uses,
        draw(st.integers(0, 2**32)),
        draw(st.integers(0, 15)),
        draw(st.lists(st.integers(1, 25), min_size=1, max_size=6)),
        draw(st.integers(0, len(HOURS) - 1)),
        draw(st.integers(0, 6)),
        draw(st.none() | st.integers(0, 6)),
        draw(st.none() | st.integers(1, 5_000_000)),
    )


FLAT_DENOMINATOR = 7


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(s=banded_scenarios())
async def test_posted_microcredits_equal_the_floor_of_f_of_the_monthly_units(
    ledger_db: LedgerDB, s: BandedScenario
) -> None:
    db = ledger_db
    a, b, tag, orgs, switch = await two_customers(db, s.switch_hour, s.fund)
    terms: list[Price] = [banded_price(uuid.uuid4(), model, bands, unit) for model, bands, unit in s.prices]

    distinct: dict[tuple[int, int, int], Use] = {}
    for u in s.uses:
        distinct.setdefault((u.hour_index, u.resource, u.revision), u)  # one content per (measurement, revision)
    latest: dict[Key, Use] = {}
    for (h, r, rev), u in distinct.items():
        if (h, r) not in latest or latest[(h, r)].revision < rev:
            latest[(h, r)] = u

    def charge(u: Use) -> tuple[datetime, ChargeItem]:
        org, rid = orgs[u.resource % ORGS], resource_id(tag, u.resource)
        if u.price is None:
            return HOURS[u.hour_index], item(org, 0, resource=rid, revision=u.revision, price_id=None)
        if u.price == 0:
            amount = Fraction(u.value, FLAT_DENOMINATOR)
            return HOURS[u.hour_index], item(
                org, amount, resource=rid, revision=u.revision, denominator=FLAT_DENOMINATOR
            )
        return HOURS[u.hour_index], usage(org, u.value, terms[u.price - 1], resource=rid, revision=u.revision)

    charges = [charge(u) for u in distinct.values()]
    rng = random.Random(s.order_seed)
    charges += [rng.choice(charges) for _ in range(s.duplicates)]
    rng.shuffle(charges)
    late_org_assigned = False
    for i, delivery in enumerate(deliveries(charges, s.batch_sizes)):
        result = await db.service.post_charges(delivered(charges_batches(delivery, meter=METER)))
        assert result.refused == [] and result.conflicts == []
        if i == s.assign_late_org_after:
            await db.service.assign_org(orgs[2], b, LONG_AGO)  # posts what it held
            late_org_assigned = True
        if s.close_february_after == i:
            await db.service.close_month(date(2026, 2, 1))
    if not late_org_assigned:
        held = {(h, rid): rev for (h, _, org, rid), rev in (await held_revisions(db)).items() if org == orgs[2]}
        assert held == {(HOURS[h], resource_id(tag, r)): u.revision for (h, r), u in latest.items() if r % ORGS == 2}
        await db.service.assign_org(orgs[2], b, LONG_AGO)

    customer_of = owner_of(a, b, switch)

    # The oracle: per (customer, month, price) the exact sum of the flat amounts, or the exact total units,
    # of the latest revisions; then floor of the sum, or floor of reference f of the units.
    totals: dict[tuple[uuid.UUID, str, uuid.UUID | None], Fraction] = defaultdict(Fraction)
    for key, u in latest.items():
        group = (customer_of(key), oracle_month(HOURS[u.hour_index]))
        if u.price is None:
            totals[(*group, None)] += 0
        elif u.price == 0:
            totals[(*group, PRICE_A)] += Fraction(u.value, FLAT_DENOMINATOR)
        else:
            totals[(*group, terms[u.price - 1].id)] += Fraction(u.value, s.prices[u.price - 1][2])
    model_of = {t.id: s.prices[i][:2] for i, t in enumerate(terms)}
    expected = {}
    for (customer, month, price), total in totals.items():
        if price in model_of:
            model, bands = model_of[price]
            whole = floor_of(reference_f(model, bands, total))
        else:
            whole = floor_of(total)
        if whole:
            expected[(customer, month, price)] = whole

    # The usage lines of the transactions, the groups' posted figures, and the balances all agree with it.
    assert await posted_by_group(db, [a, b]) == expected
    groups = await db.fetch(
        """SELECT customer_id, to_char(month, 'YYYY-MM') AS month, price_id, posted FROM month_usage
            WHERE customer_id = ANY($1::uuid[]) AND posted <> 0""",
        [a, b],
    )
    nil = uuid.UUID(int=0)
    assert {
        (g["customer_id"], g["month"], None if g["price_id"] == nil else g["price_id"]): g["posted"] for g in groups
    } == expected
    for customer, funded in ((a, s.fund or 0), (b, 0)):
        used = sum(v for k, v in expected.items() if k[0] == customer)
        assert await remaining(db, customer) == funded - used
    applied = {k: v for k, v in (await applied_revisions(db)).items() if k[2].startswith(f"{tag}-")}
    assert applied == {(HOURS[h], METER, resource_id(tag, r)): u.revision for (h, r), u in latest.items()}
    await assert_books_hold(db.pool)
