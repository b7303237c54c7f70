"""Price models, free of I/O: what a price makes of one customer's units of one billing month.

A price turns the exact units of a (customer, billing month, price) group into exact microcredits with its
function f. Units are in the price's unit: ``value / unit`` of the meter's quantity (a price of 1,000,000
microcredits per 730 instance-hours counts instance-hours / 730), an exact ``Fraction``. Three models, as
Lago, OpenMeter and Stripe name them:

- ``flat`` (today): f(u) = microcredits_per_unit × u. One band, open-ended, no fee.
- ``graduated``: the units are cut at the band edges and each slice is priced at its own band's rate
  ("the first 1,000 at X, the rest at Y"): f(u) = Σ over bands b the total reached of
  fee_b + rate_b × (min(u, up_to_b) − lower_b).
- ``volume``: all the units at the rate of the one band the total falls in:
  f(u) = fee_b + rate_b × u, b the band with lower_b < u ≤ up_to_b.

Bands. A band is ``Band(up_to, microcredits_per_unit, flat_fee)``; its lower edge is the previous band's
``up_to`` (0 for the first). Edges are strictly increasing, positive, and only the last band is
open-ended (``up_to=None``).

Edge convention: ``up_to`` is **inclusive**, as Stripe's ``up_to`` and OpenMeter's ``upToAmount`` ("up to
and including"): a total exactly on an edge is in the lower band. A band is *reached* when the total is
strictly above its lower edge, so zero units reach no band and f(0) = 0 in every model (a customer who used
nothing is charged nothing, fee included).

Flat fees: each band of a graduated or volume price may carry ``flat_fee`` whole microcredits (Lago's
``flat_amount``, OpenMeter's ``flatPrice``, Stripe's ``flat_amount``): graduated charges the fee of every
band reached; volume charges only the fee of the band the total is in. A flat price has no fee (it is
today's price, unchanged). Fees and rates are integers in [0, 2**62]; a free band (rate 0) is allowed,
"the first 100 units free" being the commonest graduated price.

Monotonicity. Rates and fees are never negative, so a graduated f never decreases with the units. A volume
f can: 100 units in a band at 10 cost 1,000, 101 units in the next band at 5 cost 505. The ledger posts
f(after) − f(before) whenever a group's units change (``posting``), which for a volume price is then a
negative amount: a decrease of the hour's usage line, posted like any decrease today (a negative
``UsageAmount`` in the hour's usage transaction: the usage account is debited and the difference goes back
to the credit pools). A graduated price gives a negative amount only when units go down (a revision of a
charge replacing a larger one).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

__all__ = [
    "MAX_BANDS",
    "MAX_INT",
    "MODELS",
    "AmountOutOfRangeError",
    "Band",
    "InvalidPriceModelError",
    "Model",
    "PriceModel",
    "amount",
    "from_document",
    "line_postings",
    "posted",
    "posting",
    "to_document",
    "units_of",
]

MAX_INT = 2**62  # the contract's bound on every integer (``shared.batches.MAX_INT``)
MAX_BANDS = 32
Model = Literal["flat", "graduated", "volume"]
MODELS: tuple[Model, ...] = ("flat", "graduated", "volume")


class InvalidPriceModelError(ValueError):
    """A price model that cannot exist: bands out of order or out of bounds, a model that does not fit."""


class AmountOutOfRangeError(ValueError):
    """Units that are negative, or whose whole microcredits would exceed 2**62."""


def _bounded_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidPriceModelError(f"{name} must be an integer, got {v!r}")
    if not 0 <= v <= MAX_INT:
        raise InvalidPriceModelError(f"{name} must be in [0, 2**62], got {v}")
    return v


@dataclass(frozen=True, slots=True)
class Band:
    """Units up to and including ``up_to`` (None: no upper edge) at ``microcredits_per_unit`` per unit of the
    price, plus ``flat_fee`` microcredits once the total is above the band's lower edge."""

    up_to: Fraction | None
    microcredits_per_unit: int
    flat_fee: int = 0

    def __post_init__(self) -> None:
        _bounded_int("microcredits_per_unit", self.microcredits_per_unit)
        _bounded_int("flat_fee", self.flat_fee)
        given: object = self.up_to
        if given is None:
            return
        if isinstance(given, bool) or not isinstance(given, int | Fraction):
            raise InvalidPriceModelError(f"up_to must be a Fraction, an integer or None, got {given!r}")
        edge = Fraction(given)
        if edge <= 0:
            raise InvalidPriceModelError(f"up_to must be positive, got {edge}")
        if edge.numerator > MAX_INT or edge.denominator > MAX_INT:
            raise InvalidPriceModelError(f"up_to {edge} has a numerator or denominator above 2**62")
        object.__setattr__(self, "up_to", edge)


@dataclass(frozen=True, slots=True)
class PriceModel:
    """A price's function: its model and its bands, validated. ``PriceModel.flat(rate)`` is today's price."""

    model: Model
    bands: tuple[Band, ...]
    # Derived: the lower edge of every band, and for graduated f at each lower edge (before the band's fee).
    _lowers: tuple[Fraction, ...] = field(init=False, repr=False, compare=False)
    _below: tuple[Fraction, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise InvalidPriceModelError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        bands = tuple(self.bands)
        object.__setattr__(self, "bands", bands)
        if not bands:
            raise InvalidPriceModelError("a price needs at least one band")
        if len(bands) > MAX_BANDS:
            raise InvalidPriceModelError(f"a price has at most {MAX_BANDS} bands, got {len(bands)}")
        if any(not isinstance(b, Band) for b in bands):
            raise InvalidPriceModelError("bands must be Band values")
        if bands[-1].up_to is not None:
            raise InvalidPriceModelError("the last band must be open-ended (up_to None)")
        lowers = [Fraction(0)]
        for i, b in enumerate(bands[:-1]):
            if b.up_to is None:
                raise InvalidPriceModelError(f"only the last band may be open-ended (band {i} is)")
            if b.up_to <= lowers[-1]:
                raise InvalidPriceModelError(f"band edges must increase strictly: band {i} ends at {b.up_to}")
            lowers.append(b.up_to)
        if self.model == "flat" and (len(bands) != 1 or bands[0].flat_fee):
            raise InvalidPriceModelError("a flat price is one open-ended band without a fee")
        below = [Fraction(0)]
        for b, lo in zip(bands[:-1], lowers[:-1], strict=True):
            assert b.up_to is not None
            below.append(below[-1] + b.flat_fee + b.microcredits_per_unit * (b.up_to - lo))
        object.__setattr__(self, "_lowers", tuple(lowers))
        object.__setattr__(self, "_below", tuple(below))

    @classmethod
    def flat(cls, microcredits_per_unit: int) -> PriceModel:
        return cls("flat", (Band(None, microcredits_per_unit),))

    def band_of(self, units: Fraction) -> int:
        """The position of the band a positive total falls in (an edge belongs to the band it ends)."""
        return bisect.bisect_left(self._lowers, units) - 1


def units_of(value: int, unit: int) -> Fraction:
    """A measured ``value`` in the price's units: ``value / unit`` exactly."""
    if unit <= 0:
        raise AmountOutOfRangeError(f"price unit must be positive, got {unit}")
    if value < 0:
        raise AmountOutOfRangeError(f"value must not be negative, got {value}")
    return Fraction(value, unit)


def amount(model: PriceModel, units: Fraction) -> Fraction:
    """f(units): the exact microcredits of a group's total ``units`` (never negative) under ``model``."""
    if units < 0:
        raise AmountOutOfRangeError(f"units must not be negative, got {units}")
    if units == 0:
        return Fraction(0)
    b = model.band_of(units)
    band = model.bands[b]
    if model.model == "volume":
        return band.flat_fee + band.microcredits_per_unit * units
    # flat and graduated: f at the band's lower edge, the band's fee, and its rate on the units above the edge.
    return model._below[b] + band.flat_fee + band.microcredits_per_unit * (units - model._lowers[b])


def posted(model: PriceModel, units: Fraction) -> int:
    """The whole microcredits a group of ``units`` must have posted: floor(f(units)), at most 2**62."""
    a = amount(model, units)
    whole = a.numerator // a.denominator
    if whole > MAX_INT:
        raise AmountOutOfRangeError(f"{units} units cost {whole} microcredits, above 2**62")
    return whole


def posting(model: PriceModel, before: Fraction, after: Fraction) -> int:
    """The microcredits to post now when a group's exact total units go from ``before`` to ``after`` (up,
    or down when a revision replaces a larger charge): floor(f(after)) − floor(f(before)). Negative is a
    decrease (a volume price moving into a cheaper band, or fewer units).

    Why this is the rule. Let a group's totals over time be u_0 = 0, u_1, …, u_n (u_n the exact total of
    the latest revisions, whatever order, batching, duplicates or replays led there: duplicates and older
    revisions change nothing, so they add a step u_k = u_(k-1) that posts 0). The postings sum to
    Σ_k floor(f(u_k)) − floor(f(u_(k-1))) = floor(f(u_n)) − floor(f(0)) = floor(f(u_n)), since f(0) = 0:
    the sum telescopes to the single floor of f of the month's total, and after every step the group's
    posted figure is floor(f(current total)), so balances are current after every posting. Nothing is
    rounded but f's value at a total, and floor(f(u)) depends only on u, never on the path.
    """
    return posted(model, after) - posted(model, before)


def line_postings(model: PriceModel, before: Fraction, changes: Sequence[Fraction]) -> list[int]:
    """The ledger's ``allocate`` for a non-flat group: its total is ``before`` and one posting changes it
    by ``changes`` (one per line — hour, org, meter, kind — in the fixed line order, each the sum of the
    units the line's charges add or take back). Line k gets floor(f(u_k)) − floor(f(u_(k-1))) with u_k the
    running total after it, so the lines sum to ``posting(model, before, before + Σ changes)``. A running
    total below zero means changes that take back units never added: refused."""
    out: list[int] = []
    running = before
    now = posted(model, before)
    for du in changes:
        running += du
        nxt = posted(model, running)
        out.append(nxt - now)
        now = nxt
    return out


# ------------------------------------------------------------------------------------ the stored form
# One JSON form for the admin API, the pricer's table and the charges contract:
#   {"model": "graduated", "bands": [{"up_to": "1000", "microcredits_per_unit": 0, "flat_fee": 0},
#                                    {"up_to": null, "microcredits_per_unit": 1370, "flat_fee": 0}]}
# ``up_to`` is an exact string, "n" or "n/d" (positive integers, no sign, no leading zero): a JSON number
# could be read as a float on the way, and an edge must stay exact.

_EDGE = re.compile(r"[1-9][0-9]{0,18}(/[1-9][0-9]{0,18})?")


def _edge_text(edge: Fraction | None) -> str | None:
    if edge is None:
        return None
    return str(edge.numerator) if edge.denominator == 1 else f"{edge.numerator}/{edge.denominator}"


def _edge_of(text: object) -> Fraction | None:
    if text is None:
        return None
    if not isinstance(text, str) or not _EDGE.fullmatch(text):
        raise InvalidPriceModelError(f'up_to must be null or a string "n" or "n/d" of positive integers, got {text!r}')
    return Fraction(text)


def to_document(model: PriceModel) -> dict[str, object]:
    """``model`` in its JSON form (see above); ``from_document`` reads it back to an equal model."""
    return {
        "model": model.model,
        "bands": [
            {"up_to": _edge_text(b.up_to), "microcredits_per_unit": b.microcredits_per_unit, "flat_fee": b.flat_fee}
            for b in model.bands
        ],
    }


def from_document(doc: object) -> PriceModel:
    """A price model from its JSON form, validated; anything else is an ``InvalidPriceModelError`` that
    says what is wrong (for a 422 problem)."""
    if not isinstance(doc, dict) or set(doc) != {"model", "bands"}:
        raise InvalidPriceModelError('a price model is an object with exactly "model" and "bands"')
    bands = doc["bands"]
    if not isinstance(bands, list):
        raise InvalidPriceModelError("bands must be a list")
    out = []
    for i, b in enumerate(bands):
        if not isinstance(b, dict) or not {"up_to", "microcredits_per_unit"} <= set(b) <= {
            "up_to",
            "microcredits_per_unit",
            "flat_fee",
        }:
            raise InvalidPriceModelError(f'band {i} must have "up_to", "microcredits_per_unit" and may have "flat_fee"')
        out.append(Band(_edge_of(b["up_to"]), b["microcredits_per_unit"], b.get("flat_fee", 0)))
    return PriceModel(doc["model"], tuple(out))
