"""Property test of the read model's consumers on the real database: whatever the order, batching,
duplication, revisions, and interleaving (even concurrent) of charges batches and of the ledger facts that
say which customer an org belonged to, usage by every grouping at every granularity (read back as the api
answers it) ends up equal to an oracle built with Fractions from the latest revision of every charge; and
the changes of orgs whose customer is not known yet wait, and are attributed exactly once."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api import repository as repo
from services.api.projector import Projector
from shared.contracts import TransactionPosted
from shared.ids import charge_id, measurement_id
from tests.support.api_db import api_pool
from tests.support.api_factories import ChargeItem, amount_of, batches, charge, txn

pytestmark = pytest.mark.integration

NY = ZoneInfo("America/New_York")
CUSTOMERS = [uuid.UUID(int=0xC1), uuid.UUID(int=0xC2)]
HOURS = [
    datetime(2026, 11, 1, 3, tzinfo=UTC),  # Oct 31, 23:00 EDT
    datetime(2026, 11, 1, 4, tzinfo=UTC),  # Nov 1, 00:00 EDT
    datetime(2026, 11, 1, 6, tzinfo=UTC),  # Nov 1, 01:00 EST (the repeated hour)
]
ORGS = ["org-a", "org-b", "org-c"]
# (resource, org, meter): r0, r16 and r21 share a shard, so do r2 and r9, and r3 and r8: batches hold items
# of several orgs (and so of several customers)
RESOURCES = [
    ("r0", "org-a", "cfapps"), ("r16", "org-b", "cfapps"), ("r21", "org-c", "cfapps"), ("r2", "org-b", "cfapps"),
    ("r9", "org-c", "cfapps"), ("r3", "org-a", "cfservices"), ("r8", "org-b", "cfservices"), ("r4", "org-c", "cfapps"),
]
DENOMINATORS = [1, 3, 7, 730, 1000]
TABLES = (
    "charge_shard, org_customer_hour, usage_resource_day, usage_month, "
    "usage_day_group, usage_hour_group, ledger_transaction, customer, org_info, space_info, resource_info"
)
DIMS: dict[str, Callable[[ChargeItem], tuple[str, str]]] = {
    "org": lambda c: (c.org_id, ""),
    "space": lambda c: (c.space_id, ""),
    "resource": lambda c: (c.resource_id, ""),
    "meter": lambda c: (c.meter, ""),
    "kind": lambda c: (c.meter, c.resource_kind),
}
PERIODS: dict[str, Callable[[datetime], date | datetime]] = {
    "hour": lambda h: h,
    "day": lambda h: h.astimezone(NY).date(),
    "month": lambda h: h.astimezone(NY).date().replace(day=1),
}
RANGES: dict[str, tuple[date | datetime, date | datetime]] = {
    "hour": (HOURS[0], datetime(2026, 11, 1, 7, tzinfo=UTC)),
    "day": (date(2026, 10, 31), date(2026, 11, 2)),
    "month": (date(2026, 10, 1), date(2026, 12, 1)),
}

Figures = dict[tuple[Any, ...], tuple[dict[str, int], Fraction]]


@pytest.fixture
async def pool(database: Any) -> AsyncIterator[asyncpg.Pool]:
    async with api_pool(database, max_size=4) as p:
        yield p


amounts = st.builds(lambda n, d: Fraction(n, d), st.integers(0, 10_000), st.sampled_from(DENOMINATORS))


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    owner = {(o, h): draw(st.sampled_from(CUSTOMERS)) for o in ORGS for h in HOURS}
    charges: list[ChargeItem] = []
    for rid, org, meter in RESOURCES:
        for h in draw(st.lists(st.sampled_from(HOURS), unique=True, max_size=3)):
            for rev in range(1, draw(st.integers(1, 3)) + 1):
                unit = "instance" if meter == "cfservices" else "MB"
                value, amount, priced = draw(st.integers(1, 4096)), draw(amounts), draw(st.booleans()) or rev > 1
                charges.append(
                    charge(
                        h, rid, org=org, meter=meter, unit=unit, value=value, amount=amount, revision=rev,
                        priced=priced,
                    )
                )
    # The ledger tells most (org, hour) owners, some twice; charges of the others must stay uncounted.
    told = {k: v for k, v in owner.items() if draw(st.integers(0, 5)) > 0}
    facts = [
        txn(cust, "usage", 1 + i, occurred_at=h, reading_hour=h, orgs=[o])
        for i, ((o, h), cust) in enumerate(sorted(told.items()))
    ]
    if facts:
        facts += draw(st.lists(st.sampled_from(facts), max_size=4))
    events: list[tuple[str, Any]] = [("charge", c) for c in charges]
    if charges:
        events += [("charge", c) for c in draw(st.lists(st.sampled_from(charges), max_size=5))]
    events += [("fact", f) for f in facts]
    events = draw(st.permutations(events))
    cuts = sorted(draw(st.lists(st.integers(0, len(events)), max_size=6)))
    concurrent = draw(st.booleans())
    return {"owner": told, "charges": charges, "events": events, "cuts": cuts, "concurrent": concurrent}


def oracle(owner: dict[tuple[str, datetime], uuid.UUID], charges: list[ChargeItem]) -> Figures:
    """(customer, granularity, dim, period, key, key2) -> (values per unit, exact amount) of the latest
    revision of every charge whose org's customer the ledger told."""
    latest: dict[tuple[datetime, str, str], ChargeItem] = {}
    for c in charges:
        if c.measurement not in latest or c.revision > latest[c.measurement].revision:
            latest[c.measurement] = c
    out: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [defaultdict(int), Fraction(0)])
    for c in latest.values():
        cust = owner.get((c.org_id, c.reading_hour))
        if cust is None:
            continue  # the ledger never said whose it is
        for granularity, period in PERIODS.items():
            for dim, key in DIMS.items():
                cell = out[(cust, granularity, dim, period(c.reading_hour), *key(c))]
                cell[0][c.unit] += c.value
                cell[1] += amount_of(c)
    return {k: (dict(v[0]), v[1]) for k, v in out.items()}


async def read_back(pool: asyncpg.Pool) -> Figures:
    """Every customer's usage as the api's usage query reads it, by every grouping and granularity."""
    out: Figures = {}
    async with pool.acquire() as conn:
        for cust in CUSTOMERS:
            for granularity, (first, stop) in RANGES.items():
                for dim in DIMS:
                    rows = await repo.usage_page(
                        conn, cust, granularity=granularity, dim=dim, first=first, stop=stop, after=None, limit=10_000
                    )
                    for r in rows:
                        key = (cust, granularity, dim, r.period, r.key, r.key2)
                        assert key not in out, f"{key} read twice"
                        out[key] = (dict(r.values), r.amount)
    return out


async def apply(p: Projector, batch: list[tuple[str, Any]], concurrent: bool) -> None:
    charges = batches([e for kind, e in batch if kind == "charge"])
    facts: list[TransactionPosted] = [e for kind, e in batch if kind == "fact"]
    if concurrent:
        await asyncio.gather(p.apply_charges(charges), p.apply_ledger(facts))
    else:
        await p.apply_charges(charges)
        await p.apply_ledger(facts)


def nonzero(figures: Figures, expected: Figures) -> Figures:
    """A group whose charges all went elsewhere may stay as a row of zeros: only those are left out."""
    return {k: v for k, v in figures.items() if k in expected or any(v[0].values()) or v[1]}


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(scenarios())
async def test_usage_equals_the_oracle_whatever_the_order(pool: asyncpg.Pool, scenario: dict[str, Any]) -> None:
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {TABLES}")
    p = Projector(pool)
    events, bounds = scenario["events"], [0, *scenario["cuts"], len(scenario["events"])]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            await apply(p, events[lo:hi], scenario["concurrent"])
    expected = oracle(scenario["owner"], scenario["charges"])
    assert nonzero(await read_back(pool), expected) == expected


async def test_a_revision_while_the_org_waits_for_its_customer_counts_once_as_itself(pool: asyncpg.Pool) -> None:
    """Revision 1 arrives while the org's customer is not known, then revision 2 (still not known), then the
    ledger names the customer: every rollup holds revision 2 alone; a third revision after that replaces it."""
    h, cust = HOURS[0], CUSTOMERS[0]
    day, month = date(2026, 10, 31), date(2026, 10, 1)
    p = Projector(pool)
    r1 = charge(h, "r0", org="org-a", value=100, amount=Fraction(1, 3))
    other = charge(h, "r16", org="org-b", value=7, amount=Fraction(2))  # r16 shares r0's shard: same batch
    r2 = charge(h, "r0", org="org-a", value=150, amount=Fraction(5, 7), revision=2)
    assert r1.shard == other.shard
    (first,) = batches([r1, other])
    await p.apply_charges([first])
    await p.apply_charges(batches([r2]))
    assert await read_back(pool) == {}  # nothing counts while nobody is named
    await p.apply_ledger([txn(cust, "usage", 1, occurred_at=h, reading_hour=h, orgs=["org-a"])])
    expected = oracle({("org-a", h): cust}, [r1, other, r2])
    assert (expected[(cust, "day", "resource", day, "r0", "")]) == ({"MB": 150}, Fraction(5, 7))
    assert await read_back(pool) == expected
    # the same facts and charges again change nothing; a newer revision replaces the attributed one
    await p.apply_ledger([txn(cust, "usage", 1, occurred_at=h, reading_hour=h, orgs=["org-a"])])
    await p.apply_charges(batches([r1, other, r2]))
    assert await read_back(pool) == expected
    r3 = charge(h, "r0", org="org-a", value=90, amount=Fraction(1, 1000), revision=3)
    await p.apply_charges(batches([r3]))
    expected = oracle({("org-a", h): cust}, [r1, other, r2, r3])
    assert expected[(cust, "month", "org", month, "org-a", "")] == ({"MB": 90}, Fraction(1, 1000))
    assert nonzero(await read_back(pool), expected) == expected
    # org-b's charge is still waiting, and counts once its customer is named
    await p.apply_ledger([txn(CUSTOMERS[1], "usage", 1, occurred_at=h, reading_hour=h, orgs=["org-b"])])
    expected = oracle({("org-a", h): cust, ("org-b", h): CUSTOMERS[1]}, [r1, other, r2, r3])
    assert expected[(CUSTOMERS[1], "hour", "resource", h, "r16", "")] == ({"MB": 7}, Fraction(2))
    assert nonzero(await read_back(pool), expected) == expected


async def test_the_answers_do_not_depend_on_what_came_before_the_latest_revisions(pool: asyncpg.Pool) -> None:
    """A resource that used nothing in an hour (an app scaled to zero instances: value 0, amount 0) is usage
    of that hour like any other, and stays in its day and month whether or not another resource of the
    customer was revised since: the same latest charges give the same answers in any history."""
    h, cust = HOURS[0], CUSTOMERS[0]
    fact = txn(cust, "usage", 1, occurred_at=h, reading_hour=h, orgs=["org-a"])
    idle = charge(h, "r2", org="org-a", value=0, amount=Fraction(0))
    busy = [charge(h, "r0", org="org-a", value=100 * rev, amount=Fraction(rev, 3), revision=rev) for rev in (1, 2)]
    expected = oracle({("org-a", h): cust}, [idle, *busy])
    assert expected[(cust, "day", "resource", date(2026, 10, 31), "r2", "")] == ({"MB": 0}, Fraction(0))
    answers = []
    for history in ([[idle, busy[1]]], [[busy[0]], [idle, busy[1]]], [[idle, busy[0]], [busy[1]]]):
        async with pool.acquire() as conn:
            await conn.execute(f"TRUNCATE {TABLES}")
        p = Projector(pool)
        await p.apply_ledger([fact])
        for step in history:
            await p.apply_charges(batches(step))
        answers.append(await read_back(pool))
    for answer in answers:
        assert {k: v for k, v in answer.items() if expected.get(k) != v} == {}
        assert {k: v for k, v in expected.items() if answer.get(k) != v} == {}


async def test_a_charge_and_the_fact_that_attributes_it_never_miss_each_other(pool: asyncpg.Pool) -> None:
    """The charges consumer and the ledger consumer (two processes: two projectors) apply a charge and the
    fact naming its org's customer at the same moment, hour after hour: whichever commits first, the charge
    counts once for that customer (neither sees the other's uncommitted row, so they serialise per hour)."""
    charges_side, ledger_side = Projector(pool), Projector(pool)
    cust = CUSTOMERS[1]
    owner: dict[tuple[str, datetime], uuid.UUID] = {}
    items: list[ChargeItem] = []
    first = datetime(2026, 10, 1, 4, tzinfo=UTC)
    for n in range(24):
        h = first + timedelta(hours=n)
        owner[("org-a", h)] = cust
        hour_items = [charge(h, rid, org="org-a", value=n + 1, amount=Fraction(n + 1, 7)) for rid in ("r0", "r2")]
        items += hour_items
        fact = txn(cust, "usage", 1, occurred_at=h, reading_hour=h, orgs=["org-a"])
        await asyncio.gather(charges_side.apply_charges(batches(hour_items)), ledger_side.apply_ledger([fact]))
    async with pool.acquire() as conn:
        rows = await repo.usage_page(
            conn, cust, granularity="hour", dim="resource", first=first, stop=first + timedelta(days=1), after=None,
            limit=1000,
        )
    expected = oracle(owner, items)
    assert {(r.period, r.key): (dict(r.values), r.amount) for r in rows} == {
        (k[3], k[4]): v for k, v in expected.items() if k[1:3] == ("hour", "resource")
    }
    month = await read_back(pool)
    assert month[(cust, "month", "org", date(2026, 10, 1), "org-a", "")] == (
        {"MB": 2 * sum(range(1, 25))}, Fraction(2 * sum(range(1, 25)), 7)
    )


async def test_a_charge_of_a_stored_revision_with_other_content_changes_nothing_and_is_reported(
    pool: asyncpg.Pool,
) -> None:
    """Identity means content: a charge of the revision the read model holds, with another org, value or
    amount, leaves the usage as it was and comes back as a conflict naming the stored charge (for the DLQ);
    the same charge again is a silent redelivery."""
    h, cust = HOURS[0], CUSTOMERS[0]
    p = Projector(pool)
    await p.apply_ledger([txn(cust, "usage", 1, occurred_at=h, reading_hour=h, orgs=["org-a", "org-b"])])
    original = charge(h, "r0", org="org-a", value=100, amount=Fraction(1, 3))
    await p.apply_charges(batches([original]))
    expected = oracle({("org-a", h): cust}, [original])
    assert expected and await read_back(pool) == expected

    forged = charge(h, "r0", org="org-b", value=999, amount=Fraction(5))  # revision 1 as well
    conflicts: list[tuple[int, int, str]] = []
    assert await p.apply_charges(batches([forged]), conflicts) == 0
    mid = measurement_id(h, "cfapps", "r0")
    reason = (
        f"conflict: charge {charge_id(mid, 1)} (measurement {mid}: 2026-11-01T03:00:00Z, cfapps, resource r0) at "
        "revision 1 is stored with other content: org 'org-b' (stored: 'org-a'), value 999 (stored: 100), "
        "amount 5/1 (stored: 1/3); the stored charge is kept"
    )
    assert conflicts == [(0, 0, reason)]
    assert await read_back(pool) == expected
    again: list[tuple[int, int, str]] = []
    assert await p.apply_charges(batches([original]), again) == 0
    assert again == [] and await read_back(pool) == expected
