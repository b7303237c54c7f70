"""Time rules: everything stored and sent is timezone-aware UTC; business periods (billing months,
statements, posting cut-offs) are months in America/New_York."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

__all__ = [
    "BUSINESS_TZ",
    "NaiveDatetimeError",
    "as_utc",
    "billing_month",
    "hour_floor",
    "hours_between",
    "month_bounds",
    "parse_month",
    "utcnow",
]

BUSINESS_TZ = ZoneInfo("America/New_York")


class NaiveDatetimeError(ValueError):
    """A datetime without a time zone reached code that only accepts aware UTC times."""


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; naive datetimes are refused, never guessed."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise NaiveDatetimeError(f"naive datetime {moment.isoformat()} has no time zone")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00: before the first UTC datetime Python has
        raise ValueError(f"{moment.isoformat()} is out of the range of UTC datetimes") from None


def utcnow() -> datetime:
    return datetime.now(UTC)


def hour_floor(moment: datetime) -> datetime:
    """The UTC hour that contains ``moment``."""
    return as_utc(moment).replace(minute=0, second=0, microsecond=0)


def billing_month(moment: datetime) -> date:
    """First day of the America/New_York month that contains ``moment``."""
    local = as_utc(moment).astimezone(BUSINESS_TZ)
    return date(local.year, local.month, 1)


def parse_month(text: str) -> date:
    """``YYYY-MM`` as the first day of that month; a clear ValueError otherwise."""
    try:
        year_s, month_s = text.split("-")
        if len(year_s) != 4 or len(month_s) != 2:
            raise ValueError
        return date(int(year_s), int(month_s), 1)
    except ValueError:
        raise ValueError(f"month must look like YYYY-MM, got {text!r}") from None


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the America/New_York month beginning at ``month``."""
    start_local = datetime(month.year, month.month, 1, tzinfo=BUSINESS_TZ)
    nxt = date(month.year + (month.month == 12), month.month % 12 + 1, 1)
    end_local = datetime(nxt.year, nxt.month, 1, tzinfo=BUSINESS_TZ)
    return start_local.astimezone(UTC), end_local.astimezone(UTC)


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Every whole UTC hour h with start <= h < end."""
    h = hour_floor(start)
    if h < as_utc(start):
        h += timedelta(hours=1)
    out = []
    end = as_utc(end)
    while h < end:
        out.append(h)
        h += timedelta(hours=1)
    return out
