"""An independent model of price functions, shared by the tests of ``shared.price_models`` and of the
ledger: ``reference_f`` prices units with plain Fractions, band by band in a loop, from the definitions in
docs/price-models.md (the code under test uses prefix sums and a bisection). Expected figures come from
here, never from the code under test.
"""

from __future__ import annotations

from fractions import Fraction

__all__ = ["RawBand", "floor_of", "reference_f"]

RawBand = tuple[Fraction | None, int, int]  # up_to (inclusive), rate per unit, flat fee


def reference_f(model: str, bands: list[RawBand], units: Fraction) -> Fraction:
    """f(units) written from the definitions: graduated prices each slice at its band's rate and charges the
    fee of every band the units go above the lower edge of; volume prices every unit at the rate of the band
    whose (lower, up_to] holds the total, plus that band's fee; flat is rate × units."""
    if units == 0:
        return Fraction(0)
    if model == "volume":
        lower = Fraction(0)
        for up_to, rate, fee in bands:
            if lower < units and (up_to is None or units <= up_to):
                return fee + rate * units
            assert up_to is not None
            lower = up_to
        raise AssertionError("no band holds the units")
    total = Fraction(0)
    lower = Fraction(0)
    for up_to, rate, fee in bands:
        if units <= lower:
            break
        top = units if up_to is None or units < up_to else up_to
        total += fee + rate * (top - lower)
        if up_to is None:
            break
        lower = up_to
    return total


def floor_of(x: Fraction) -> int:
    return x.numerator // x.denominator
