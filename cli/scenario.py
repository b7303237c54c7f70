"""The demo's built-in scenario, and the oracle that says what the ledger must post for it.

The oracle is computed from the simulator's seed alone (its ``expected_usage``), the scenario's prices and
its org assignments, with exact fractions: for every customer and price, the month's posted microcredits
must equal floor(sum of value × microcredits_per_unit / unit) over that customer's hours.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from fractions import Fraction

from shared.clock import BUSINESS_TZ, month_bounds
from simulator import Foundation

__all__ = [
    "DEMO",
    "SMALL",
    "CorrectionSpec",
    "Expected",
    "ExpectedCorrection",
    "PriceSpec",
    "Scenario",
    "expected_correction",
    "expected_posting",
    "price_at",
]

HOUR = timedelta(hours=1)
CREDIT = 1_000_000


@dataclass(frozen=True)
class PriceSpec:
    meter: str
    resource_kind: str
    unit_of_measure: str
    microcredits_per_unit: int
    unit: int
    valid_from: datetime
    valid_until: datetime | None = None
    # A graduated price (a rate card): (units up to and including, microcredits per unit) per band, the
    # last one open (None); units are value / unit. None: a flat price of microcredits_per_unit.
    bands: tuple[tuple[int | None, int], ...] | None = None
    tier: str | None = None  # the tier the price applies to; None: every customer (global)

    def covers(self, hour: datetime) -> bool:
        return self.valid_from <= hour and (self.valid_until is None or hour < self.valid_until)

    @property
    def key(self) -> tuple[str, str, datetime]:
        return (self.meter, self.resource_kind, self.valid_from)

    def graduated(self, units: Fraction) -> Fraction:
        """f(units) of a graduated price, from its definition: each band's slice at the band's rate."""
        assert self.bands is not None
        total, lower = Fraction(0), Fraction(0)
        for up_to, rate in self.bands:
            top = units if up_to is None else min(units, Fraction(up_to))
            if top > lower:
                total += (top - lower) * rate
            if up_to is not None:
                lower = Fraction(up_to)
        return total


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    orgs: int
    spaces_per_org: int
    apps: int
    services: int
    plans: int
    month: date
    customers: tuple[str, ...] = ("Department of Examples", "Agency for Demonstrations", "Bureau of Samples")
    tier: str = "standard"
    tier_credits: int = 4_000 * CREDIT  # per agreement (a fiscal year); the demo month uses about a fifth
    late_org_index: int = -1  # this org stays unassigned until the middle of the month
    rate_card_customer: int = 2  # on its own tier, with a graduated rate card for the first service plan
    rate_card_tier: str = "metered"
    foundation_cache: dict[str, Foundation] = field(default_factory=dict, compare=False, repr=False)

    @property
    def bounds(self) -> tuple[datetime, datetime]:
        return month_bounds(self.month)

    @property
    def mid_month(self) -> datetime:
        return datetime(self.month.year, self.month.month, 16, tzinfo=BUSINESS_TZ).astimezone(self.bounds[0].tzinfo)

    @property
    def hours(self) -> list[datetime]:
        start, end = self.bounds
        return [start + HOUR * k for k in range(int((end - start) / HOUR))]

    def sim_args(self) -> list[str]:
        return ["--seed", str(self.seed), "--orgs", str(self.orgs), "--spaces-per-org", str(self.spaces_per_org),
                "--apps", str(self.apps), "--services", str(self.services), "--plans", str(self.plans),
                "--start", self.bounds[0].strftime("%Y-%m-%dT%H:%M:%SZ")]

    def foundation(self) -> Foundation:
        if "f" not in self.foundation_cache:
            self.foundation_cache["f"] = Foundation(
                self.seed, self.orgs, self.spaces_per_org, self.apps, self.services, self.plans
            )
        return self.foundation_cache["f"]

    def assignments(self) -> list[tuple[str, int, datetime]]:
        """(org guid, customer index, starts_at): orgs dealt round-robin to the customers from the month's
        start, except the late org, assigned only from mid-month."""
        orgs = sorted(self.foundation().orgs(), key=lambda o: o.name)
        late = orgs[self.late_org_index].guid
        out = []
        for i, org in enumerate(orgs):
            customer = i % len(self.customers)
            out.append((org.guid, customer, self.mid_month if org.guid == late else self.bounds[0]))
        return out

    def tier_of(self, customer: int) -> str:
        return self.rate_card_tier if customer == self.rate_card_customer else self.tier

    def correction(self) -> CorrectionSpec:
        """After the month closed, the memory price of its second half turns out wrong: 1.05 credits per
        GB-month, not 1.10. The range is re-rated and the month's statement amended."""
        return CorrectionSpec(
            "cfapps", "", "MB-hour", 1_050_000, 730 * 1024, self.mid_month, self.bounds[1],
            "memory from the 16th should have been 1.05 credits per GB-month (the 10% raise was 5%)",
        )

    def prices(self) -> list[PriceSpec]:
        """Memory: 1 credit per GB-month (730 h × 1024 MB), raised by 10% from mid-month. Each service plan:
        2, 4, 6… credits per 730 instance-hours."""
        start = self.bounds[0]
        out = [
            PriceSpec("cfapps", "", "MB-hour", 1 * CREDIT, 730 * 1024, start, self.mid_month),
            PriceSpec("cfapps", "", "MB-hour", 1_100_000, 730 * 1024, self.mid_month, None),
        ]
        plans = sorted(self.foundation().plans(), key=lambda p: p.name)
        for k, plan in enumerate(plans):
            out.append(PriceSpec("cfservices", plan.guid, "instance-hour", (k + 1) * 2 * CREDIT, 730, start, None))
        # The rate card of the tier "metered" for the first plan, the month long (a graduated price starts and
        # ends on month boundaries): the first instance-month at 2 credits, up to 5 at 1.5, the rest at 1.
        out.append(PriceSpec(
            "cfservices", plans[0].guid, "instance-hour", 0, 730, start, self.bounds[1],
            bands=((1, 2 * CREDIT), (5, 1_500_000), (None, 1 * CREDIT)), tier=self.rate_card_tier,
        ))
        return out


@dataclass(frozen=True)
class CorrectionSpec:
    """A price corrected after the month closed (``POST /admin/rerate``): the flat rate that should have
    applied to (meter, kind) over [valid_from, valid_until)."""

    meter: str
    resource_kind: str
    unit_of_measure: str
    microcredits_per_unit: int
    unit: int
    valid_from: datetime
    valid_until: datetime
    reason: str


@dataclass
class Expected:
    """What the ledger must show for the month."""

    posted: dict[int, int]                                      # customer index -> microcredits
    by_price: dict[tuple[int, tuple[str, str, datetime]], int]  # (customer, price key) -> microcredits
    by_meter_kind: dict[tuple[int, str, str], int]              # (customer, meter, kind) -> microcredits
    held_measurements: int                                      # measurements of orgs with no customer yet
    measurements: int
    by_org: dict[tuple[int, str], Fraction] = field(default_factory=dict)  # (customer, org) -> exact usage
    exact_by_price: dict[tuple[int, tuple[str, str, datetime]], Fraction] = field(default_factory=dict)
    monthly: dict[int, int] = field(default_factory=dict)  # customer -> posted for graduated prices


def expected_posting(s: Scenario) -> Expected:
    """The oracle, from the seed: exact sums per customer and price, floored once."""
    world = s.foundation()
    assignments = s.assignments()
    prices = s.prices()
    by_org: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for org, customer, starts in assignments:
        by_org[org].append((starts, customer))
    exact: dict[tuple[int, tuple[str, str, datetime]], Fraction] = defaultdict(Fraction)
    units: dict[tuple[int, tuple[str, str, datetime]], Fraction] = defaultdict(Fraction)
    org_usage: dict[tuple[int, str], Fraction] = defaultdict(Fraction)
    held = total = 0
    for hour in s.hours:
        for e in world.expected_usage(hour):
            total += 1
            owners = [c for starts, c in by_org.get(e.org_guid, []) if starts <= hour]
            if not owners:
                held += 1
                continue
            customer = owners[-1]
            price = price_at(prices, e.meter, e.resource_kind, hour, s.tier_of(customer))
            org_usage[(customer, e.org_guid)] += 0
            if price is None:
                continue
            if price.bands is not None:
                units[(customer, price.key)] += Fraction(e.value, price.unit)
                continue
            amount = Fraction(e.value * price.microcredits_per_unit, price.unit)
            exact[(customer, price.key)] += amount
            org_usage[(customer, e.org_guid)] += amount
    monthly: dict[int, int] = defaultdict(int)
    for (customer, key), u in units.items():
        f = next(p for p in prices if p.key == key and p.bands is not None).graduated(u)
        exact[(customer, key)] = f
        monthly[customer] += f.numerator // f.denominator
    by_price = {k: v.numerator // v.denominator for k, v in exact.items()}
    posted: dict[int, int] = defaultdict(int)
    by_meter_kind: dict[tuple[int, str, str], int] = defaultdict(int)
    for (customer, (meter, kind, _)), microcredits in by_price.items():
        posted[customer] += microcredits
        by_meter_kind[(customer, meter, kind)] += microcredits
    return Expected(
        dict(posted), by_price, dict(by_meter_kind), held, total, dict(org_usage), dict(exact), dict(monthly)
    )


def price_at(prices: list[PriceSpec], meter: str, kind: str, hour: datetime, tier: str) -> PriceSpec | None:
    """The price of (meter, kind) at ``hour`` for a customer of ``tier``: its tier's rate card, else the
    global price."""
    found = [p for p in prices if p.meter == meter and p.resource_kind == kind and p.covers(hour)]
    return next((p for p in found if p.tier == tier), None) or next((p for p in found if p.tier is None), None)


@dataclass
class ExpectedCorrection:
    """What the amended statement of each customer must say, from the seed: its used figure before the
    correction, the correction (posted per (customer, month, price): floor of the new exact sum minus floor
    of the old) and the amended used."""

    original: dict[int, int]
    correction: dict[int, int]

    def amended(self, customer: int) -> int:
        return self.original.get(customer, 0) + self.correction.get(customer, 0)


def expected_correction(s: Scenario, expected: Expected) -> ExpectedCorrection:
    """The oracle of the correction: the hours it covers priced again at the corrected rate. For each
    customer, the groups of the prices it replaces lose what they posted for those hours and the
    correction's group posts floor of its exact sum."""
    fix = s.correction()
    world = s.foundation()
    by_org: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for org, customer, starts in s.assignments():
        by_org[org].append((starts, customer))
    replaced_exact: dict[tuple[int, tuple[str, str, datetime]], Fraction] = defaultdict(Fraction)
    corrected_exact: dict[int, Fraction] = defaultdict(Fraction)
    prices = s.prices()
    for hour in s.hours:
        if not fix.valid_from <= hour < fix.valid_until:
            continue
        for e in world.expected_usage(hour):
            if (e.meter, e.resource_kind) != (fix.meter, fix.resource_kind):
                continue
            owners = [c for starts, c in by_org.get(e.org_guid, []) if starts <= hour]
            if not owners:
                continue
            old = price_at(prices, e.meter, e.resource_kind, hour, s.tier_of(owners[-1]))
            assert old is not None and old.bands is None  # the corrected memory prices are flat
            replaced_exact[(owners[-1], old.key)] += Fraction(e.value * old.microcredits_per_unit, old.unit)
            corrected_exact[owners[-1]] += Fraction(e.value * fix.microcredits_per_unit, fix.unit)
    correction: dict[int, int] = defaultdict(int)
    for (customer, key), removed in replaced_exact.items():
        # The replaced price's group keeps what it had outside the corrected hours; floored once per group.
        after = expected.exact_by_price[(customer, key)] - removed
        correction[customer] += after.numerator // after.denominator - expected.by_price[(customer, key)]
    for customer, exact in corrected_exact.items():
        correction[customer] += exact.numerator // exact.denominator
    return ExpectedCorrection(dict(expected.posted), dict(correction))


DEMO = Scenario(
    name="demo", seed=42, orgs=12, spaces_per_org=3, apps=660, services=240, plans=6, month=date(2026, 10, 1)
)
SMALL = Scenario(name="small", seed=7, orgs=6, spaces_per_org=2, apps=60, services=24, plans=3, month=date(2026, 10, 1))
