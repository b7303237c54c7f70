"""Unit tests of the simulator's deterministic foundation model and its usage oracle."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

import pytest

from simulator.foundation import (
    MEMORY_CHOICES_MB,
    ExpectedMeasurement,
    Foundation,
    hour_index,
    to_hour,
)

START = datetime(2026, 10, 1, tzinfo=UTC)


def small(seed: int = 11) -> Foundation:
    return Foundation(seed, orgs=3, spaces_per_org=2, apps=150, services=60)


def month_hours(start: datetime = START, days: int = 31) -> list[datetime]:
    return [start + timedelta(hours=h) for h in range(days * 24)]


def test_same_arguments_give_the_same_world() -> None:
    a, b = small(5), small(5)
    assert a.orgs() == b.orgs()
    assert a.spaces() == b.spaces()
    assert a.plans() == b.plans()
    assert a.offerings() == b.offerings()
    for hour in (START, START + timedelta(hours=7), START + timedelta(days=20, hours=3)):
        assert a.snapshot(hour) == b.snapshot(hour)
        assert a.expected_usage(hour) == b.expected_usage(hour)


def test_different_seeds_give_different_worlds() -> None:
    a, b = small(5), small(6)
    assert {o.guid for o in a.orgs()}.isdisjoint({o.guid for o in b.orgs()})
    assert {x.guid for x in a.apps_at(START)}.isdisjoint({x.guid for x in b.apps_at(START)})
    assert Counter(m.value for m in a.expected_usage(START)) != Counter(m.value for m in b.expected_usage(START))


def test_state_at_an_hour_does_not_depend_on_what_was_asked_before() -> None:
    hour = START + timedelta(days=9, hours=13)
    fresh = small().snapshot(hour)
    warmed = small()
    for h in month_hours()[::17]:
        warmed.snapshot(h)
    assert warmed.snapshot(hour) == fresh


def test_hours_are_truncated_and_must_be_timezone_aware() -> None:
    f = small()
    est = timezone(timedelta(hours=-5))
    assert f.snapshot(datetime(2026, 10, 1, 0, 59, 59, tzinfo=est)) == f.snapshot(datetime(2026, 10, 1, 5, tzinfo=UTC))
    assert to_hour(datetime(2026, 10, 1, 0, 30, tzinfo=est)) == datetime(2026, 10, 1, 5, tzinfo=UTC)
    assert hour_index(START + timedelta(hours=3, minutes=10)) == hour_index(START) + 3
    with pytest.raises(ValueError):
        f.snapshot(datetime(2026, 10, 1))  # noqa: DTZ001 - naive, refused


def test_names_hierarchy_and_process_shapes() -> None:
    f = Foundation(3, orgs=4, spaces_per_org=3, apps=120, services=40)
    orgs = f.orgs()
    spaces = f.spaces()
    assert [o.name for o in orgs] == ["org-00", "org-01", "org-02", "org-03"]
    assert [s.name for s in spaces[:3]] == ["space-00-0", "space-00-1", "space-00-2"]
    org_of_space = {s.guid: s.org_guid for s in spaces}
    assert set(org_of_space.values()) == {o.guid for o in orgs}

    snap = f.snapshot(START)
    assert snap.apps and snap.service_instances
    app_by_guid = {a.guid: a for a in snap.apps}
    for app in snap.apps:
        assert app.name.startswith("app-") and len(app.name) == 8
        assert app.state in ("STARTED", "STOPPED")
        assert org_of_space[app.space_guid] == app.org_guid
    procs_by_app: dict[str, list[str]] = {}
    for proc in snap.processes:
        app = app_by_guid[proc.app_guid]  # every process belongs to an app existing at that hour
        assert (proc.space_guid, proc.org_guid) == (app.space_guid, app.org_guid)
        assert proc.memory_in_mb in MEMORY_CHOICES_MB
        assert proc.instances >= 1
        procs_by_app.setdefault(proc.app_guid, []).append(proc.type)
    assert set(procs_by_app) == set(app_by_guid)
    for types in procs_by_app.values():
        assert 1 <= len(types) <= 3
        assert "web" in types
        assert len(set(types)) == len(types)
    plan_guids = {p.guid for p in f.plans()}
    for si in snap.service_instances:
        assert si.name.startswith("si-")
        assert org_of_space[si.space_guid] == si.org_guid
        if si.type == "managed":
            assert si.plan_guid in plan_guids
        else:
            assert si.type == "user-provided" and si.plan_guid is None


def test_guids_are_unique_version_4_uuids() -> None:
    f = small()
    snap = f.snapshot(START)
    guids = (
        [o.guid for o in f.orgs()]
        + [s.guid for s in f.spaces()]
        + [p.guid for p in f.plans()]
        + [o.guid for o in f.offerings()]
        + [a.guid for a in snap.apps]
        + [p.guid for p in snap.processes]
        + [s.guid for s in snap.service_instances]
    )
    assert len(set(guids)) == len(guids)
    assert all(uuid.UUID(g).version == 4 and str(uuid.UUID(g)) == g for g in guids)


def test_plans_and_offerings_catalog() -> None:
    f = small()
    offerings = {o.guid: o.name for o in f.offerings()}
    assert sorted(offerings.values()) == ["aws-rds", "redis", "s3"]
    plans = f.plans()
    assert len(plans) == 6
    by_offering = Counter(offerings[p.offering_guid] for p in plans)
    assert by_offering == {"aws-rds": 2, "redis": 2, "s3": 2}
    assert {"micro-psql", "medium-psql"} <= {p.name for p in plans}
    more = Foundation(1, 1, 1, 0, 0, plans=11).plans()
    assert len(more) == 11 and len({p.name for p in more}) == 11


def test_invalid_arguments_are_rejected() -> None:
    for args in ((1, 0, 1, 1, 1), (1, 1, 0, 1, 1), (1, 1, 1, -1, 1), (1, 1, 1, 1, 1, 0)):
        with pytest.raises(ValueError):
            Foundation(*args)


def test_the_world_changes_within_a_month() -> None:
    f = small()
    hours = month_hours()
    appeared = disappeared = stopped = started = scaled = si_appeared = si_disappeared = 0
    prev = f.snapshot(hours[0])
    for hour in hours[1:]:
        cur = f.snapshot(hour)
        prev_apps = {a.guid: a for a in prev.apps}
        cur_apps = {a.guid: a for a in cur.apps}
        appeared += len(cur_apps.keys() - prev_apps.keys())
        disappeared += len(prev_apps.keys() - cur_apps.keys())
        for guid in cur_apps.keys() & prev_apps.keys():
            before, after = prev_apps[guid].state, cur_apps[guid].state
            stopped += before == "STARTED" and after == "STOPPED"
            started += before == "STOPPED" and after == "STARTED"
        prev_inst = {p.guid: p.instances for p in prev.processes}
        scaled += sum(1 for p in cur.processes if p.guid in prev_inst and prev_inst[p.guid] != p.instances)
        prev_si = {s.guid for s in prev.service_instances}
        cur_si = {s.guid for s in cur.service_instances}
        si_appeared += len(cur_si - prev_si)
        si_disappeared += len(prev_si - cur_si)
        prev = cur
    assert appeared > 0 and disappeared > 0
    assert stopped > 0 and started > 0
    assert scaled > 0
    assert si_appeared > 0 and si_disappeared > 0


def test_new_resources_are_created_in_the_hour_before_they_are_first_seen() -> None:
    f = small()
    hours = month_hours(days=10)
    for prev_hour, hour in itertools.pairwise(hours):
        before = {a.guid for a in f.apps_at(prev_hour)} | {s.guid for s in f.service_instances_at(prev_hour)}
        for res in [*f.apps_at(hour), *f.service_instances_at(hour)]:
            assert res.created_at < hour
            if res.guid not in before:
                assert prev_hour <= res.created_at < hour
            assert res.updated_at >= res.created_at


def test_a_deleted_app_comes_back_as_a_new_app_with_a_new_guid() -> None:
    f = small()
    names_to_guids: dict[str, set[str]] = {}
    for hour in month_hours(days=62)[::6]:
        for app in f.apps_at(hour):
            names_to_guids.setdefault(app.name, set()).add(app.guid)
    assert any(len(guids) > 1 for guids in names_to_guids.values())


def test_expected_usage_follows_the_meter_rules() -> None:
    f = small()
    hour = START + timedelta(days=3, hours=4)
    snap = f.snapshot(hour)
    memory: Counter[str] = Counter()
    for p in snap.processes:
        memory[p.app_guid] += p.instances * p.memory_in_mb
    want = {
        ExpectedMeasurement("cfapps", a.guid, "", a.org_guid, a.space_guid, memory[a.guid])
        for a in snap.apps
        if a.state == "STARTED"
    } | {
        ExpectedMeasurement("cfservices", s.guid, s.plan_guid or "", s.org_guid, s.space_guid, 1)
        for s in snap.service_instances
        if s.type == "managed"
    }
    got = f.expected_usage(hour)
    assert len(got) == len(set(got)) == len(want)
    assert set(got) == want
    # the world exercises the exclusions: stopped apps and user-provided instances exist
    stopped = {a.guid for a in snap.apps if a.state == "STOPPED"}
    user_provided = {s.guid for s in snap.service_instances if s.type == "user-provided"}
    assert stopped and user_provided
    measured = {m.resource_guid for m in got}
    assert not measured & stopped and not measured & user_provided
    assert all(m.value > 0 for m in got)


def test_expected_usage_hand_checked_for_one_app() -> None:
    f = small()
    snap = f.snapshot(START)
    app = next(a for a in snap.apps if a.state == "STARTED")
    procs = [p for p in snap.processes if p.app_guid == app.guid]
    (measurement,) = [m for m in f.expected_usage(START) if m.resource_guid == app.guid]
    assert measurement.meter == "cfapps"
    assert measurement.resource_kind == ""
    assert measurement.value == sum(p.instances * p.memory_in_mb for p in procs)


def test_a_foundation_with_fifty_thousand_resources_works() -> None:
    f = Foundation(2, orgs=50, spaces_per_org=10, apps=40_000, services=10_000)
    hour = START + timedelta(hours=5)
    snap = f.snapshot(hour)
    assert 25_000 < len(snap.apps) <= 40_000
    assert len(snap.processes) >= len(snap.apps)
    assert 5_000 < len(snap.service_instances) <= 10_000
    usage = f.expected_usage(hour)
    assert {m.meter for m in usage} == {"cfapps", "cfservices"}
    assert len({a.guid for a in snap.apps}) == len(snap.apps)
