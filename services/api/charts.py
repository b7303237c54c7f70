"""Server-side SVG charts of the dashboard: a burn-down line chart of remaining credits and a stacked bar
chart of usage per day. No JavaScript, nothing loaded from elsewhere.

- Accessible: every chart is an ``<svg role="img">`` labelled by its own ``<title>`` and ``<desc>``
  (``aria-labelledby``); the page shows the same figures as a table beside it (the text alternative).
- Exact: money is integer microcredits or an exact ``Fraction`` of them. Floats appear only as pixel
  coordinates (rounded to 0.01 px); every label is formatted from integers (:func:`format_credits`).
- Colours: each series colour has at least 3:1 contrast against the white plot (WCAG 1.4.11), and
  adjacent stacked segments are parted by a white line, so they never rely on telling two hues apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction

from markupsafe import Markup, escape

from shared.money import MICROCREDITS_PER_CREDIT, display_credits

__all__ = [
    "OTHER_COLOUR",
    "PALETTE",
    "BurnDown",
    "Linear",
    "Segment",
    "Series",
    "axis_ticks",
    "burn_down",
    "format_credits",
    "nice_step",
    "stack",
    "stacked_bars",
    "tick_label",
]

# Series colours, in stacking order; all at least 4.5:1 on white (tests/unit/test_charts.py checks 3:1).
PALETTE: tuple[str, ...] = ("#1f5fa8", "#b5400b", "#2e7d32", "#7b1fa2", "#b71c1c", "#00695c", "#6d4c41", "#ad1457")
OTHER_COLOUR = "#4f5b62"
INK = "#1b1f23"  # text and axes
GRID = "#d0d7de"  # grid lines (decorative: the labels carry the values)
LINE = "#1f5fa8"  # the burn-down's actual line
PROJECTED = "#b5400b"  # the projected part, dashed


def format_credits(microcredits: int | Fraction, places: int = 6) -> str:
    """Credits for people, with thousands separators: 1_234_567_891 µcr -> ``"1,234.567891"``.

    Rounded half up to ``places`` decimals by :func:`shared.money.display_credits` (exact for an
    integer of microcredits with 6 places); only the digits are grouped here."""
    text = display_credits(microcredits, places)
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    if not digits.strip("0."):
        sign = ""  # a tiny negative amount rounds to 0, not "-0"
    whole, dot, frac = digits.partition(".")
    return f"{sign}{int(whole):,}{dot}{frac}"


# ------------------------------------------------------------------------------------------ scales


def nice_step(span: int, target: int = 5) -> int:
    """The smallest 1, 2 or 5 × 10^k microcredits (k ≥ 0) that cuts ``span`` microcredits into at
    most ``target`` steps."""
    if span <= 0:
        return MICROCREDITS_PER_CREDIT
    raw = -(-span // target)  # ceil(span / target), in integers
    magnitude: int = 10 ** (len(str(raw)) - 1)
    for m in (1, 2, 5, 10):
        if m * magnitude >= raw:
            return m * magnitude
    raise AssertionError("unreachable: 10 × magnitude ≥ raw")


def axis_ticks(low: int, high: int, target: int = 5) -> list[int]:
    """Round tick values (microcredits) from at or below ``low`` to at or above ``high``."""
    if high < low:
        raise ValueError("high must not be below low")
    step = nice_step(high - low, target)
    first = (low // step) * step
    last = -(-high // step) * step
    if first == last:
        last = first + step
    return list(range(first, last + step, step))


def tick_label(value: int, step: int) -> str:
    """A tick's label in credits with as few decimals as the step needs (exact: ticks are multiples of
    the step, so nothing is rounded away)."""
    places = 6
    while places > 0 and step % 10 == 0:
        step //= 10
        places -= 1
    return format_credits(value, places)


@dataclass(frozen=True, slots=True)
class Linear:
    """Maps an exact domain [d0, d1] onto pixels [r0, r1]; only the result is a float."""

    d0: Fraction
    d1: Fraction
    r0: Fraction
    r1: Fraction

    @classmethod
    def of(cls, d0: int | Fraction, d1: int | Fraction, r0: int | Fraction, r1: int | Fraction) -> Linear:
        if d0 == d1:
            raise ValueError("an empty domain")
        return cls(Fraction(d0), Fraction(d1), Fraction(r0), Fraction(r1))

    def exact(self, value: int | Fraction) -> Fraction:
        return self.r0 + (Fraction(value) - self.d0) * (self.r1 - self.r0) / (self.d1 - self.d0)

    def __call__(self, value: int | Fraction) -> float:
        return round(float(self.exact(value)), 2)


def _num(x: float) -> str:
    """A pixel coordinate as SVG text: no exponent, no trailing zeros."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _svg_open(id_prefix: str, width: int, height: int, title: str, desc: str, css_class: str) -> list[str]:
    t, d = f"{id_prefix}-title", f"{id_prefix}-desc"
    return [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="{escape(css_class)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-labelledby="{escape(t)} {escape(d)}" '
            f'font-family="system-ui, sans-serif" font-size="13">'
        ),
        f'<title id="{escape(t)}">{escape(title)}</title>',
        f'<desc id="{escape(d)}">{escape(desc)}</desc>',
    ]


def _y_axis(lines: list[str], scale: Linear, ticks: Sequence[int], left: int, right: int, unit: str) -> None:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else MICROCREDITS_PER_CREDIT
    lines.append('<g class="y-axis">')
    for v in ticks:
        y = _num(scale(v))
        colour = INK if v == 0 else GRID
        lines.append(f'<line x1="{left}" x2="{right}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="1"/>')
        lines.append(
            f'<text x="{left - 6}" y="{y}" text-anchor="end" dominant-baseline="middle" fill="{INK}">'
            f"{escape(tick_label(v, step))}</text>"
        )
    lines.append(f'<text x="{left - 6}" y="14" text-anchor="end" fill="{INK}">{escape(unit)}</text>')
    lines.append("</g>")


# ------------------------------------------------------------------------------------ stacked bars


@dataclass(frozen=True, slots=True)
class Series:
    """One stacked series: exact microcredits per day."""

    key: str
    label: str
    values: Mapping[date, Fraction]
    colour: str


@dataclass(frozen=True, slots=True)
class Segment:
    day: date
    series: Series
    low: Fraction  # exact cumulative microcredits below this segment
    high: Fraction  # low + this series' value on this day


def stack(days: Sequence[date], series: Sequence[Series]) -> dict[date, list[Segment]]:
    """The segments of each day's bar, bottom to top in ``series`` order; days and series with no
    value get no segment. Values are usage, never negative."""
    out: dict[date, list[Segment]] = {}
    for day in days:
        level = Fraction(0)
        segments: list[Segment] = []
        for s in series:
            value = s.values.get(day, Fraction(0))
            if value < 0:
                raise ValueError(f"negative usage for {s.key} on {day}")
            if value:
                segments.append(Segment(day, s, level, level + value))
                level += value
        out[day] = segments
    return out


def stacked_bars(
    days: Sequence[date],
    series: Sequence[Series],
    *,
    title: str,
    desc: str,
    id_prefix: str,
    width: int = 720,
    height: int = 320,
) -> Markup:
    """Usage per day, stacked by series (e.g. orgs or spaces); each segment has a tooltip."""
    if not days:
        raise ValueError("a chart needs at least one day")
    left, right, top, bottom = 78, width - 12, 24, height - 42
    bars = stack(days, series)
    highest = max((segs[-1].high for segs in bars.values() if segs), default=Fraction(0))
    ticks = axis_ticks(0, -(-highest.numerator // highest.denominator))  # ceil: the top tick covers every bar
    y = Linear.of(ticks[0], ticks[-1], bottom, top)
    band = Fraction(right - left, len(days))
    bar_width = band * 7 / 10
    x = Linear.of(0, len(days), left, right)
    lines = _svg_open(id_prefix, width, height, title, desc, "chart-svg chart-bars")
    _y_axis(lines, y, ticks, left, right, "credits")
    lines.append('<g class="bars" stroke="#ffffff" stroke-width="1">')
    for i, day in enumerate(days):
        x0 = x(Fraction(i) + (1 - Fraction(7, 10)) / 2)
        for seg in bars[day]:
            y_top, y_low = y(seg.high), y(seg.low)
            lines.append(
                f'<rect x="{_num(x0)}" y="{_num(y_top)}" width="{_num(float(bar_width))}" '
                f'height="{_num(max(0.0, y_low - y_top))}" fill="{seg.series.colour}" '
                f'data-day="{day.isoformat()}" data-key="{escape(seg.series.key)}" '
                f'data-microcredits-exact="{(seg.high - seg.low).numerator}/{(seg.high - seg.low).denominator}">'
                f"<title>{escape(seg.series.label)}, {day.isoformat()}: "
                f"{escape(format_credits(seg.high - seg.low))} credits</title></rect>"
            )
    lines.append("</g>")
    baseline = _num(y(0))  # over the bars' white outlines
    lines.append(f'<line x1="{left}" x2="{right}" y1="{baseline}" y2="{baseline}" stroke="{INK}" stroke-width="1"/>')
    label_every = 1 if band >= 18 else 2 if band >= 10 else 7
    lines.append('<g class="x-axis">')
    for i, day in enumerate(days):
        if (day.day - 1) % label_every == 0:
            cx = _num(x(Fraction(i) + Fraction(1, 2)))
            lines.append(f'<text x="{cx}" y="{bottom + 16}" text-anchor="middle" fill="{INK}">{day.day}</text>')
    lines.append(
        f'<text x="{_num((left + right) / 2)}" y="{height - 8}" text-anchor="middle" fill="{INK}">'
        f"{escape(days[0].strftime('%B %Y'))}, day of the month (America/New_York)</text>"
    )
    lines.append("</g></svg>")
    return Markup("\n".join(lines))


# --------------------------------------------------------------------------------------- burn-down


@dataclass(frozen=True, slots=True)
class BurnDown:
    """What the burn-down chart draws: remaining microcredits at the end of every day from ``days[0]``,
    then optionally a projected straight line to ``projection`` = (day, remaining then), and an x axis
    up to ``end``."""

    days: Sequence[date]
    remaining: Sequence[int]
    funded: int
    today: date
    end: date
    projection: tuple[date, Fraction] | None = None

    def __post_init__(self) -> None:
        if not self.days or len(self.days) != len(self.remaining):
            raise ValueError("one remaining figure per day, at least one day")
        if self.end < self.days[-1]:
            raise ValueError("the axis must reach the last day")


def _x_ticks(start: date, end: date) -> list[tuple[date, str]]:
    span = (end - start).days
    if span <= 62:
        out, d = [], start
        while d <= end:
            out.append((d, f"{d:%b} {d.day}"))
            d += timedelta(days=7)
        return out
    out = []
    d = date(start.year, start.month, 1)
    every = 1 if span <= 400 else 3 if span <= 1200 else 12
    while d <= end:
        if d >= start and (d.month - 1) % every == 0:
            out.append((d, f"{d:%b} {d.year}" if d.month == 1 or not out else f"{d:%b}"))
        d = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    return out


def burn_down(bd: BurnDown, *, title: str, desc: str, id_prefix: str, width: int = 720, height: int = 320) -> Markup:
    """Remaining credits per day as a line, the projection as a dashed line, today marked."""
    left, right, top, bottom = 92, width - 16, 24, height - 34
    values: list[Fraction] = [Fraction(v) for v in bd.remaining] + [Fraction(bd.funded)]
    if bd.projection is not None:
        values.append(bd.projection[1])
    low = min(min(values), Fraction(0))
    high = max(max(values), Fraction(MICROCREDITS_PER_CREDIT))
    ticks = axis_ticks(low.numerator // low.denominator, -(-high.numerator // high.denominator))
    y = Linear.of(ticks[0], ticks[-1], bottom, top)
    start = bd.days[0]
    x = Linear.of(0, max(1, (bd.end - start).days), left, right)

    def px(day: date) -> str:
        return _num(x((day - start).days))

    lines = _svg_open(id_prefix, width, height, title, desc, "chart-svg chart-burn")
    _y_axis(lines, y, ticks, left, right, "credits")
    lines.append('<g class="x-axis">')
    for day, label in _x_ticks(start, bd.end):
        lines.append(f'<line x1="{px(day)}" x2="{px(day)}" y1="{bottom}" y2="{bottom + 4}" stroke="{INK}"/>')
        lines.append(f'<text x="{px(day)}" y="{bottom + 18}" text-anchor="middle" fill="{INK}">{escape(label)}</text>')
    lines.append("</g>")
    if start <= bd.today <= bd.end:
        lines.append(
            f'<g class="today"><line x1="{px(bd.today)}" x2="{px(bd.today)}" y1="{top}" y2="{bottom}" '
            f'stroke="{INK}" stroke-width="1" stroke-dasharray="2 3"/>'
            f'<text x="{px(bd.today)}" y="{top - 6}" text-anchor="middle" fill="{INK}">today</text></g>'
        )
    points = " ".join(f"{px(d)},{_num(y(v))}" for d, v in zip(bd.days, bd.remaining, strict=True))
    lines.append(
        f'<polyline class="actual" points="{points}" fill="none" stroke="{LINE}" stroke-width="2.5" '
        'stroke-linejoin="round"/>'
    )
    if bd.projection is not None:
        pday, pvalue = bd.projection
        lines.append(
            f'<line class="projected" x1="{px(bd.days[-1])}" y1="{_num(y(bd.remaining[-1]))}" '
            f'x2="{px(pday)}" y2="{_num(y(pvalue))}" stroke="{PROJECTED}" stroke-width="2.5" stroke-dasharray="7 5"/>'
        )
    lines.append("</svg>")
    return Markup("\n".join(lines))
