"""Charges as the api's read model keeps them, free of I/O: per shard of resources (reading hour, meter,
shard) a document with the latest revision of each measurement, and the rollups the usage queries read.

- A shard document (``ShardDoc``) holds, per measurement, its org, space, kind, unit, value, revision and
  exact amount. A charges batch for a shard with no document becomes its document as it is; otherwise its
  items replace those with an older revision (an older or equal revision changes nothing). An item of
  the revision it holds but with other content (org, space, kind, unit, value or exact amount: what the
  document keeps) is a conflict: it changes nothing and is reported, for the DLQ.
- A charge counts for a customer once the ledger has said, in a usage line, that its org belonged to that
  customer in its reading hour (``org_customer_hour``). ``Rollup`` sums what counts: per group (org, space,
  meter, kind) and hour, day and month in rows; per resource and day in documents per (customer, day,
  meter), a month being read as its days. A replaced revision is taken back out (sign -1) before the new
  one goes in.
- Amounts stay exact: per cell, numerators summed per denominator, combined over their lcm only when
  written.
- An item of a graduated or volume price has no amount of its own (0/1 in ``usage.charges.v3``: its money
  depends on the customer's month total, which the ledger posts). The document marks it (column ``m``:
  1 = priced on the month's total, "monthly"), and its cells are kept apart from exactly priced ones
  (``priced`` = ``exact`` | ``monthly`` in every rollup key), so they are answered with units, never as
  costing 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from math import gcd, lcm
from typing import Any
from uuid import UUID

import orjson

from shared.batches import CONFLICT, Charges, ShardKey, hour_text
from shared.clock import BUSINESS_TZ, as_utc
from shared.ids import charge_id, measurement_id

__all__ = [
    "EXACT",
    "MONTHLY",
    "PRICED",
    "Part",
    "ResourceDoc",
    "Rollup",
    "ShardDoc",
    "contributions",
    "exact",
    "monthly_flags",
    "ny_day",
    "ny_month",
]


@functools.lru_cache(maxsize=8192)  # charges come an hour at a time: the same few hours, over and over
def ny_day(moment: datetime) -> date:
    """The America/New_York calendar day containing ``moment``."""
    return as_utc(moment).astimezone(BUSINESS_TZ).date()


@functools.lru_cache(maxsize=8192)
def ny_month(moment: datetime) -> date:
    local = as_utc(moment).astimezone(BUSINESS_TZ)
    return date(local.year, local.month, 1)


def exact(by_den: dict[int, int]) -> tuple[int, int]:
    """Numerators summed per denominator as one fraction (numerator, denominator), reduced."""
    common = 1
    for den in by_den:
        common = lcm(common, den)
    num = sum(n * (common // d) for d, n in by_den.items())
    g = gcd(num, common) or 1
    return num // g, common // g


_COLUMNS = ("r", "o", "s", "k", "u", "x", "v", "n", "d", "m")

EXACT = "exact"
MONTHLY = "monthly"
PRICED = (EXACT, MONTHLY)  # by the ``m`` flag: 0 exact, 1 monthly


def monthly_flags(c: Charges) -> list[int]:
    """Per item of ``c``: 1 when its price is graduated or volume (priced on the month's total), else 0."""
    flags = [0 if p.model == "flat" else 1 for p in c.prices]
    if not any(flags):
        return [0] * len(c.resource_id)
    return [flags[p] if p >= 0 else 0 for p in c.price]


@dataclass
class ShardDoc:
    """The latest charge of every measurement of one shard, as columns with dictionaries (orgs, spaces,
    kinds, units)."""

    orgs: list[str]
    spaces: list[str]
    kinds: list[str]
    units: list[str]
    r: list[str]  # resource id
    o: list[int]
    s: list[int]
    k: list[int]
    u: list[int]
    x: list[int]  # value
    v: list[int]  # revision
    n: list[int]  # amount numerator
    d: list[int]  # amount denominator
    m: list[int]  # 1: priced on the month's total (graduated or volume; amount 0/1), 0: exact

    @classmethod
    def of(cls, c: Charges) -> ShardDoc:
        """A charges batch (its items distinct) as the document of a shard that had none."""
        return cls(
            orgs=[o.id for o in c.orgs], spaces=[s.id for s in c.spaces], kinds=list(c.kinds), units=[c.unit],
            r=list(c.resource_id), o=list(c.org), s=list(c.space), k=list(c.kind), u=[0] * len(c.resource_id),
            x=list(c.value), v=list(c.revision), n=list(c.amount_numerator), d=list(c.amount_denominator),
            m=monthly_flags(c),
        )

    @classmethod
    def load(cls, raw: bytes) -> ShardDoc:
        cols = orjson.loads(raw)
        if "m" not in cols:  # a document written before price models: all exact
            cols["m"] = [0] * len(cols["r"])
        return cls(**cols)

    def dump(self) -> bytes:
        return orjson.dumps(
            {"orgs": self.orgs, "spaces": self.spaces, "kinds": self.kinds, "units": self.units,
             **{c: getattr(self, c) for c in _COLUMNS}}
        )

    def __len__(self) -> int:
        return len(self.r)

    def merge(self, c: Charges, conflicts: list[tuple[int, str]] | None = None) -> tuple[list[int], list[int]]:
        """Put the items of ``c`` that are newer than what the document holds into it. Returns the
        positions (in the document, after the merge) of the replaced items as they were (in ``old``, a
        copy taken by the caller) and of the new or replaced ones: ``(replaced_old, changed)``. Items of
        the revision held with other content are appended to ``conflicts`` (item position, reason)."""
        where = {rid: i for i, rid in enumerate(self.r)}
        org_at = _indexer(self.orgs)
        space_at = _indexer(self.spaces)
        kind_at = _indexer(self.kinds)
        unit_at = _indexer(self.units)
        unit = unit_at(c.unit)
        monthly = monthly_flags(c)
        replaced: list[int] = []
        changed: list[int] = []
        for i, rid in enumerate(c.resource_id):
            at = where.get(rid)
            if at is not None and self.v[at] >= c.revision[i]:
                if conflicts is not None and self.v[at] == c.revision[i]:
                    why = self._conflict(at, c, i)
                    if why is not None:
                        conflicts.append((i, why))
                continue
            values = (
                org_at(c.orgs[c.org[i]].id), space_at(c.spaces[c.space[i]].id), kind_at(c.kinds[c.kind[i]]), unit,
                c.value[i], c.revision[i], c.amount_numerator[i], c.amount_denominator[i], monthly[i],
            )
            if at is None:
                at = where[rid] = len(self.r)
                self.r.append(rid)
                for col, value in zip(_COLUMNS[1:], values, strict=True):
                    getattr(self, col).append(value)
            else:
                replaced.append(at)
                for col, value in zip(_COLUMNS[1:], values, strict=True):
                    getattr(self, col)[at] = value
            changed.append(at)
        return replaced, changed

    def _conflict(self, at: int, c: Charges, i: int) -> str | None:
        """Why item ``i`` of ``c`` conflicts with the document's item ``at`` of the same revision (None: the
        same content, a redelivery)."""
        pairs = (
            ("org", c.orgs[c.org[i]].id, self.orgs[self.o[at]]),
            ("space", c.spaces[c.space[i]].id, self.spaces[self.s[at]]),
            ("kind", c.kinds[c.kind[i]], self.kinds[self.k[at]]),
            ("unit", c.unit, self.units[self.u[at]]),
            ("value", c.value[i], self.x[at]),
        )
        diffs = [f"{name} {new!r} (stored: {old!r})" for name, new, old in pairs if new != old]
        num, den = c.amount_numerator[i], c.amount_denominator[i]
        if num * self.d[at] != self.n[at] * den:
            diffs.append(f"amount {num}/{den} (stored: {self.n[at]}/{self.d[at]})")
        if not diffs:
            return None
        rid, rev = c.resource_id[i], c.revision[i]
        mid = measurement_id(c.reading_hour, c.meter, rid)
        return (
            f"{CONFLICT} charge {charge_id(mid, rev)} (measurement {mid}: {hour_text(c.reading_hour)}, {c.meter}, "
            f"resource {rid}) at revision {rev} is stored with other content: {', '.join(diffs)}; the stored "
            "charge is kept"
        )

    def copy(self) -> ShardDoc:
        return ShardDoc(
            list(self.orgs), list(self.spaces), list(self.kinds), list(self.units),
            *(list(getattr(self, c)) for c in _COLUMNS),
        )


def _indexer(table: list[str]) -> Callable[[str], int]:
    index = {v: i for i, v in enumerate(table)}

    def at(value: str) -> int:
        i = index.get(value)
        if i is None:
            i = index[value] = len(table)
            table.append(value)
        return i

    return at


# (customer, period, meter) -> resource document
ResourceKey = tuple[UUID, date, str]
# Charges as the per-resource documents take them: columns of resource, unit, value, numerator, denominator,
# monthly flag.
ResourceEntries = tuple[list[str], list[str], list[int], list[int], list[int], list[int]]
_RESOURCE_COLUMNS = ("r", "u", "x", "n", "d", "p")


class ResourceDoc:
    """Usage per (resource, unit, priced) of one customer, period (day or month) and meter: value and exact
    amount, as the columns it is stored as: {"r": [...], "u": [...], "x": [...], "n": [...], "d": [...],
    "p": [...]} (``p``: 1 for usage priced on the month's total, whose amount is 0). Merged in place (a
    customer's resources come back hour after hour: most entries update a cell)."""

    def __init__(self, columns: dict[str, list[Any]] | None = None) -> None:
        self.c = columns if columns is not None else {k: [] for k in _RESOURCE_COLUMNS}

    @classmethod
    def load(cls, raw: bytes) -> ResourceDoc:
        cols = orjson.loads(raw)
        if "p" not in cols:  # written before price models: all exact
            cols["p"] = [0] * len(cols["r"])
        return cls(cols)

    def dump(self) -> bytes:
        return orjson.dumps(self.c)

    @property
    def cells(self) -> dict[tuple[str, str, int], list[int]]:
        """(resource, unit, monthly flag) -> [value, numerator, denominator]."""
        c = self.c
        return {
            (r, u, p): [x, n, d]
            for r, u, x, n, d, p in zip(c["r"], c["u"], c["x"], c["n"], c["d"], c["p"], strict=True)
        }

    def add(self, entries: Sequence[ResourceEntries]) -> None:
        c = self.c
        rs, us, xs, ns, ds, ps = c["r"], c["u"], c["x"], c["n"], c["d"], c["p"]
        at = {key: i for i, key in enumerate(zip(rs, us, ps, strict=True))}
        taken_back: set[int] = set()
        for rid, unit, x, n, d, p in (row for cols in entries for row in zip(*cols, strict=True)):
            i = at.get((rid, unit, p))
            if i is None:
                i = at[(rid, unit, p)] = len(rs)
                rs.append(rid)
                us.append(unit)
                xs.append(x)
                ns.append(n)
                ds.append(d)
                ps.append(p)
            elif ds[i] == d:  # a resource's charges share their price's denominator, as a rule
                xs[i] += x
                ns[i] += n
            else:
                common = lcm(ds[i], d)
                num = ns[i] * (common // ds[i]) + n * (common // d)
                g = gcd(num, common) or 1
                xs[i] += x
                ns[i], ds[i] = num // g, common // g
            if x < 0 or n < 0:
                taken_back.add(i)
        if taken_back:
            # A resource whose charges were all taken back (a move to another customer) leaves no cell; a
            # resource that used nothing (value and amount 0) but was not taken back stays, as in its hours.
            keep = [i for i in range(len(rs)) if i not in taken_back or xs[i] != 0 or ns[i] != 0]
            for name in _RESOURCE_COLUMNS:
                c[name] = [c[name][i] for i in keep]


GroupKey = tuple[UUID, str, object, str, str, str, str]  # customer, dim, period, key, key2, unit, priced

# One org's part of a shard document: per (space, kind, unit, denominator, monthly) the summed value and
# numerator, and its charges as columns (resource, unit, value, numerator, denominator, monthly) for the
# per-resource documents (columns of strings and ints: the garbage collector never walks them).
Part = tuple[dict[tuple[int, int, int, int, int], list[int]], ResourceEntries]


def contributions(doc: ShardDoc, positions: Iterable[int] | None = None, sign: int = 1) -> dict[int, Part]:
    """The items of ``doc`` (at ``positions``, or all) grouped by org (position in ``doc.orgs``), summed as
    the rollups take them: computed once per document, whichever orgs' customers become known later."""
    out: dict[int, Part] = {}
    r, o, s, k, u, x, n, d, m = doc.r, doc.o, doc.s, doc.k, doc.u, doc.x, doc.n, doc.d, doc.m
    units = doc.units
    for i in range(len(r)) if positions is None else positions:
        part = out.get(o[i])
        if part is None:
            part = out[o[i]] = ({}, ([], [], [], [], [], []))
        ui, di, mi = u[i], d[i], m[i]
        value, num = sign * x[i], sign * n[i]
        key = (s[i], k[i], ui, di, mi)
        cell = part[0].get(key)
        if cell is None:
            part[0][key] = [value, num]
        else:
            cell[0] += value
            cell[1] += num
        rs, us, xs, ns, ds, ms = part[1]
        rs.append(r[i])
        us.append(units[ui])
        xs.append(value)
        ns.append(num)
        ds.append(di)
        ms.append(mi)
    return out


@dataclass(slots=True)
class _Cell:
    """A rollup cell while it is summed: its value, and its exact numerators per denominator."""

    value: int = 0
    dens: dict[int, int] = field(default_factory=dict)


@dataclass
class Rollup:
    """Changes to the rollups, summed exactly before they are written."""

    # (customer, hour, org, space, meter, kind, unit, priced) -> (value, {den: num}): charges are summed here
    # first, and the group cells derived from these sums by ``groups`` (a few hundred per batch instead of
    # one per charge and cell).
    fine: dict[tuple[UUID, datetime, str, str, str, str, str, str], _Cell] = field(default_factory=dict)
    # (customer, hour, meter) -> the charges, for the per-resource documents of its day and month.
    resources: dict[tuple[UUID, datetime, str], list[ResourceEntries]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.fine)

    def add(
        self, key: ShardKey, doc: ShardDoc, positions: Iterable[int], customer_of_org: Sequence[UUID | None], sign: int
    ) -> None:
        """Add (sign 1) or take back (sign -1) the items of ``doc`` at ``positions`` whose org has a
        customer (``customer_of_org``, by position in ``doc.orgs``)."""
        for org, part in contributions(doc, positions, sign).items():
            customer = customer_of_org[org]
            if customer is not None:
                self.add_part(key, doc, customer, org, part)

    def add_part(self, key: ShardKey, doc: ShardDoc, customer: UUID, org: int, part: Part) -> None:
        """Add one org's part of a shard document (``contributions``) for ``customer``."""
        hour, meter, _ = key
        sums, entries = part
        self.resources.setdefault((customer, hour, meter), []).append(entries)
        org_id, spaces, kinds, units = doc.orgs[org], doc.spaces, doc.kinds, doc.units
        for (si, ki, ui, di, mi), (value, num) in sums.items():
            fine_key = (customer, hour, org_id, spaces[si], meter, kinds[ki], units[ui], PRICED[mi])
            cell = self.fine.get(fine_key)
            if cell is None:
                cell = self.fine[fine_key] = _Cell()
            cell.value += value
            dens = cell.dens
            dens[di] = dens.get(di, 0) + num

    def resource_changes(self) -> dict[str, dict[ResourceKey, list[ResourceEntries]]]:
        """The charges per per-resource document: ``day`` (America/New_York; months are read as their days)."""
        out: dict[str, dict[ResourceKey, list[ResourceEntries]]] = {"day": {}}
        for (customer, hour, meter), entries in self.resources.items():
            out["day"].setdefault((customer, ny_day(hour), meter), []).extend(entries)
        return out

    def groups(self) -> dict[str, dict[GroupKey, tuple[int, int, int]]]:
        """The group cells (value, exact numerator, denominator) of each granularity table: ``hour``
        (usage_hour_group), ``day`` (usage_day_group), ``month`` (usage_month)."""
        acc: dict[str, dict[GroupKey, _Cell]] = {"hour": {}, "day": {}, "month": {}}
        for (customer, hour, org, space, meter, kind, unit, priced), fine in self.fine.items():
            value, dens = fine.value, fine.dens
            periods = (("hour", hour), ("day", ny_day(hour)), ("month", ny_month(hour)))
            for dim, key, key2 in (("org", org, ""), ("space", space, ""), ("meter", meter, ""), ("kind", meter, kind)):
                for table, period in periods:
                    gkey = (customer, dim, period, key, key2, unit, priced)
                    cell = acc[table].get(gkey)
                    if cell is None:
                        cell = acc[table][gkey] = _Cell()
                    cell.value += value
                    sums = cell.dens
                    for den, num in dens.items():
                        sums[den] = sums.get(den, 0) + num
        return {
            table: {k: (int(v.value), *exact(v.dens)) for k, v in cells.items()}
            for table, cells in acc.items()
        }
