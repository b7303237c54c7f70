"""The dashboard's SVG charts and the view logic they draw (services/api/charts.py and the pure functions
of services/api/views.py): scales, stacking, exact labels, accessible names, colour contrast, the
burn-down series, the burn rate and the run-out date. Expected figures are computed here independently
(Decimal, Fraction, hand arithmetic), never taken from the code under test."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.charts import (
    OTHER_COLOUR,
    PALETTE,
    BurnDown,
    Linear,
    Series,
    axis_ticks,
    burn_down,
    format_credits,
    nice_step,
    stack,
    stacked_bars,
    tick_label,
)
from services.api.service import Balance
from services.api.views import (
    MAX_SERIES,
    Group,
    LedgerFact,
    burn_rate,
    burn_view,
    burn_window,
    daily_remaining,
    run_out,
    usage_series,
)

SVG = "{http://www.w3.org/2000/svg}"
CSS = Path(__file__).resolve().parents[2] / "services" / "api" / "static" / "dashboard.css"
MONEY_LABEL = re.compile(r"^-?\d{1,3}(,\d{3})*(\.\d{1,6})?$")


def credits_decimal(microcredits: Fraction | int, places: int = 6) -> str:
    """The oracle: exact decimal arithmetic, half up, grouped by Python's own format."""
    value = Decimal(Fraction(microcredits).numerator) / Decimal(Fraction(microcredits).denominator)
    q = (value / Decimal(1_000_000)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return f"{q:,.{places}f}"


def label_value(text: str) -> Fraction:
    """A credits label back to exact microcredits."""
    assert MONEY_LABEL.match(text), text
    return Fraction(Decimal(text.replace(",", ""))) * 1_000_000


def parse(svg: str) -> ET.Element:
    return ET.fromstring(str(svg))


# ------------------------------------------------------------------------------------- money text


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (1_000_000, "1.000000"),
        (1_234_567_891, "1,234.567891"),
        (-2_500_000, "-2.500000"),
    ],
)
def test_format_credits_groups_digits_of_the_exact_figure(micro: int, text: str):
    assert format_credits(micro) == text


@settings(max_examples=300, deadline=None)
@given(st.integers(-(10**15), 10**15), st.integers(1, 10**6))
def test_format_credits_rounds_fractions_half_up_like_decimal(n: int, d: int):
    assert format_credits(Fraction(n, d)) == credits_decimal(Fraction(n, d)).replace("-0.000000", "0.000000")


# ------------------------------------------------------------------------------------------- scales


@settings(max_examples=300, deadline=None)
@given(st.integers(-(10**13), 10**13), st.integers(0, 10**13))
def test_axis_ticks_cover_the_range_with_round_steps(low: int, span: int):
    high = low + span
    ticks = axis_ticks(low, high)
    step = ticks[1] - ticks[0]
    assert ticks[0] <= low and ticks[-1] >= high
    assert all(b - a == step for a, b in itertools.pairwise(ticks))
    assert all(t % step == 0 for t in ticks)
    mantissa = int(str(step).rstrip("0") or "0")
    assert mantissa in (1, 2, 5), step
    assert len(ticks) <= 5 + 2
    assert step == nice_step(span) or span == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**13))
def test_tick_labels_are_exact_and_never_float_text(span: int):
    ticks = axis_ticks(0, span)
    step = ticks[1] - ticks[0]
    for t in ticks:
        text = tick_label(t, step)
        assert "e" not in text.lower()
        assert label_value(text) == t


def test_linear_scale_maps_the_ends_exactly_and_inverts():
    y = Linear.of(0, 5_000_000, 300, 20)
    assert y(0) == 300.0 and y(5_000_000) == 20.0
    assert y.exact(2_500_000) == 160
    assert y(Fraction(1, 3)) == round(300 - 280 / 15_000_000, 2)
    with pytest.raises(ValueError):
        Linear.of(1, 1, 0, 10)


# ------------------------------------------------------------------------------------ stacked bars

DAYS = [date(2026, 10, 1) + timedelta(days=i) for i in range(31)]

amounts = st.fractions(min_value=0, max_value=10**9, max_denominator=730 * 1024)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(DAYS), amounts, max_size=31), min_size=1, max_size=9))
def test_stacking_sums_to_each_days_total_without_gaps(values: list[dict[date, Fraction]]):
    series = [Series(f"s{i}", f"series {i}", v, PALETTE[i % len(PALETTE)]) for i, v in enumerate(values)]
    bars = stack(DAYS, series)
    for day in DAYS:
        total = sum((v.get(day, Fraction(0)) for v in values), Fraction(0))
        segments = bars[day]
        level = Fraction(0)
        for seg in segments:
            assert seg.low == level and seg.high > seg.low
            level = seg.high
        assert level == total
        assert [s.series.key for s in segments] == [s.key for s, v in zip(series, values, strict=True) if v.get(day)]


def test_stack_refuses_negative_usage():
    with pytest.raises(ValueError):
        stack(DAYS[:1], [Series("a", "a", {DAYS[0]: Fraction(-1)}, PALETTE[0])])


def grid_scale(root: ET.Element) -> tuple[Fraction, Fraction]:
    """(microcredits per pixel, y of zero) read from two labelled grid lines of the chart itself."""
    labels = [
        (float(t.get("y")), label_value(t.text or ""))
        for t in root.iter(f"{SVG}text")
        if t.get("text-anchor") == "end" and t.text and t.text[0].isdigit()
    ]
    (y0, v0), (y1, v1) = labels[0], labels[-1]
    per_px = (v1 - v0) / Fraction(y0 - y1).limit_denominator(100)
    return per_px, Fraction(y0).limit_denominator(100) + v0 / per_px


def test_stacked_bars_draw_each_day_as_tall_as_its_total_and_label_exactly():
    org_a = {DAYS[0]: Fraction(1_000_000, 3), DAYS[1]: Fraction(2_500_000), DAYS[5]: Fraction(7, 730)}
    org_b = {DAYS[0]: Fraction(4_000_000), DAYS[1]: Fraction(1, 2)}
    svg = stacked_bars(
        DAYS,
        [Series("org-a", "Org <A> & co", org_a, PALETTE[0]), Series("org-b", "Org B", org_b, PALETTE[1])],
        title="Usage per day",
        desc="Stacked usage of two orgs",
        id_prefix="u",
    )
    root = parse(svg)
    per_px, _ = grid_scale(root)
    rects = [r for r in root.iter(f"{SVG}rect") if r.get("data-day")]
    by_day: dict[str, list[ET.Element]] = {}
    for r in rects:
        by_day.setdefault(r.get("data-day", ""), []).append(r)
    assert set(by_day) == {DAYS[0].isoformat(), DAYS[1].isoformat(), DAYS[5].isoformat()}
    for day in (DAYS[0], DAYS[1], DAYS[5]):
        total = org_a.get(day, Fraction(0)) + org_b.get(day, Fraction(0))
        segs = by_day[day.isoformat()]
        exact = sum((Fraction(r.get("data-microcredits-exact", "")) for r in segs), Fraction(0))
        assert exact == total
        height = sum(Fraction(r.get("height", "0")).limit_denominator(100) for r in segs)
        assert abs(height * per_px - total) <= per_px / 10  # within a tenth of a pixel (coordinates keep 0.01 px)
        # segments touch: each one starts where the one below ends
        ordered = sorted(segs, key=lambda r: -float(r.get("y", "0")))
        for lower, upper in itertools.pairwise(ordered):
            assert abs(float(upper.get("y", "0")) + float(upper.get("height", "0")) - float(lower.get("y", "0"))) < 0.02
        for r in segs:
            title = r.find(f"{SVG}title")
            assert title is not None and title.text is not None
            amount = Fraction(r.get("data-microcredits-exact", ""))
            assert title.text.endswith(f"{credits_decimal(amount)} credits")
    assert any(r.find(f"{SVG}title").text.startswith("Org <A> & co,") for r in rects)  # escaped in, parsed back


def test_every_chart_is_an_image_named_by_its_title_and_desc():
    bars = parse(
        stacked_bars(
            DAYS[:3], [Series("x", "X", {DAYS[0]: Fraction(5)}, PALETTE[0])], title="T1", desc="D1", id_prefix="bars"
        )
    )
    burn = parse(
        burn_down(
            BurnDown(DAYS[:3], [3_000_000, 2_000_000, 1_000_000], 3_000_000, DAYS[2], DAYS[2]),
            title="T2",
            desc="D2",
            id_prefix="burn",
        )
    )
    for root, title, desc in ((bars, "T1", "D1"), (burn, "T2", "D2")):
        assert root.get("role") == "img"
        ids = (root.get("aria-labelledby") or "").split()
        found = {el.get("id"): el for el in root.iter() if el.get("id")}
        assert [found[i].tag for i in ids] == [f"{SVG}title", f"{SVG}desc"]
        assert found[ids[0]].text == title and found[ids[1]].text == desc


def test_every_money_label_of_a_chart_is_integer_formatted():
    values = {d: Fraction(i * 1_234_567, 7) for i, d in enumerate(DAYS)}
    root = parse(stacked_bars(DAYS, [Series("a", "A", values, PALETTE[0])], title="t", desc="d", id_prefix="m"))
    money = [t.text for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end" and t.text != "credits"]
    assert len(money) >= 3
    for text in money:
        assert MONEY_LABEL.match(text or ""), text


# ------------------------------------------------------------------------------------------ burn-down


def test_burn_down_points_follow_the_remaining_credits_and_the_projection_reaches_zero():
    days = DAYS[:10]
    remaining = [10_000_000 - i * 700_000 for i in range(10)]
    bd = BurnDown(
        days, remaining, 10_000_000, days[-1], days[-1] + timedelta(days=5), (days[-1] + timedelta(days=5), Fraction(0))
    )
    root = parse(burn_down(bd, title="t", desc="d", id_prefix="b"))
    per_px, zero_y = grid_scale(root)
    line = root.find(f"{SVG}polyline")
    assert line is not None
    points = [tuple(map(float, p.split(","))) for p in (line.get("points") or "").split()]
    assert len(points) == len(days)
    assert all(b[0] > a[0] for a, b in itertools.pairwise(points))
    for (_, y), value in zip(points, remaining, strict=True):
        assert abs((zero_y - Fraction(y).limit_denominator(100)) * per_px - value) <= per_px / 10
    projected = root.find(f"{SVG}line[@class='projected']")
    assert projected is not None
    assert abs(float(projected.get("y2", "0")) - float(zero_y)) < 0.02
    assert float(projected.get("x2", "0")) > points[-1][0]


def test_burn_down_refuses_an_axis_shorter_than_its_days():
    with pytest.raises(ValueError):
        BurnDown(DAYS[:3], [1, 2, 3], 3, DAYS[0], DAYS[1])
    with pytest.raises(ValueError):
        BurnDown(DAYS[:3], [1, 2], 3, DAYS[0], DAYS[2])


# -------------------------------------------------------------------------------------------- colour


def luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_chart_colours_stand_out_from_the_white_plot():
    assert len(set(PALETTE)) == len(PALETTE) and OTHER_COLOUR not in PALETTE
    for colour in (*PALETTE, OTHER_COLOUR):
        assert contrast(colour, "#ffffff") >= 3.0, colour


def test_the_stylesheet_colours_meet_wcag_aa():
    props = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-fA-F]{6})", CSS.read_text()))
    for fg in ("ink", "muted", "link", "danger"):
        for bg in ("surface", "page", "warn-bg", "notice-bg"):
            assert contrast(props[fg], props[bg]) >= 4.5, (fg, bg)
    assert contrast(props["header-ink"], props["header"]) >= 4.5
    assert contrast(props["focus"], props["surface"]) >= 3.0 and contrast(props["focus"], props["page"]) >= 3.0
    assert contrast(props["line"], props["surface"]) >= 3.0  # input borders are UI components (1.4.11)


# ---------------------------------------------------------------------------------------- view logic

T0 = datetime(2026, 9, 1, 4, tzinfo=UTC)  # midnight in New York


def fact(at: datetime, type_: str, amount: int) -> LedgerFact:
    bucket = {"funding": "funded", "usage": "used", "late_usage": "used", "expiry": "expired"}[type_]
    return LedgerFact(at, type_, bucket, amount)


def test_daily_remaining_counts_each_days_transactions_by_new_york_day():
    facts = [
        fact(T0, "funding", 100),
        fact(T0 + timedelta(hours=23, minutes=59), "usage", 10),  # Sep 1, 23:59 EDT: still Sep 1
        fact(T0 + timedelta(hours=24), "usage", 5),  # Sep 2, 00:00 EDT
        fact(T0 + timedelta(days=3), "expiry", 20),  # Sep 4
    ]
    first = date(2026, 9, 1)
    assert daily_remaining(facts, first, date(2026, 9, 5)) == [90, 85, 85, 65, 65]
    assert daily_remaining(facts, date(2026, 9, 2), date(2026, 9, 2)) == [85]  # earlier days count as the start


def test_the_burn_down_draws_a_bounded_window_whatever_the_agreements_dates():
    now = datetime(2026, 9, 15, 16, tzinfo=UTC)
    start, end = burn_window(now)
    # New York midnights: a year and a day back (2025-09-14 is EDT) and a year and a day ahead (EDT too)
    assert start == datetime(2025, 9, 14, 4, tzinfo=UTC)
    assert end == datetime(2027, 9, 17, 4, tzinfo=UTC)
    # Funded in 2000 (only its sum is read: the opening), used in the window, a funding far ahead ignored
    # past the chart's edge: 366 days back + today + 366 ahead at most.
    opening = {"funded": 5_000_000, "used": 1_000_000}
    facts = [fact(now - timedelta(days=3), "usage", 250_000), fact(end - timedelta(hours=1), "funding", 7)]
    view = burn_view(facts, Balance(5_000_000, 1_250_000, 0), None, None, now, opening)
    assert view is not None
    days = [d for d, _ in view["rows"]]
    assert days[0] == date(2025, 9, 14) and days[-1] == date(2027, 9, 16) and len(days) == 366 + 1 + 366
    remaining = dict(view["rows"])
    assert remaining[date(2025, 9, 14)] == 4_000_000  # the opening sums, before anything in the window
    assert remaining[date(2026, 9, 12)] == 3_750_000
    assert remaining[date(2027, 9, 16)] == 3_750_007
    # nothing in the window and nothing before: no chart; only an opening: a flat line from the window start
    assert burn_view([], Balance(0, 0, 0), None, None, now, {}) is None
    assert burn_view([], Balance(0, 0, 0), None, None, now, {"funded": 0}) is None  # a funding reversed, long ago
    flat = burn_view([], Balance(9, 0, 0), None, None, now, {"funded": 9})
    assert flat is not None and {r for _, r in flat["rows"]} == {9} and len(flat["rows"]) == 367


def test_burn_rate_averages_the_30_days_up_to_the_last_posted_usage():
    usage = [fact(T0 + timedelta(hours=h), "usage", 1_000) for h in range(40 * 24)]  # 40 days, 1,000 an hour
    rate = burn_rate([fact(T0, "funding", 10**9), *usage])
    assert rate is not None
    assert rate.end == T0 + timedelta(days=40)
    assert rate.start == rate.end - timedelta(days=30)
    assert rate.per_day == 24_000 and rate.days == 30
    # usage that began less than 30 days before: the window starts with it
    short = burn_rate([fact(T0 + timedelta(hours=h), "usage", 500) for h in range(5 * 24)])
    assert short is not None and short.days == 5 and short.per_day == 12_000
    assert burn_rate([fact(T0, "funding", 5)]) is None


def test_run_out_spends_what_remains_at_the_rate_from_now():
    rate = burn_rate([fact(T0 + timedelta(hours=h), "usage", 1_000) for h in range(10 * 24)])  # 24,000 a day
    assert rate is not None
    now = T0 + timedelta(days=20)
    assert run_out(240_000, rate, now) == now + timedelta(days=10)
    assert run_out(1, rate, now) == now + timedelta(microseconds=3_600_000_000 // 1_000)  # rounded up
    assert run_out(0, rate, now) is None and run_out(-5, rate, now) is None
    assert run_out(10**30, rate, now) is None  # centuries away: not projected
    earlier = T0 + timedelta(days=5)  # "now" before the end of the window: spent from the window's end
    assert run_out(24_000, rate, earlier) == rate.end + timedelta(days=1)


def test_usage_series_keep_one_colour_each_until_the_palette_is_used_up():
    days = {DAYS[0]: Fraction(1)}
    few = [Group(f"g{i}", f"G{i}", {DAYS[0]: Fraction(i + 1)}) for i in range(MAX_SERIES)]
    series, colours = usage_series(few)
    assert [s.key for s in series] == [f"g{i}" for i in reversed(range(MAX_SERIES))]  # largest first
    assert len(set(colours.values())) == MAX_SERIES
    many = [Group(f"g{i}", f"G{i}", dict(days)) for i in range(MAX_SERIES + 3)]
    series, colours = usage_series(many)
    assert len(series) == MAX_SERIES and series[-1].colour == OTHER_COLOUR
    assert series[-1].values[DAYS[0]] == 4  # the 4 smallest merged
    assert sum(s.values[DAYS[0]] for s in series) == MAX_SERIES + 3
