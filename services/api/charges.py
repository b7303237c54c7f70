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
    "Part",
    "ResourceDoc",
    "Rollup",
    "ShardDoc",
    "contributions",
    "exact",
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


_COLUMNS = ("r", "o", "s", "k", "u", "x", "v", "n", "d")


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

    @classmethod
    def of(cls, c: Charges) -> ShardDoc:
        """A charges batch (its items distinct) as the document of a shard that had none."""
        return cls(
            orgs=[o.id for o in c.orgs], spaces=[s.id for s in c.spaces], kinds=list(c.kinds), units=[c.unit],
            r=list(c.resource_id), o=list(c.org), s=list(c.space), k=list(c.kind), u=[0] * len(c.resource_id),
            x=list(c.value), v=list(c.revision), n=list(c.amount_numerator), d=list(c.amount_denominator),
        )

    @classmethod
    def load(cls, raw: bytes) -> ShardDoc:
        return cls(**orjson.loads(raw))

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
                c.value[i], c.revision[i], c.amount_numerator[i], c.amount_denominator[i],
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
# Charges as the per-resource documents take them: columns of resource, unit, value, numerator, denominator.
ResourceEntries = tuple[list[str], list[str], list[int], list[int], list[int]]


class ResourceDoc:
    """Usage per (resource, unit) of one customer, period (day or month) and meter: value and exact amount,
    as the columns it is stored as: {"r": [...], "u": [...], "x": [...], "n": [...], "d": [...]}. Merged
    in place (a customer's resources come back hour after hour: most entries update a cell)."""

    def __init__(self, columns: dict[str, list[Any]] | None = None) -> None:
        self.c = columns if columns is not None else {"r": [], "u": [], "x": [], "n": [], "d": []}

    @classmethod
    def load(cls, raw: bytes) -> ResourceDoc:
        return cls(orjson.loads(raw))

    def dump(self) -> bytes:
        return orjson.dumps(self.c)

    @property
    def cells(self) -> dict[tuple[str, str], list[int]]:
        """(resource, unit) -> [value, numerator, denominator]."""
        c = self.c
        return {(r, u): [x, n, d] for r, u, x, n, d in zip(c["r"], c["u"], c["x"], c["n"], c["d"], strict=True)}

    def add(self, entries: Sequence[ResourceEntries]) -> None:
        c = self.c
        rs, us, xs, ns, ds = c["r"], c["u"], c["x"], c["n"], c["d"]
        at = {key: i for i, key in enumerate(zip(rs, us, strict=True))}
        taken_back: set[int] = set()
        for rid, unit, x, n, d in (row for cols in entries for row in zip(*cols, strict=True)):
            i = at.get((rid, unit))
            if i is None:
                i = at[(rid, unit)] = len(rs)
                rs.append(rid)
                us.append(unit)
                xs.append(x)
                ns.append(n)
                ds.append(d)
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
            for name in ("r", "u", "x", "n", "d"):
                c[name] = [c[name][i] for i in keep]


GroupKey = tuple[UUID, str, object, str, str, str]  # customer, dim, period, key, key2, unit

# One org's part of a shard document: per (space, kind, unit, denominator) the summed value and numerator,
# and its charges as columns (resource, unit, value, numerator, denominator) for the per-resource documents
# (columns of strings and ints: the garbage collector never walks them).
Part = tuple[dict[tuple[int, int, int, int], list[int]], tuple[list[str], list[str], list[int], list[int], list[int]]]


def contributions(doc: ShardDoc, positions: Iterable[int] | None = None, sign: int = 1) -> dict[int, Part]:
    """The items of ``doc`` (at ``positions``, or all) grouped by org (position in ``doc.orgs``), summed as
    the rollups take them: computed once per document, whichever orgs' customers become known later."""
    out: dict[int, Part] = {}
    r, o, s, k, u, x, n, d = doc.r, doc.o, doc.s, doc.k, doc.u, doc.x, doc.n, doc.d
    units = doc.units
    for i in range(len(r)) if positions is None else positions:
        part = out.get(o[i])
        if part is None:
            part = out[o[i]] = ({}, ([], [], [], [], []))
        ui, di = u[i], d[i]
        value, num = sign * x[i], sign * n[i]
        key = (s[i], k[i], ui, di)
        cell = part[0].get(key)
        if cell is None:
            part[0][key] = [value, num]
        else:
            cell[0] += value
            cell[1] += num
        rs, us, xs, ns, ds = part[1]
        rs.append(r[i])
        us.append(units[ui])
        xs.append(value)
        ns.append(num)
        ds.append(di)
    return out


@dataclass(slots=True)
class _Cell:
    """A rollup cell while it is summed: its value, and its exact numerators per denominator."""

    value: int = 0
    dens: dict[int, int] = field(default_factory=dict)


@dataclass
class Rollup:
    """Changes to the rollups, summed exactly before they are written."""

    # (customer, hour, org, space, meter, kind, unit) -> (value, {den: num}): charges are summed here
    # first, and the group cells derived from these sums by ``groups`` (a few hundred per batch instead of
    # one per charge and cell).
    fine: dict[tuple[UUID, datetime, str, str, str, str, str], _Cell] = field(default_factory=dict)
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
        for (si, ki, ui, di), (value, num) in sums.items():
            fine_key = (customer, hour, org_id, spaces[si], meter, kinds[ki], units[ui])
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
        for (customer, hour, org, space, meter, kind, unit), fine in self.fine.items():
            value, dens = fine.value, fine.dens
            periods = (("hour", hour), ("day", ny_day(hour)), ("month", ny_month(hour)))
            for dim, key, key2 in (("org", org, ""), ("space", space, ""), ("meter", meter, ""), ("kind", meter, kind)):
                for table, period in periods:
                    cell = acc[table].get((customer, dim, period, key, key2, unit))
                    if cell is None:
                        cell = acc[table][(customer, dim, period, key, key2, unit)] = _Cell()
                    cell.value += value
                    sums = cell.dens
                    for den, num in dens.items():
                        sums[den] = sums.get(den, 0) + num
        return {
            table: {k: (int(v.value), *exact(v.dens)) for k, v in cells.items()}
            for table, cells in acc.items()
        }
