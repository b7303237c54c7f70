"""Property test of the read model's consumers on the real database: whatever the order, batching,
duplication, revisions, and interleaving (even concurrent) of charges and of the ledger facts that say
which customer an org belonged to, the rollups end up equal to an oracle built with Fractions from the
latest revision of every charge."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api import projector
from shared.contracts import ChargeComputed, TransactionPosted
from shared.db import create_pool, migrate
from tests.support.api_factories import charge, txn

pytestmark = pytest.mark.integration

NY = ZoneInfo("America/New_York")
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "api" / "migrations"
CUSTOMERS = [uuid.UUID(int=0xC1), uuid.UUID(int=0xC2)]
HOURS = [
    datetime(2026, 11, 1, 3, tzinfo=UTC),  # Oct 31, 23:00 EDT
    datetime(2026, 11, 1, 4, tzinfo=UTC),  # Nov 1, 00:00 EDT
    datetime(2026, 11, 1, 6, tzinfo=UTC),  # Nov 1, 01:00 EST (the repeated hour)
]
ORGS = ["org-a", "org-b", "org-c"]
RESOURCES = [(f"r{i}", ORGS[i % 3], "cfservices" if i % 4 == 3 else "cfapps") for i in range(6)]
DENOMINATORS = [1, 3, 7, 730, 1000]


@pytest.fixture
async def pool(database) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database.dsn("api"), "api", max_size=4)
    async with p.acquire() as conn:
        await migrate(conn, "api", MIGRATIONS)
    try:
        yield p
    finally:
        await p.close()


amounts = st.builds(lambda n, d: Fraction(n, d), st.integers(0, 10_000), st.sampled_from(DENOMINATORS))


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    owner = {(o, h): draw(st.sampled_from(CUSTOMERS)) for o in ORGS for h in HOURS}
    charges: list[ChargeComputed] = []
    for rid, org, meter in RESOURCES:
        for h in draw(st.lists(st.sampled_from(HOURS), unique=True, max_size=3)):
            for rev in range(1, draw(st.integers(1, 3)) + 1):
                unit = "instance" if meter == "cfservices" else "MB"
                charges.append(
                    charge(h, rid, org=org, meter=meter, unit=unit, value=draw(st.integers(1, 4096)), amount=draw(amounts), revision=rev, priced=draw(st.booleans()) or rev > 1)
                )
    # The ledger tells most (org, hour) owners, some twice; charges of the others must stay uncounted.
    told = {k: v for k, v in owner.items() if draw(st.integers(0, 5)) > 0}
    facts = [txn(cust, "usage", 1 + i, occurred_at=h, reading_hour=h, orgs=[o]) for i, ((o, h), cust) in enumerate(sorted(told.items()))]
    if facts:
        facts += draw(st.lists(st.sampled_from(facts), max_size=4))
    events: list[tuple[str, Any]] = [("charge", c) for c in charges] + [("charge", c) for c in draw(st.lists(st.sampled_from(charges), max_size=5))] if charges else []
    events += [("fact", f) for f in facts]
    events = draw(st.permutations(events))
    cuts = sorted(draw(st.lists(st.integers(0, len(events)), max_size=6)))
    concurrent = draw(st.booleans())
    return {"owner": told, "charges": charges, "events": events, "cuts": cuts, "concurrent": concurrent}


def oracle(owner: dict[tuple[str, datetime], uuid.UUID], charges: list[ChargeComputed]) -> dict[tuple[Any, ...], tuple[int, Fraction]]:
    latest: dict[uuid.UUID, ChargeComputed] = {}
    for c in charges:
        if c.measurement_id not in latest or c.revision > latest[c.measurement_id].revision:
            latest[c.measurement_id] = c
    out: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, Fraction(0)])
    for c in latest.values():
        cust = owner.get((c.org_id, c.reading_hour))
        if cust is None:
            continue  # the ledger never said whose it is
        local = c.reading_hour.astimezone(NY)
        amount = Fraction(c.amount_numerator, c.amount_denominator) if c.status == "priced" else Fraction(0)
        for key in (
            ("day", cust, local.date(), c.resource_id, c.unit),
            ("month", cust, "org", local.strftime("%Y-%m"), c.org_id, c.unit),
            ("month", cust, "meter", local.strftime("%Y-%m"), c.meter, c.unit),
        ):
            out[key][0] += c.value
            out[key][1] += amount
    return {k: (v[0], v[1]) for k, v in out.items()}


async def read_back(pool: asyncpg.Pool) -> dict[tuple[Any, ...], tuple[int, Fraction]]:
    out: dict[tuple[Any, ...], tuple[int, Fraction]] = {}
    async with pool.acquire() as conn:
        for r in await conn.fetch("SELECT customer_id, day, resource_id, unit, value, amount_num, amount_den FROM usage_day"):
            out[("day", r["customer_id"], r["day"], r["resource_id"], r["unit"])] = (r["value"], Fraction(int(r["amount_num"]), int(r["amount_den"])))
        for r in await conn.fetch(
            "SELECT customer_id, dim, to_char(month, 'YYYY-MM') AS m, key, unit, value, amount_num, amount_den FROM usage_month WHERE dim IN ('org', 'meter')"
        ):
            out[("month", r["customer_id"], r["dim"], r["m"], r["key"], r["unit"])] = (
                r["value"],
                Fraction(int(r["amount_num"]), int(r["amount_den"])),
            )
    return out


async def apply(pool: asyncpg.Pool, batch: list[tuple[str, Any]], concurrent: bool) -> None:
    charges = [e for kind, e in batch if kind == "charge"]
    facts: list[TransactionPosted] = [e for kind, e in batch if kind == "fact"]
    if concurrent:
        await asyncio.gather(projector.apply_charges(pool, charges), projector.apply_ledger(pool, facts))
    else:
        await projector.apply_charges(pool, charges)
        await projector.apply_ledger(pool, facts)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenarios())
async def test_rollups_equal_the_oracle_whatever_the_order(pool, scenario):
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE charge, org_customer_hour, usage_day, usage_month, ledger_transaction, customer, org_info, space_info, resource_info")
    events, bounds = scenario["events"], [0, *scenario["cuts"], len(scenario["events"])]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if hi > lo:
            await apply(pool, events[lo:hi], scenario["concurrent"])
    expected = oracle(scenario["owner"], scenario["charges"])
    got = {k: v for k, v in (await read_back(pool)).items() if v != (0, Fraction(0)) or k in expected}
    assert got == expected
