"""What the dashboard's customer page shows, computed from the read model's facts without HTTP: the daily
remaining credits, the burn rate and run-out date, the burn-down and usage charts' data and their text
descriptions, and the statement's table (``dashboard.py`` serves the pages; ``charts.py`` draws the SVG).

Burn rate and projection: the average daily usage (bucket ``used``: usage, late usage, their reversals)
over the 30 days up to the end of the last hour with posted usage (fewer when usage began later); the
remaining credits as of now, spent at that rate from now (or from the last posted usage, if later), give
the run-out date. No projection when nothing was used in that window, or when nothing remains.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from fractions import Fraction
from typing import Any
from urllib.parse import urlencode

from services.api import repository as repo
from services.api.charges import MONTHLY
from services.api.charts import OTHER_COLOUR, PALETTE, BurnDown, Series, burn_down, format_credits, stacked_bars
from services.api.service import Balance, amount_fields, balance_from_buckets, iso, ny_day, ny_midnight
from shared.clock import BUSINESS_TZ, month_bounds

__all__ = [
    "BURN_WINDOW",
    "CHART_AHEAD",
    "MAX_PROJECTION",
    "MAX_SERIES",
    "BurnRate",
    "Group",
    "LedgerFact",
    "burn_rate",
    "burn_view",
    "burn_window",
    "corrections_view",
    "daily_remaining",
    "days_text",
    "next_month",
    "ny_text",
    "previous_month",
    "run_out",
    "statement_view",
    "usage_series",
    "usage_view",
    "versions_view",
]

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
BURN_WINDOW = timedelta(days=30)
MAX_PROJECTION = timedelta(days=366 * 50)  # beyond this a run-out date says nothing useful
CHART_AHEAD = timedelta(days=366)  # the burn-down's axis reaches at most this far past today
BURN_HISTORY = timedelta(days=366)  # ... and at most this far back: the days drawn and the rows read are bounded
MAX_SERIES = len(PALETTE)  # more orgs (spaces) than colours: the smallest share one "other" colour


@dataclass(frozen=True, slots=True)
class LedgerFact:
    """What the burn-down needs of a ledger transaction (as the read model stores it)."""

    occurred_at: datetime
    type: str
    bucket: str
    signed_amount: int


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def daily_remaining(
    facts: Iterable[LedgerFact], first: date, last: date, opening: Mapping[str, int] | None = None
) -> list[int]:
    """Remaining microcredits at the end of each America/New_York day from ``first`` to ``last``: the
    balance rule of the JSON API (``balance_from_buckets``) over the transactions that occurred by then.
    ``opening`` is each bucket's sum of the transactions before those in ``facts`` (none: nothing before)."""
    sums: dict[str, int] = defaultdict(int, opening or {})
    by_day: dict[date, list[LedgerFact]] = defaultdict(list)
    for f in facts:
        day = ny_day(f.occurred_at)
        if day < first:
            sums[f.bucket] += f.signed_amount
        elif day <= last:
            by_day[day].append(f)
    out = []
    for day in _days(first, last):
        for f in by_day.get(day, ()):
            sums[f.bucket] += f.signed_amount
        out.append(balance_from_buckets(sums).remaining)
    return out


@dataclass(frozen=True, slots=True)
class BurnRate:
    per_day: Fraction  # microcredits a day, exact
    start: datetime  # the window [start, end) it was measured over
    end: datetime

    @property
    def days(self) -> Fraction:
        return Fraction((self.end - self.start) // timedelta(microseconds=1), DAY // timedelta(microseconds=1))


def burn_rate(facts: Sequence[LedgerFact]) -> BurnRate | None:
    """Average daily usage over the 30 days up to the end of the last hour with posted usage (from the
    first posted usage, when that is later); None before any usage was posted."""
    times = [f.occurred_at for f in facts if f.type in ("usage", "late_usage")]
    if not times:
        return None
    end = max(times) + HOUR
    start = max(end - BURN_WINDOW, min(times))
    used = sum(f.signed_amount for f in facts if f.bucket == "used" and start <= f.occurred_at < end)
    micros = (end - start) // timedelta(microseconds=1)
    return BurnRate(Fraction(used) * (DAY // timedelta(microseconds=1)) / micros, start, end)


def run_out(remaining: int, rate: BurnRate | None, now: datetime) -> datetime | None:
    """When ``remaining`` microcredits are used up at ``rate``, spent from ``now`` (or from the end of
    the rate's window, if later); None when there is no burn, nothing remains, or it is decades away."""
    if rate is None or rate.per_day <= 0 or remaining <= 0:
        return None
    micros = Fraction(remaining) * (DAY // timedelta(microseconds=1)) / rate.per_day
    if micros > MAX_PROJECTION // timedelta(microseconds=1):
        return None
    return max(now, rate.end) + timedelta(microseconds=-(-micros.numerator // micros.denominator))


def next_month(month: date) -> date:
    return date(month.year + (month.month == 12), month.month % 12 + 1, 1)


def previous_month(month: date) -> date:
    return date(month.year - (month.month == 1), (month.month - 2) % 12 + 1, 1)


@dataclass
class Group:
    """One org (or space) of the month's usage: exact microcredits per day."""

    key: str
    label: str
    days: dict[date, Fraction] = field(default_factory=dict)

    @property
    def total(self) -> Fraction:
        return sum(self.days.values(), Fraction(0))


def usage_series(groups: Sequence[Group]) -> tuple[list[Series], dict[str, str]]:
    """The chart's series, largest month total first (at the bottom of each bar): one colour each for
    the first ``MAX_SERIES - 1`` groups and one shared "other" series for the rest (all of them when
    they fit). Returns the series and each group's colour."""
    ordered = sorted(groups, key=lambda g: (-g.total, g.label.lower(), g.key))
    shown = ordered if len(ordered) <= MAX_SERIES else ordered[: MAX_SERIES - 1]
    rest = ordered[len(shown) :]
    series = [Series(g.key, g.label, g.days, PALETTE[i]) for i, g in enumerate(shown)]
    colours = {s.key: s.colour for s in series}
    if rest:
        merged: dict[date, Fraction] = defaultdict(Fraction)
        for g in rest:
            for day, amount in g.days.items():
                merged[day] += amount
            colours[g.key] = OTHER_COLOUR
        series.append(Series("", f"{len(rest)} others", dict(merged), OTHER_COLOUR))
    return series, colours


def burn_window(now: datetime) -> tuple[datetime, datetime]:
    """The instants [start, end) whose transactions the burn-down reads: New York midnight ``BURN_HISTORY``
    before today to the end of the day ``CHART_AHEAD`` after it (earlier ones count only as opening sums)."""
    today = ny_day(now)
    return ny_midnight(today - BURN_HISTORY), ny_midnight(today + CHART_AHEAD + DAY)


def burn_view(
    facts: Sequence[LedgerFact],
    balance: Balance,
    rate: BurnRate | None,
    runout: datetime | None,
    now: datetime,
    opening: Mapping[str, int] | None = None,
) -> dict[str, Any] | None:
    """The burn-down: remaining credits at the end of every day from the first transaction (at most
    ``BURN_HISTORY`` ago: ``opening`` holds the sums of what came before) to today, then the projection as
    a straight line to zero on the run-out day (or to the edge of the chart, a year from today, when that
    is later). At most ``BURN_HISTORY + CHART_AHEAD`` days are drawn, whatever the agreements' dates."""
    before = any((opening or {}).values())  # anything (not summing to zero) before the window
    if not facts and not before:
        return None
    today = ny_day(now)
    start = today - BURN_HISTORY
    first = start if before else min(ny_day(f.occurred_at) for f in facts)
    first = max(first, start)
    last = min(max([today, *(ny_day(f.occurred_at) for f in facts)]), today + CHART_AHEAD)
    days = _days(first, last)
    remaining = daily_remaining(facts, first, last, opening)
    end, projection = last, None
    if runout is not None and rate is not None:
        runout_day, edge = ny_day(runout), today + CHART_AHEAD
        if runout_day <= edge:
            end, projection = max(last, runout_day), (runout_day, Fraction(0))
        else:
            end, projection = max(last, edge), (edge, balance.remaining - rate.per_day * (edge - today).days)
        if projection[0] <= last:
            projection = None
    chart = burn_down(
        BurnDown(days, remaining, balance.funded, today, end, projection),
        title="Remaining credits per day",
        desc=_burn_desc(days, remaining, runout),
        id_prefix="burn",
    )
    return {"svg": chart, "rows": list(zip(days, remaining, strict=True))}


def usage_view(rows: Iterable[repo.UsageRow], month: date, org: str | None) -> dict[str, Any]:
    """The month's usage per day by org — or by space of ``org`` — as a stacked chart, a legend table with
    each group's colour and total, and the table of every (day, group) figure. Usage of graduated and
    volume prices (``priced`` monthly) is listed apart with its units: per org its credits are what the
    ledger posted for it (the rows carry them), per space there are none (the ledger prices the month's
    total, not a space's share), so it is not drawn."""
    start, stop = month_bounds(month)
    groups: dict[str, Group] = {}
    monthly: dict[str, tuple[str, dict[str, int]]] = {}
    org_name = ""
    for r in rows:
        if org is not None and r.attrs.get("org_id") != org:
            continue
        if org is not None:
            org_name = r.attrs.get("org_name", "") or org_name
        label = (r.attrs.get("space_name") if org else r.attrs.get("org_name")) or r.key or "(none)"
        if r.priced == MONTHLY:
            units = monthly.setdefault(r.key, (label, {}))[1]
            for unit, value in r.values.items():
                units[unit] = units.get(unit, 0) + value
            if org is not None:
                continue
        g = groups.setdefault(r.key, Group(r.key, label))
        assert isinstance(r.period, date)
        g.days[r.period] = g.days.get(r.period, Fraction(0)) + r.amount
    what = "space" if org else "org"
    series, colours = usage_series(list(groups.values()))
    chart = None
    if groups:
        chart = stacked_bars(
            _days(ny_day(start), ny_day(stop) - DAY),
            series,
            title=f"Usage per day in {month:%B %Y}, by {what}",
            desc=_usage_desc(month, groups.values(), f"spaces of org {org_name or org}" if org else "orgs"),
            id_prefix="usage",
        )
    ordered = sorted(groups.values(), key=lambda g: (-g.total, g.label.lower(), g.key))
    legend = [
        {
            "key": g.key,
            "label": g.label,
            "colour": colours[g.key],
            "exact": f"{g.total.numerator}/{g.total.denominator}",
            "credits": format_credits(g.total),
            "query": urlencode({"month": f"{month:%Y-%m}", "org": g.key}),
        }
        for g in ordered
    ]
    table = [
        {"day": day, "label": g.label, "key": g.key, "display": format_credits(amount), **amount_fields(amount)}
        for g in groups.values()
        for day, amount in g.days.items()
    ]
    table.sort(key=lambda t: (t["day"], str(t["label"]).lower(), t["key"]))
    total = sum((g.total for g in groups.values()), Fraction(0))
    monthly_rows = [
        {"key": key, "label": label, "units": ", ".join(f"{v:,} {u}" for u, v in sorted(units.items()))}
        for key, (label, units) in sorted(monthly.items(), key=lambda kv: (kv[1][0].lower(), kv[0]))
    ]
    return {
        "monthly": monthly_rows,
        "org_name": org_name or (org or ""),
        "what": what,
        "usage_chart": chart,
        "legend": legend,
        "table": table,
        "total_credits": format_credits(total),
    }


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def statement_view(row: Any) -> dict[str, Any] | None:
    """A statement version's table: on an amended version (2, 3, ...) each line and ``used`` also say
    original (version 1's figure) and correction (all of the month's corrections so far)."""
    if row is None:
        return None
    return {
        **{k: row[k] for k in ("opening_balance", "funded", "used", "expired", "closing_balance", "version")},
        "original_used": _opt_int(row["original_used"]),
        "correction": _opt_int(row["correction"]),
        "amended": row["version"] > 1,
        "reasons": [str(r) for r in repo.json_value(row["reasons"]) or []],
        "used_by_kind": [
            {
                "meter": str(u.get("meter", "")),
                "resource_kind": str(u.get("resource_kind", "")),
                "microcredits": int(u["microcredits"]),
                "original": _opt_int(u.get("original")),
                "correction": _opt_int(u.get("correction")),
            }
            for u in repo.json_value(row["used_by_kind"]) or []
        ],
        "issued_at": iso(row["issued_at"]),
    }


def versions_view(rows: Iterable[Any], month: date, org: str | None) -> list[dict[str, Any]]:
    """The month's statement versions, oldest first, each with the query string of its page."""
    extra = {"org": org} if org else {}
    return [
        {
            "version": r["version"],
            "issued_at": iso(r["issued_at"]),
            "used": int(r["used"]),
            "correction": _opt_int(r["correction"]),
            "query": urlencode({"month": f"{month:%Y-%m}", **extra, "version": r["version"]}),
        }
        for r in rows
    ]


def corrections_view(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """The correction transactions of a closed month: when, why (the description names the re-rating job and
    its reason) and by how much the used credits moved (negative: given back)."""
    return [
        {
            "id": str(r["transaction_id"]),
            "occurred_at": iso(r["occurred_at"]),
            "description": r["description"],
            "microcredits": int(r["signed_amount"]),
        }
        for r in rows
    ]




def days_text(days: Fraction) -> str:
    """A number of days for people: whole, or with one decimal (rounded half up)."""
    tenths = (days * 20 + 1) // 2  # round(days * 10), half up, in integers
    whole, tenth = divmod(tenths, 10)
    return f"{whole}" if tenth == 0 else f"{whole}.{tenth}"


def ny_text(moment: datetime) -> str:
    return moment.astimezone(BUSINESS_TZ).strftime("%Y-%m-%d %H:%M %Z")


def _burn_desc(days: Sequence[date], remaining: Sequence[int], runout: datetime | None) -> str:
    text = (
        f"Remaining credits at the end of each day from {days[0].isoformat()} to {days[-1].isoformat()}: "
        f"{format_credits(remaining[0])} credits on the first day, {format_credits(remaining[-1])} on the last, "
        f"lowest {format_credits(min(remaining))}."
    )
    if runout is not None:
        day = runout.astimezone(BUSINESS_TZ).date().isoformat()
        text += f" At the current burn rate the credits run out on {day} (dashed line)."
    return text + " The table below the chart lists every day."


def _usage_desc(month: date, groups: Iterable[Group], scope_text: str) -> str:
    gs = sorted(groups, key=lambda g: (-g.total, g.label.lower()))
    total = sum((g.total for g in gs), Fraction(0))
    parts = ", ".join(f"{g.label} {format_credits(g.total)}" for g in gs[:5])
    more = f" and {len(gs) - 5} more" if len(gs) > 5 else ""
    return (
        f"Stacked bars of the credits used each day of {month:%B %Y} (America/New_York) by {scope_text}; "
        f"{format_credits(total)} credits in all: {parts}{more}. The tables below list every figure."
    )
