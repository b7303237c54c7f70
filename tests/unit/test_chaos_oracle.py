"""The chaos run's oracle: what the books must show given which meter runs failed."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from cli.chaos import PLANS, oracle
from cli.scenario import SMALL, expected_posting

HOUR = timedelta(hours=1)


def all_ok(plan):  # type: ignore[no-untyped-def]
    return {(h, m) for h in plan.hour_list for m in ("cfapps", "cfservices")}


def test_with_every_run_ok_it_agrees_with_the_demo_oracle_over_a_whole_month() -> None:
    start, end = SMALL.bounds
    plan = replace(PLANS["small"], first_hour=start, hours=int((end - start) / HOUR))
    got = oracle(plan, all_ok(plan))
    demo = expected_posting(SMALL)
    assert got.estimated == 0
    assert got.held == demo.held_measurements
    assert sum(n for n, _ in got.per_hour.values()) == demo.measurements
    want = {(SMALL.customers[c], "2026-10", key): v for (c, key), v in demo.by_price.items() if v}
    assert {k: v for k, v in got.posted.items() if v} == want


def test_a_failed_hour_is_estimated_from_the_hour_before_for_resources_present_on_both_sides() -> None:
    plan = replace(PLANS["small"], hours=6)
    hours = plan.hour_list
    world = SMALL.foundation()
    failed = hours[2]
    ok = all_ok(plan) - {(failed, "cfapps")}
    got = oracle(plan, ok)

    before = {e.resource_guid: e.value for e in world.expected_usage(hours[1]) if e.meter == "cfapps"}
    after = {e.resource_guid for e in world.expected_usage(hours[3]) if e.meter == "cfapps"}
    carried = [v for r, v in before.items() if r in after]
    assert got.estimated == len(carried) > 0
    assert got.per_hour[(failed, "cfapps")] == (len(carried), sum(carried))
    services = [e for e in world.expected_usage(failed) if e.meter == "cfservices"]
    assert got.per_hour[(failed, "cfservices")] == (len(services), len(services))  # read, not estimated


def test_a_gap_longer_than_the_maximum_is_not_estimated_and_a_trailing_failure_waits() -> None:
    plan = replace(PLANS["small"], hours=80)
    hours = plan.hour_list
    gap = {(h, "cfapps") for h in hours[1:75]}  # 74 hours > 72
    got = oracle(plan, all_ok(plan) - gap - {(hours[-1], "cfservices")})
    assert got.estimated == 0
    assert all(got.per_hour[(h, "cfapps")] == (0, 0) for h in hours[1:75])
    assert got.per_hour[(hours[-1], "cfservices")] == (0, 0)
