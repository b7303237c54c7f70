"""The pricer's rules, free of I/O: the price catalog held in memory, exact charges of a batch of
measurements, what a shard already holds, re-pricing, and the readings of ``usage.readings.v1`` as batches.

A charge of a flat price is ``value * microcredits_per_unit / unit`` microcredits, kept exact as an integer
numerator and denominator; nothing is rounded here. The denominator is the price's ``unit`` (so the charges
of one price share it and sum without a common-denominator search), reduced only when the numerator would
exceed the contract's 2**62; an amount that still does is refused. A charge of a graduated or volume price
has amount 0/1: its money depends on the customer's month total of the price, which only the ledger knows;
the charge carries its units (``value / unit``) and the price's bands (``docs/price-models.md``).

State is kept per shard (reading hour, meter, shard of resources): the charge batches published for it,
in order (``seq``). An item's latest charge is the one in the last batch that holds its resource.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from math import gcd
from typing import NamedTuple, cast
from uuid import UUID

import msgspec

from shared.batches import (
    MAX_INT,
    B,
    Band,
    Charges,
    Correction,
    Measurements,
    Ref,
    ShardKey,
    charges_id,
    measurements_id,
    shard_of,
    subset,
)
from shared.batches import (
    Price as PriceRef,
)
from shared.clock import billing_month, month_bounds
from shared.ids import reading_id
from shared.price_models import PriceModel, to_document
from shared.wire import Measurement

__all__ = [
    "MAX_AMOUNT",
    "Assignments",
    "Catalog",
    "InvalidPriceError",
    "Latest",
    "Price",
    "PriceEndOffMonthError",
    "PriceEndRefusedError",
    "PriceNotFoundError",
    "PriceOverlapError",
    "Priced",
    "PricingError",
    "RerateJob",
    "RerateNotFoundError",
    "ShardKey",
    "batches_of_v1",
    "check_end",
    "exact_amount",
    "is_month_boundary",
    "latest_items",
    "price_items",
    "reassign_items",
    "reprice_items",
    "rerate_items",
]

MAX_AMOUNT = MAX_INT


class PricingError(Exception):
    """Base of the pricer's named errors."""


class InvalidPriceError(PricingError):
    """A price that cannot exist (its range is empty, a field out of bounds)."""


class PriceNotFoundError(PricingError):
    """No price has this id."""


class PriceOverlapError(PricingError):
    """The new range overlaps a price of the same (meter, resource kind)."""

    def __init__(self, message: str, conflicts: Sequence[UUID]) -> None:
        super().__init__(message)
        self.conflicts = list(conflicts)


class PriceEndOffMonthError(PricingError):
    """A graduated or volume price ended at an instant that is not a billing-month boundary: its bands
    apply to a customer's month total, so it starts and ends only on one (docs/price-models.md)."""


class RerateNotFoundError(PricingError):
    """No re-rating job has this id."""


class PriceEndRefusedError(PricingError):
    """Ending the price at that time would contradict its range or charges already priced with it."""


@dataclass(frozen=True, slots=True)
class Price:
    """``microcredits_per_unit`` per ``unit`` of a meter's quantity, valid in [valid_from, valid_until); or,
    for a graduated or volume ``model`` (``shared.price_models``), its bands per ``unit`` (the rate is then 0).
    ``model`` defaults to the flat model of ``microcredits_per_unit``."""

    id: UUID
    meter: str
    resource_kind: str
    unit_of_measure: str
    microcredits_per_unit: int
    unit: int
    valid_from: datetime
    valid_until: datetime | None
    created_at: datetime
    model: PriceModel = None  # type: ignore[assignment]  # set to the flat model in __post_init__
    correction: bool = False  # a price correction: applies in its range in place of the ordinary prices
    scope_kind: str = "global"  # "global", "tier" or "customer" (a rate card: docs/price-models.md, section 7)
    scope_id: str = ""  # the tier's name or the customer's id; "" for global
    ref: PriceRef = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if cast(object, self.model) is None:
            object.__setattr__(self, "model", PriceModel.flat(self.microcredits_per_unit))
        object.__setattr__(self, "ref", _ref(self))

    @property
    def flat(self) -> bool:
        return self.model.model == "flat"

    def covers(self, at: datetime) -> bool:
        return self.valid_from <= at and (self.valid_until is None or at < self.valid_until)


def _ref(p: Price) -> PriceRef:
    """A price's terms as a charges batch names them: a flat price's are the v2 terms (no model written)."""
    if p.model.model == "flat":
        return PriceRef(p.id, p.microcredits_per_unit, p.unit)
    bands = to_document(p.model)["bands"]
    assert isinstance(bands, list)
    return PriceRef(p.id, 0, p.unit, p.model.model, [Band(**b) for b in bands])


def is_month_boundary(moment: datetime) -> bool:
    """Whether ``moment`` is the start of a billing month (midnight America/New_York on the 1st)."""
    return month_bounds(billing_month(moment))[0] == moment


_Series = dict[tuple[str, str], tuple[list[datetime], list[Price]]]


def _series_of(prices: Iterable[Price]) -> _Series:
    by_key: dict[tuple[str, str], list[Price]] = {}
    for p in prices:
        by_key.setdefault((p.meter, p.resource_kind), []).append(p)
    out: _Series = {}
    for key, series in by_key.items():
        series.sort(key=lambda p: p.valid_from)
        out[key] = ([p.valid_from for p in series], series)
    return out


def _find(series: _Series, meter: str, resource_kind: str, at: datetime) -> Price | None:
    found = series.get((meter, resource_kind))
    if found is None:
        return None
    starts, prices = found
    i = bisect.bisect_right(starts, at) - 1
    if i >= 0 and prices[i].covers(at):
        return prices[i]
    return None


class Scope(NamedTuple):
    """Who an org belongs to at an hour: its customer (id as text) and that customer's tier."""

    customer: str
    tier: str


class Assignments:
    """The org assignments the ledger published (``ledger.assignments.v1``), in memory: an org belongs to
    the customer of its assignment with the greatest ``starts_at`` <= the hour. ``version``: the database's
    ``assignments_state`` version it was loaded at."""

    def __init__(self, rows: Iterable[tuple[str, datetime, str, str]], version: int = 0) -> None:
        self.version = version
        by_org: dict[str, list[tuple[datetime, Scope]]] = {}
        for org, starts, customer, tier in rows:
            by_org.setdefault(org, []).append((starts, Scope(customer, tier)))
        self._orgs: dict[str, tuple[list[datetime], list[Scope]]] = {}
        for org, items in by_org.items():
            items.sort(key=lambda t: t[0])
            self._orgs[org] = ([t[0] for t in items], [t[1] for t in items])

    def __len__(self) -> int:
        return sum(len(v[0]) for v in self._orgs.values())

    def at(self, org_id: str, at: datetime) -> Scope | None:
        """The org's customer and tier at instant ``at`` (None: no assignment covers it)."""
        found = self._orgs.get(org_id)
        if found is None:
            return None
        i = bisect.bisect_right(found[0], at) - 1
        return found[1][i] if i >= 0 else None

    def around(self, org_id: str, starts_at: datetime) -> tuple[Scope | None, datetime | None]:
        """The org's scope just before ``starts_at`` (None: none) and when its next assignment after
        ``starts_at`` starts (None: none)."""
        found = self._orgs.get(org_id)
        if found is None:
            return None, None
        starts, scopes = found
        i = bisect.bisect_left(starts, starts_at)
        before = scopes[i - 1] if i > 0 else None
        j = bisect.bisect_right(starts, starts_at)
        return before, starts[j] if j < len(starts) else None


NO_ASSIGNMENTS = Assignments(())


class Catalog:
    """The prices in memory, found by (meter, kind) and a bisection on ``valid_from``; ``version`` is the
    database's catalog version it was loaded at. A price correction (``Price.correction``) covering an
    instant wins over every other price of that instant; then the price of the org's customer, then its
    tier's, then the global one (a rate card: docs/price-models.md, section 7). Corrections of one key never
    overlap, nor do the ordinary prices of one scope: the database enforces both."""

    def __init__(self, prices: Iterable[Price], version: int = 0) -> None:
        self.version = version
        prices = list(prices)
        self._series = _series_of(p for p in prices if not p.correction and p.scope_kind == "global")
        self._corrections = _series_of(p for p in prices if p.correction)
        scoped: dict[tuple[str, str], list[Price]] = {}
        for p in prices:
            if not p.correction and p.scope_kind != "global":
                scoped.setdefault((p.scope_kind, p.scope_id), []).append(p)
        self._scoped = {k: _series_of(v) for k, v in scoped.items()}
        self._scoped_prices = scoped
        self.scoped_meters = frozenset(p.meter for v in scoped.values() for p in v)

    def __len__(self) -> int:
        return sum(len(s[1]) for s in (*self._series.values(), *self._corrections.values())) + sum(
            len(v) for v in self._scoped_prices.values()
        )

    def scoped_prices(self, scope: Scope) -> list[Price]:
        """The customer's and its tier's prices (any meter, kind and range)."""
        return [*self._scoped_prices.get(("customer", scope.customer), ()),
                *self._scoped_prices.get(("tier", scope.tier), ())]

    def price_at(self, meter: str, resource_kind: str, at: datetime, scope: Scope | None = None) -> Price | None:
        """The price of (meter, kind) valid at instant ``at`` for an org of ``scope`` (None: an org without a
        customer then): its correction if one covers it, else the customer's, the tier's, the global one."""
        if self._corrections:
            corrected = _find(self._corrections, meter, resource_kind, at)
            if corrected is not None:
                return corrected
        if scope is not None and self._scoped:
            for key in (("customer", scope.customer), ("tier", scope.tier)):
                series = self._scoped.get(key)
                if series is not None:
                    found = _find(series, meter, resource_kind, at)
                    if found is not None:
                        return found
        return _find(self._series, meter, resource_kind, at)


def exact_amount(value: int, microcredits_per_unit: int, unit: int) -> tuple[int, int]:
    """``value * microcredits_per_unit / unit`` as (numerator, denominator): over ``unit``, or in lowest
    terms when the numerator over ``unit`` would exceed 2**62."""
    product = value * microcredits_per_unit
    if product <= MAX_AMOUNT:
        return product, unit
    g = gcd(product, unit)
    return product // g, unit // g


@dataclass(slots=True)
class Priced:
    """A charges batch priced in memory, with its counts, and the input items it refused (positions)."""

    message: Charges | None
    priced: int = 0
    unpriced: int = 0
    revisions: int = 0
    price_ids: set[UUID] = field(default_factory=set)
    unpriced_kinds: set[str] = field(default_factory=set)
    rejects: list[tuple[int, str]] = field(default_factory=list)


def price_items(
    m: B,
    positions: Sequence[int] | None,
    catalog: Catalog,
    priced_at: datetime,
    revisions: Sequence[int] | None = None,
    assignments: Assignments = NO_ASSIGNMENTS,
) -> Priced:
    """Price the items of ``m`` (those at ``positions``, or all) with the price of their kind valid at the
    reading hour, as revision 1 (or ``revisions``, one per item priced). Items whose amount exceeds 2**62
    are refused. Column at a time: a batch holds few kinds, so a price is looked up per kind, not per
    item; when the meter has tier or customer prices, per (org, kind) of the batch (its org's scope at the
    hour from ``assignments``), still not per item."""
    if positions is not None and len(positions) != len(m.resource_id):
        origin = list(positions)
        m = subset(m, origin)
    else:
        origin = list(range(len(m.resource_id)))
    hour, meter = m.reading_hour, m.meter
    refs: list[PriceRef] = []
    found: list[Price] = []
    kinds = m.kind
    if meter not in catalog.scoped_meters:
        price_of_kind: list[int] = []  # kind position -> position in `refs`, or -1
        for kind in m.kinds:
            p = catalog.price_at(meter, kind, hour)
            if p is None:
                price_of_kind.append(-1)
            else:
                price_of_kind.append(len(refs))
                refs.append(p.ref)
                found.append(p)
        # A graduated or volume price has rate 0 and its items amount 0/1: the ledger prices the month's total.
        mpu = [0 if p < 0 or not found[p].flat else refs[p].microcredits_per_unit for p in price_of_kind]
        unit = [1 if p < 0 or not found[p].flat else refs[p].unit for p in price_of_kind]
        price = [price_of_kind[k] for k in kinds]
        nums = [v * mpu[k] for v, k in zip(m.value, kinds, strict=True)]
        dens = [unit[k] for k in kinds]
    else:
        # Rate cards: the price per (org, kind) pair of the batch, each resolved once.
        position: dict[UUID, int] = {}  # price id -> position in `refs`
        pair: dict[tuple[int, int], int] = {}  # (org position, kind position) -> position in `refs`, or -1
        scopes: dict[int, Scope | None] = {}
        for o, k in dict.fromkeys(zip(m.org, kinds, strict=True)):  # the distinct pairs, in order of first use
            if o not in scopes:
                scopes[o] = assignments.at(m.orgs[o].id, hour)
            p = catalog.price_at(meter, m.kinds[k], hour, scopes[o])
            if p is None:
                pair[(o, k)] = -1
                continue
            at = position.get(p.id)
            if at is None:
                at = position[p.id] = len(refs)
                refs.append(p.ref)
                found.append(p)
            pair[(o, k)] = at
        price = [pair[(o, k)] for o, k in zip(m.org, kinds, strict=True)]
        # Per price, with a last entry for "unpriced" (position -1): rate 0 over 1.
        rate = [0 if not f.flat else r.microcredits_per_unit for f, r in zip(found, refs, strict=True)] + [0]
        per = [1 if not f.flat else r.unit for f, r in zip(found, refs, strict=True)] + [1]
        nums = [v * rate[p] for v, p in zip(m.value, price, strict=True)]
        dens = [per[p] for p in price]
    out = Priced(None)
    if nums and max(nums) > MAX_AMOUNT:
        keep = []
        for i, (num, den) in enumerate(zip(nums, dens, strict=True)):
            if num > MAX_AMOUNT:
                g = gcd(num, den)
                num, den = num // g, den // g
                if num > MAX_AMOUNT:
                    out.rejects.append((origin[i], f"charge of {num}/{den} microcredits exceeds 2**62"))
                    continue
                nums[i], dens[i] = num, den
            keep.append(i)
        if len(keep) < len(nums):
            m = subset(m, keep)
            price, nums, dens = [price[i] for i in keep], [nums[i] for i in keep], [dens[i] for i in keep]
            if revisions is not None:
                revisions = [revisions[i] for i in keep]
    n = len(price)
    if not n:
        return out
    out.unpriced = price.count(-1)
    out.priced = n - out.unpriced
    if out.unpriced:
        out.unpriced_kinds = {m.kinds[k] for k, p in zip(m.kind, price, strict=True) if p < 0}
    revs = [1] * n if revisions is None else list(revisions)
    out.revisions = sum(revs)
    out.price_ids = {found[p].id for p in set(price) if p >= 0}
    out.message = Charges(
        id=charges_id(m.reading_hour, m.meter, m.shard, m.resource_id, revs),
        reading_hour=m.reading_hour,
        meter=m.meter,
        unit=m.unit,
        shard=m.shard,
        priced_at=priced_at,
        orgs=m.orgs,
        spaces=m.spaces,
        kinds=m.kinds,
        prices=refs,
        resource_id=m.resource_id,
        resource_name=m.resource_name,
        org=m.org,
        space=m.space,
        kind=m.kind,
        value=m.value,
        estimated=m.estimated,
        revision=revs,
        price=price,
        amount_numerator=nums,
        amount_denominator=dens,
    )
    return out


class Latest(NamedTuple):
    """Where a resource's latest charge of a shard is: the stored batch (position in the list given to
    ``latest_items``) and the item in it."""

    batch: int
    item: int
    revision: int


def latest_items(stored: Sequence[Charges]) -> dict[str, Latest]:
    """Per resource, its latest charge among the shard's stored batches (in ``seq`` order; a higher
    revision wins, so a batch stored out of order cannot bring an older revision back)."""
    latest: dict[str, Latest] = {}
    for b, c in enumerate(stored):
        for i, (rid, rev) in enumerate(zip(c.resource_id, c.revision, strict=True)):
            have = latest.get(rid)
            if have is None or rev > have.revision:
                latest[rid] = Latest(b, i, rev)
    return latest


def reprice_items(
    stored: Sequence[Charges],
    catalog: Catalog,
    priced_at: datetime,
    kinds: set[str] | None = None,
    assignments: Assignments = NO_ASSIGNMENTS,
) -> Priced | None:
    """The next revision of every item of the shard whose latest charge is unpriced and that a price now
    covers (only those of ``kinds`` when given), as one batch; None when there is none. Items a price
    correction covers are left to its re-rating job (its revisions carry the correction)."""
    latest = latest_items(stored)
    chosen: dict[int, list[tuple[int, int]]] = {}  # batch -> [(item, next revision)]
    for at in latest.values():
        c = stored[at.batch]
        if c.price[at.item] >= 0:
            continue
        kind = c.kinds[c.kind[at.item]]
        if kinds is not None and kind not in kinds:
            continue
        scope = assignments.at(c.orgs[c.org[at.item]].id, c.reading_hour)
        covering = catalog.price_at(c.meter, kind, c.reading_hour, scope)
        if covering is None or covering.correction:  # a correction's re-rating job prices those, marked as such
            continue
        chosen.setdefault(at.batch, []).append((at.item, at.revision + 1))
    if not chosen:
        return None
    # One batch out: the chosen items regrouped under the tables of the first stored batch that holds
    # one (the tables of the others are merged in by value).
    merged = _merge([(stored[b], items) for b, items in sorted(chosen.items())])
    return price_items(merged, None, catalog, priced_at, revisions=merged.revision, assignments=assignments)


def reassign_items(
    stored: Sequence[Charges],
    catalog: Catalog,
    priced_at: datetime,
    assignments: Assignments,
    org_id: str,
    since: datetime,
) -> tuple[Priced | None, set[str]]:
    """After an assignment of ``org_id`` from ``since``: the next revision of every latest charge of the org in
    the shard (hour >= ``since``) whose price is no longer the one the catalog resolves for it (a tier or
    customer price now applies, or no longer does), as one batch; and the kinds of those items that were
    unpriced before. Items a correction covers are left to it; an item no price covers now keeps its price.
    (None, set()) when there is none."""
    latest = latest_items(stored)
    chosen: dict[int, list[tuple[int, int]]] = {}
    was_unpriced: set[str] = set()
    for at in latest.values():
        c = stored[at.batch]
        if c.reading_hour < since or c.orgs[c.org[at.item]].id != org_id:
            continue
        kind = c.kinds[c.kind[at.item]]
        now = catalog.price_at(c.meter, kind, c.reading_hour, assignments.at(org_id, c.reading_hour))
        if now is None or now.correction:
            continue
        p = c.price[at.item]
        if p >= 0 and c.prices[p].id == now.id:
            continue
        if p < 0:
            was_unpriced.add(kind)
        chosen.setdefault(at.batch, []).append((at.item, at.revision + 1))
    if not chosen:
        return None, set()
    merged = _merge([(stored[b], items) for b, items in sorted(chosen.items())])
    return price_items(merged, None, catalog, priced_at, revisions=merged.revision, assignments=assignments), (
        was_unpriced
    )


@dataclass(frozen=True, slots=True)
class RerateJob:
    """A re-rating (``POST /internal/rerates``): the correction ``price`` of (meter, kind) over [valid_from,
    valid_until) and the re-pricing of the range's latest charges with it. ``total``: measurements of the meter
    in the range; ``done``: of them, looked at; ``repriced``: charges given a new revision; ``refused``: left
    as they were because their amount would exceed 2**62. ``after``: the last (reading hour, shard) done."""

    id: UUID
    price: Price
    reason: str
    state: str
    failure: str | None
    total: int
    done: int
    repriced: int
    refused: int
    after: tuple[datetime, int] | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def meter(self) -> str:
        return self.price.meter

    @property
    def resource_kind(self) -> str:
        return self.price.resource_kind


def rerate_items(
    stored: Sequence[Charges], catalog: Catalog, priced_at: datetime, correction: Price, ref: Correction
) -> tuple[Priced | None, int]:
    """The next revision of every item of the shard of the correction's kind whose latest charge is not priced
    with ``correction`` yet (an item that already is, after a restart or a concurrent re-pricing, is left as
    it is), priced with the catalog (which resolves the range's hours to the correction), as one batch
    carrying ``ref``; and how many of the items in it were unpriced before. (None, 0) when there is none."""
    latest = latest_items(stored)
    chosen: dict[int, list[tuple[int, int]]] = {}  # batch -> [(item, next revision)]
    was_unpriced: set[str] = set()
    for rid, at in latest.items():
        c = stored[at.batch]
        if c.kinds[c.kind[at.item]] != correction.resource_kind:
            continue
        p = c.price[at.item]
        if p >= 0 and c.prices[p].id == correction.id:
            continue
        found = catalog.price_at(c.meter, correction.resource_kind, c.reading_hour)
        if found is None or found.id != correction.id:
            continue
        if p < 0:
            was_unpriced.add(rid)
        chosen.setdefault(at.batch, []).append((at.item, at.revision + 1))
    if not chosen:
        return None, 0
    merged = _merge([(stored[b], items) for b, items in sorted(chosen.items())])
    priced = price_items(merged, None, catalog, priced_at, revisions=merged.revision)
    if priced.message is None:
        return priced, 0
    priced.message = msgspec.structs.replace(priced.message, correction=ref)
    return priced, len(was_unpriced.intersection(priced.message.resource_id))


def _merge(parts: Sequence[tuple[Charges, list[tuple[int, int]]]]) -> Charges:
    """Items from several batches of one shard as one batch (tables rebuilt), with their next revisions."""
    orgs: dict[Ref, int] = {}
    spaces: dict[Ref, int] = {}
    kinds: dict[str, int] = {}
    cols: dict[str, list[object]] = {k: [] for k in ("resource_id", "resource_name", "org", "space", "kind", "value",
                                                     "estimated", "revision")}
    first = parts[0][0]
    for c, items in parts:
        for i, rev in sorted(items, key=lambda t: c.resource_id[t[0]]):
            cols["resource_id"].append(c.resource_id[i])
            cols["resource_name"].append(c.resource_name[i])
            cols["org"].append(orgs.setdefault(c.orgs[c.org[i]], len(orgs)))
            cols["space"].append(spaces.setdefault(c.spaces[c.space[i]], len(spaces)))
            cols["kind"].append(kinds.setdefault(c.kinds[c.kind[i]], len(kinds)))
            cols["value"].append(c.value[i])
            cols["estimated"].append(c.estimated[i])
            cols["revision"].append(rev)
    n = len(cols["resource_id"])
    return Charges(
        id=first.id,
        reading_hour=first.reading_hour,
        meter=first.meter,
        unit=first.unit,
        shard=first.shard,
        priced_at=first.priced_at,
        orgs=list(orgs),
        spaces=list(spaces),
        kinds=list(kinds),
        prices=[],
        price=[-1] * n,
        amount_numerator=[0] * n,
        amount_denominator=[1] * n,
        **cols,  # type: ignore[arg-type]
    )


def _v1_content(m: Measurement) -> tuple[object, ...]:
    """``shared.batches.content`` of a ``usage.readings.v1`` measurement."""
    return (m.unit, m.org_id, m.space_id, m.resource_kind, m.value, m.estimated)


def batches_of_v1(items: Sequence[Measurement]) -> list[tuple[Measurements, list[int]]]:
    """Measurements of ``usage.readings.v1`` (one each) as batches, one per (hour, meter, shard, unit),
    each with the positions in ``items`` its items came from. A measurement repeated with the same content
    keeps its first copy (ids are deterministic: a repeat is the same fact); a copy with other content is
    put in a batch after all the first copies, so that it meets the first copy as stored and is refused
    as a conflict (``shared.batches.CONFLICT``)."""
    first: dict[tuple[datetime, str, str], tuple[object, ...]] = {}
    firsts: list[int] = []
    later: list[int] = []
    for n, m in enumerate(items):
        key = (m.reading_hour, m.meter, m.resource_id)
        have = first.get(key)
        if have is None:
            first[key] = _v1_content(m)
            firsts.append(n)
        elif have != _v1_content(m):
            later.append(n)
    out = _v1_groups(items, firsts)
    if later:  # rare: the other copies, as batches of their own (positions mapped back into ``items``)
        out += [(b, [later[i] for i in kept]) for b, kept in batches_of_v1([items[n] for n in later])]
    return out


def _v1_groups(items: Sequence[Measurement], positions: Sequence[int]) -> list[tuple[Measurements, list[int]]]:
    """The measurements at ``positions`` (distinct) as batches, one per (hour, meter, shard, unit)."""
    groups: dict[tuple[datetime, str, int, str], list[int]] = {}
    for n in positions:
        m = items[n]
        groups.setdefault((m.reading_hour, m.meter, shard_of(m.resource_id), m.unit), []).append(n)
    out: list[tuple[Measurements, list[int]]] = []
    for (hour, meter, shard, unit), members in groups.items():
        orgs: dict[Ref, int] = {}
        spaces: dict[Ref, int] = {}
        kinds: dict[str, int] = {}
        kept = sorted(members, key=lambda n: items[n].resource_id)
        cols: dict[str, list[object]] = {k: [] for k in ("resource_id", "resource_name", "org", "space", "kind",
                                                         "value", "estimated")}
        for n in kept:
            m = items[n]
            cols["resource_id"].append(m.resource_id)
            cols["resource_name"].append(m.resource_name)
            cols["org"].append(orgs.setdefault(Ref(m.org_id, m.org_name), len(orgs)))
            cols["space"].append(spaces.setdefault(Ref(m.space_id, m.space_name), len(spaces)))
            cols["kind"].append(kinds.setdefault(m.resource_kind, len(kinds)))
            cols["value"].append(m.value)
            cols["estimated"].append(m.estimated)
        rids: list[str] = cols["resource_id"]  # type: ignore[assignment]
        batch = Measurements(
            id=measurements_id(hour, meter, shard, rids),
            reading_id=reading_id(hour),
            reading_hour=hour,
            meter=meter,
            unit=unit,
            shard=shard,
            taken_at=max(items[n].taken_at for n in kept),
            orgs=list(orgs),
            spaces=list(spaces),
            kinds=list(kinds),
            **cols,  # type: ignore[arg-type]
        )
        out.append((batch, kept))
    return out


def check_end(price: Price, at: datetime, last_priced_hour: datetime | None) -> bool:
    """Whether ending ``price`` at ``at`` changes it (False: it already ends exactly then).

    Raises PriceEndRefusedError when ``at`` is not after its start, later than its current end, or
    not after the last hour already priced with it (history that was charged is not rewritten)."""
    if at <= price.valid_from:
        raise PriceEndRefusedError(
            f"a price can only end after it starts ({price.valid_from.isoformat()}); got {at.isoformat()}"
        )
    if price.valid_until is not None:
        if at == price.valid_until:
            return False
        if at > price.valid_until:
            raise PriceEndRefusedError(
                f"the price already ends at {price.valid_until.isoformat()}; it can only be ended earlier"
            )
    if last_priced_hour is not None and last_priced_hour >= at:
        raise PriceEndRefusedError(
            f"the price already priced charges up to the hour {last_priced_hour.isoformat()}; "
            "end it after that hour (charged history is not rewritten)"
        )
    return True
