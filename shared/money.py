"""Money rules: integer microcredits in the ledger, exact rationals for charges, never floats.

1 credit = 1,000,000 microcredits. A charge is ``value * microcredits_per_unit / unit`` kept as an exact
fraction; only the ledger floors, and only sums (see ``services/ledger``).
"""

from __future__ import annotations

from fractions import Fraction

__all__ = ["MICROCREDITS_PER_CREDIT", "display_credits", "exact_charge", "floor_fraction"]

MICROCREDITS_PER_CREDIT = 1_000_000


def exact_charge(value: int, microcredits_per_unit: int, unit: int) -> Fraction:
    """The exact microcredits of ``value`` units at ``microcredits_per_unit`` per ``unit``."""
    if unit <= 0:
        raise ValueError(f"price unit must be positive, got {unit}")
    if value < 0 or microcredits_per_unit < 0:
        raise ValueError("value and price must not be negative")
    return Fraction(value * microcredits_per_unit, unit)


def floor_fraction(amount: Fraction) -> int:
    """Whole microcredits in ``amount``, rounded down (toward minus infinity)."""
    return amount.numerator // amount.denominator


def display_credits(microcredits: Fraction | int, places: int = 6) -> str:
    """A human figure in credits, rounded half-up to ``places`` decimals: for reports only."""
    amount = Fraction(microcredits) / MICROCREDITS_PER_CREDIT
    scale = 10**places
    scaled = amount * scale
    sign = "-" if scaled < 0 else ""
    q = (abs(scaled.numerator) * 2 + scaled.denominator) // (2 * scaled.denominator)
    whole, frac = divmod(q, scale)
    return f"{sign}{whole}.{frac:0{places}d}" if places else f"{sign}{whole}"
