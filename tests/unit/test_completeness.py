"""The completeness report without I/O: the reconciliation rules on plain data, the range rules, the
attribution of dead-lettered messages, the report document against the OpenAPI schema, and
``billing completeness`` against a stub of the api (httpx MockTransport)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import typer
from typer.testing import CliRunner

from cli.completeness import EXIT_API, EXIT_FLAGGED, EXIT_OK, EXIT_USAGE, completeness, register
from services.api.completeness import (
    MAX_HOURS,
    CollectorFacts,
    CollectorRow,
    DeadLetterCounts,
    LedgerRow,
    PricerRow,
    UpstreamAnswerError,
    build_report,
    parse_collector,
    parse_range,
    reconcile,
    report_json,
)
from services.api.dead_letters import _count as count_record
from services.api.dead_letters import attribute
from services.collector.app import create_app as collector_app
from services.collector.settings import CollectorSettings
from shared.completeness import CollectorCompleteness, CollectorCount
from shared.completeness import parse_range as parse_internal_range
from shared.edge import ProblemError
from tests.support.openapi_checks import response_schema, violations

H = timedelta(hours=1)
T = datetime(2026, 10, 6, 4, tzinfo=UTC)
HOURS = [T + k * H for k in range(4)]
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def facts(
    rows: dict[tuple[datetime, str], CollectorRow],
    since: datetime | None = T,
    meters: tuple[str, ...] = ("cfapps",),
    due_before: datetime = NOW,
) -> CollectorFacts:
    return CollectorFacts(meters, {m: since for m in meters}, due_before, rows)


def consistent() -> tuple[CollectorFacts, dict[Any, PricerRow], dict[Any, LedgerRow]]:
    """Four hours of 10 app measurements: 7 priced and 3 unpriced at the pricer (2 of them re-priced to
    revision 2), 8 posted and 2 held at the ledger, all at the latest revision."""
    c = facts({(h, "cfapps"): CollectorRow(read=10, published=10, meter_run="ok") for h in HOURS})
    p = {(h, "cfapps"): PricerRow(priced=7, unpriced=3, revisions=12) for h in HOURS}
    led = {(h, "cfapps"): LedgerRow(posted=8, held=2, revisions=12) for h in HOURS}
    return c, p, led


def problems(rows: list[Any]) -> dict[tuple[datetime, str], list[tuple[str, str]]]:
    return {(r.hour, r.meter): [(p.rule, p.detail) for p in r.problems] for r in rows if r.problems}


# ------------------------------------------------------------------------------------------ the rules


def test_a_consistent_pipeline_reconciles_every_row():
    c, p, led = consistent()
    rows = reconcile(HOURS, c, p, led, {}, {})
    assert [(r.hour, r.meter) for r in rows] == [(h, "cfapps") for h in HOURS]
    assert all(r.reconciles and r.expected and r.reading == "ok" and r.unpublished == 0 for r in rows)


def test_each_rule_names_itself_with_its_numbers():
    c, p, led = consistent()
    h0, h1, h2, h3 = HOURS
    c = facts({**c.rows, (h0, "cfapps"): CollectorRow(read=10, estimated=2, published=10, meter_run="ok")})
    p = {
        **p,
        (h0, "cfapps"): PricerRow(priced=7, unpriced=3, revisions=12),
        (h1, "cfapps"): PricerRow(priced=6, unpriced=3, revisions=11),
    }
    led = {
        **led,
        (h1, "cfapps"): LedgerRow(posted=7, held=2, revisions=11),
        (h2, "cfapps"): LedgerRow(posted=7, held=2, revisions=11),
        (h3, "cfapps"): LedgerRow(posted=8, held=2, revisions=10),
    }
    got = problems(reconcile(HOURS, c, p, led, {}, {}))
    assert got == {
        (h0, "cfapps"): [
            ("published", "read 10 + estimated 2 = 12 measurements, published 10 (2 still in the collector's outbox)")
        ],
        (h1, "cfapps"): [("priced", "published 10, the pricer has priced 6 + unpriced 3 + dead-lettered 0 = 9")],
        (h2, "cfapps"): [
            ("posted", "priced 7 + unpriced 3 = 10 charges, the ledger has posted 7 + held 2 + dead-lettered 0 = 9")
        ],
        (h3, "cfapps"): [
            (
                "latest_revision",
                (
                    "the pricer's latest revisions sum to 12, the ledger applied revisions summing to 10: "
                    "2 revision(s) not applied"
                ),
            )
        ],
    }


def test_dead_letters_complete_the_counts_of_their_stage():
    c, p, led = consistent()
    h = HOURS[1]
    p[(h, "cfapps")] = PricerRow(priced=6, unpriced=3, revisions=11)  # one measurement refused by the pricer
    led[(h, "cfapps")] = LedgerRow(posted=6, held=2, revisions=9)  # one charge refused by the ledger (revision 2)
    rows = reconcile(HOURS, c, p, led, {(h, "cfapps"): 1}, {(h, "cfapps"): 1})
    row = next(r for r in rows if r.hour == h)
    assert row.reconciles and (row.dead_lettered_at_pricer, row.dead_lettered_at_ledger) == (1, 1)
    # without the dead letters the same numbers do not add up, at both stages
    assert [x.rule for x in next(r for r in reconcile(HOURS, c, p, led, {}, {}) if r.hour == h).problems] == [
        "priced",
        "posted",
    ]


def test_a_dead_letter_of_something_never_published_is_flagged():
    c, p, led = consistent()
    extra = (HOURS[2], "cfservices")
    rows = reconcile(HOURS, c, p, led, {extra: 1}, {})
    assert problems(rows) == {
        extra: [("priced", "published 0, the pricer has priced 0 + unpriced 0 + dead-lettered 1 = 1")]
    }
    assert not next(r for r in rows if (r.hour, r.meter) == extra).expected  # not a meter the collector runs


def test_expected_hours_start_at_the_first_reading_and_stop_at_the_current_hour():
    # read at hours 1 and 2 only; expected since hour 1; the clock is in hour 3 (not due yet)
    rows_in = {
        (HOURS[1], "cfapps"): CollectorRow(read=1, published=1, meter_run="ok"),
        (HOURS[2], "cfapps"): CollectorRow(read=1, published=1, meter_run="ok"),
    }
    ok = {k: PricerRow(priced=1, revisions=1) for k in rows_in}
    posted = {k: LedgerRow(posted=1, revisions=1) for k in rows_in}
    rows = reconcile(HOURS, facts(rows_in, since=HOURS[1], due_before=HOURS[3]), ok, posted, {}, {})
    assert [(r.hour, r.expected, r.reconciles) for r in rows] == [(HOURS[1], True, True), (HOURS[2], True, True)]
    # the same clock an hour later: hour 3 is due, and missing
    later = reconcile(HOURS, facts(rows_in, since=HOURS[1], due_before=HOURS[3] + H), ok, posted, {}, {})
    assert problems(later) == {(HOURS[3], "cfapps"): [("reading", "reading missing: no reading and no estimate")]}
    # a collector that never read anything expects nothing
    assert reconcile(HOURS, facts({}, since=None), {}, {}, {}, {}) == []


def test_a_missing_reading_is_found_per_meter_and_an_estimate_covers_it():
    meters = ("cfapps", "cfservices")
    c = facts(
        {
            (HOURS[0], "cfapps"): CollectorRow(read=5, published=5, meter_run="ok"),
            (HOURS[0], "cfservices"): CollectorRow(meter_run="failed"),  # failed, never estimated
            (HOURS[1], "cfapps"): CollectorRow(estimated=5, published=5),  # estimated later
            (HOURS[1], "cfservices"): CollectorRow(estimated=2, published=2),
        },
        meters=meters,
        due_before=HOURS[2],
    )
    p = {k: PricerRow(priced=v.read + v.estimated, revisions=v.read + v.estimated) for k, v in c.rows.items()}
    led = {k: LedgerRow(posted=v.priced, revisions=v.revisions) for k, v in p.items()}
    rows = reconcile(HOURS, c, p, led, {}, {})
    assert {(r.hour, r.meter): r.reading for r in rows} == {
        (HOURS[0], "cfapps"): "ok",
        (HOURS[0], "cfservices"): "failed",
        (HOURS[1], "cfapps"): "estimated",
        (HOURS[1], "cfservices"): "estimated",
    }
    assert problems(rows) == {
        (HOURS[0], "cfservices"): [("reading", "reading missing: the meter failed and the hour was not estimated")]
    }


def test_the_revision_check_waits_for_the_counts_to_match():
    c, p, led = consistent()
    led[(HOURS[0], "cfapps")] = LedgerRow(posted=7, held=2, revisions=9)  # one charge missing, sums differ too
    got = problems(reconcile(HOURS, c, p, led, {}, {}))
    assert [rule for rule, _ in got[(HOURS[0], "cfapps")]] == ["posted"]


def test_rows_outside_the_range_are_ignored():
    c, p, led = consistent()
    rows = reconcile(HOURS[1:3], c, p, led, {(HOURS[0], "cfapps"): 4}, {(HOURS[3], "cfapps"): 4})
    assert [r.hour for r in rows] == HOURS[1:3] and all(r.reconciles for r in rows)


# ------------------------------------------------------------------------------------------ the document


def test_the_report_document_sums_its_rows_and_matches_its_schema():
    c, p, led = consistent()
    led[(HOURS[2], "cfapps")] = LedgerRow(posted=8, held=1, revisions=11)
    rows = reconcile(HOURS, c, p, led, {}, {})
    dlq = DeadLetterCounts("x.usage.readings.v1.dlq", ("pricer",), records=3, counted=2, unattributed=2)
    doc = report_json(HOURS[0], HOURS[-1] + H, rows, c.meters, [dlq], NOW)
    assert violations(doc, response_schema("/admin/completeness", "get", 200)) == []
    assert doc["hours"] == 4 and doc["flagged"] == 1 and doc["reconciles"] is False and doc["missing_readings"] == 0
    assert doc["totals"]["read"] == 40 and doc["totals"]["posted"] == 32 and doc["totals"]["held"] == 7
    assert doc["rows"][2]["problems"][0]["rule"] == "posted" and doc["rows"][2]["hour"] == "2026-10-06T06:00:00Z"
    # a DLQ that could not be read makes the whole report unreconciled, even with every row in order
    fine = reconcile(HOURS, *consistent(), {}, {})
    broken = DeadLetterCounts("x.usage.charges.v1.dlq", ("ledger",), complete=False, error="timed out")
    doc = report_json(HOURS[0], HOURS[-1] + H, fine, ("cfapps",), [broken], NOW)
    assert doc["flagged"] == 0 and doc["reconciles"] is False and "x.usage.charges.v1.dlq" in doc["problems"][0]


async def test_build_report_asks_each_owner_and_refuses_a_wrong_answer():
    asked: list[tuple[str, str, dict[str, str]]] = []
    answers = {
        "collector": {
            "meters": ["cfapps"],
            "expected_since": {"cfapps": "2026-10-06T04:00:00Z"},
            "due_before": "2026-11-01T00:00:00Z",
            "items": [
                {
                    "hour": "2026-10-06T04:00:00Z",
                    "meter": "cfapps",
                    "read": 2,
                    "estimated": 0,
                    "published": 2,
                    "meter_run": "ok",
                }
            ],
        },
        "pricer": {
            "items": [{"hour": "2026-10-06T04:00:00Z", "meter": "cfapps", "priced": 1, "unpriced": 0, "revisions": 1}]
        },
        "ledger": {
            "items": [{"hour": "2026-10-06T04:00:00Z", "meter": "cfapps", "posted": 1, "held": 0, "revisions": 1}]
        },
    }

    async def get_json(service: str, path: str, params: Any) -> Any:
        asked.append((service, path, dict(params)))
        return answers[service]

    async def dlqs() -> tuple[list[DeadLetterCounts], list[DeadLetterCounts]]:
        return (
            [
                DeadLetterCounts("r2.dlq", ("pricer",), records=1, counted=1, by_row={(HOURS[0], "cfapps"): 1}),
                DeadLetterCounts("r1.dlq", ("pricer",)),
            ],
            [DeadLetterCounts("c.dlq", ("ledger",))],
        )

    doc = await build_report(get_json, dlqs, HOURS[0], HOURS[0] + H)
    assert sorted(asked) == [
        (s, "/internal/completeness", {"from": "2026-10-06T04:00:00Z", "to": "2026-10-06T05:00:00Z"})
        for s in ("collector", "ledger", "pricer")
    ]
    assert doc["reconciles"] is True and doc["rows"][0]["dead_lettered_at_pricer"] == 1
    assert [d["topic"] for d in doc["dead_letters"]] == ["r2.dlq", "r1.dlq", "c.dlq"]
    answers["pricer"] = {"items": [{"hour": "2026-10-06T04:00:00", "meter": "cfapps", "priced": 1}]}  # a naive hour
    with pytest.raises(UpstreamAnswerError):
        await build_report(get_json, dlqs, HOURS[0], HOURS[0] + H)
    with pytest.raises(UpstreamAnswerError):
        parse_collector({"meters": ["cfapps"], "items": []})


# ------------------------------------------------------------------------------------------ ranges


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"from": "2026-10-06T04:00:00Z"},
        {"to": "2026-10-06T04:00:00Z"},
        {"from": "2026-10-06T04:00:00", "to": "2026-10-06T05:00:00Z"},
        {"from": "yesterday", "to": "2026-10-06T05:00:00Z"},
        {"from": "2026-10-06T05:00:00Z", "to": "2026-10-06T05:00:00Z"},
        {"from": "2026-10-06T04:20:00Z", "to": "2026-10-06T04:40:00Z"},
        {"from": "2026-10-01T00:00:00Z", "to": "2026-11-01T00:00:01Z"},
        {"from": "1970-01-01T00:00:00Z", "to": "9998-12-31T00:00:00Z"},
        {"from": "2026-10-06T04:00:00Z", "to": "2026-10-06T05:00:00Z", "limit": "3"},
    ],
)
def test_bad_ranges_are_422(query):
    with pytest.raises(ProblemError) as exc:
        parse_range(query)
    assert exc.value.status == 422


def test_a_range_covers_its_whole_hours():
    assert parse_range({"from": "2026-10-06T04:30:00Z", "to": "2026-10-06T07:00:00+01:00"}) == (T + H, T + 2 * H)
    start, end = parse_range({"from": "2026-10-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"})
    assert (end - start) / H == MAX_HOURS == 744


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"from": "2026-10-06T04:00:00Z"},
        {"from": "2026-10-06T04:00:00", "to": "2026-10-06T05:00:00Z"},
        {"from": "2026-10-06T05:00:00Z", "to": "2026-10-06T04:00:00Z"},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
        {"from": "0001-01-01T00:00:00+01:00", "to": "2026-03-01T00:00:00Z"},
    ],
)
def test_the_internal_routes_refuse_bad_ranges_with_422(query):
    with pytest.raises(ProblemError) as exc:
        parse_internal_range(query)
    assert exc.value.status == 422


def test_the_internal_contract_refuses_naive_hours_and_negative_counts_and_is_documented():
    good = {"hour": "2026-10-06T04:00:00Z", "meter": "cfapps", "read": 1}
    assert CollectorCount.model_validate(good).hour == T
    for bad in (
        {**good, "hour": "2026-10-06T04:00:00"},
        {**good, "read": -1},
        {**good, "read": "1"},
        {**good, "extra": 1},
    ):
        with pytest.raises(ValueError):
            CollectorCount.model_validate(bad)
    doc = collector_app(CollectorSettings(port=1)).state.runtime.openapi_document()
    path = doc["paths"]["/internal/completeness"]["get"]
    assert {p["name"] for p in path["parameters"]} == {"from", "to"}
    answer = path["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert answer == CollectorCompleteness.__name__ and "$defs" not in json.dumps(doc)


# ------------------------------------------------------------------------------------------ dead letters


def test_a_dead_letter_is_attributed_by_its_reading_hour_and_meter():
    doc = {"id": "m-1", "resource_id": "app-1", "reading_hour": "2026-10-06T04:00:00Z", "meter": "cfapps", "value": -1}
    assert attribute(orjson.dumps(doc)) == ((T, "cfapps"), ["app-1"])
    # a time inside the hour, in another zone, belongs to its UTC hour
    assert attribute(orjson.dumps({**doc, "reading_hour": "2026-10-06T00:30:00-04:00"})) == ((T, "cfapps"), ["app-1"])
    assert attribute(orjson.dumps({**doc, "resource_id": 7})) == ((T, "cfapps"), [None])


def test_a_dead_lettered_batch_counts_each_of_its_measurements():
    batch = {"reading_hour": "2026-10-06T04:00:00Z", "meter": "cfservices", "resource_id": ["si-1", "si-2", 3]}
    assert attribute(orjson.dumps(batch)) == ((T, "cfservices"), ["si-1", "si-2", None])


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"\x00\xff",
        orjson.dumps({"reading_hour": "2026-10-06T04:00:00", "meter": "cfapps"}),  # no zone
        orjson.dumps({"reading_hour": "soon", "meter": "cfapps"}),
        orjson.dumps({"reading_hour": 12, "meter": "cfapps"}),
        orjson.dumps({"reading_hour": "2026-10-06T04:00:00Z"}),
        orjson.dumps({"reading_hour": "2026-10-06T04:00:00Z", "meter": ""}),
        orjson.dumps({"reading_hour": "2026-10-06T04:00:00Z", "meter": ["cfapps"]}),
    ],
)
def test_what_names_no_hour_and_meter_is_unattributed(value):
    assert attribute(value) is None


def test_a_conflict_is_counted_apart_and_flags_its_row_alone() -> None:
    """A measurement refused as a conflict (the stored copy kept and counted by its stage) does not break
    rules 2 and 3; its own rule names the stage."""
    c, p, led = consistent()
    rows = reconcile(HOURS, c, p, led, {}, {}, {(HOURS[1], "cfapps"): 2}, {(HOURS[2], "cfapps"): 1})
    def said(n: int, stage: str, copy: str) -> list[tuple[str, str]]:
        detail = (
            f"{n} measurement(s) arrived again at the {stage} with other content than its stored {copy}: "
            "refused to the DLQ (reason conflict:), the stored copy kept"
        )
        return [("conflict", detail)]

    assert problems(rows) == {(HOURS[1], "cfapps"): said(2, "pricer", "measurement"),
                              (HOURS[2], "cfapps"): said(1, "ledger", "charge")}
    doc = report_json(HOURS[0], HOURS[-1] + H, rows, ("cfapps",), [], NOW)
    assert (doc["totals"]["conflicts_at_pricer"], doc["totals"]["conflicts_at_ledger"]) == (2, 1)
    assert doc["totals"]["dead_lettered_at_pricer"] == 0 and doc["flagged"] == 2
    assert violations(doc, response_schema("/admin/completeness", "get", 200)) == []


def test_a_dead_letter_with_a_conflict_reason_is_counted_as_a_conflict_once_per_measurement() -> None:
    @dataclass
    class Record:
        value: bytes
        headers: list[tuple[str, bytes]]
        partition: int = 0
        offset: int = 0

    batch = orjson.dumps({"reading_hour": "2026-10-06T04:00:00Z", "meter": "cfapps", "resource_id": ["a", "b"]})
    group = [("dlq.group", b"pricer")]
    counts = DeadLetterCounts("usage.readings.v2.dlq", ("pricer",))
    seen: set[tuple[str, ...]] = set()
    for record in (
        Record(batch, [*group, ("dlq.reason", b"item 0: value must be an integer from 0 to 2**62")]),
        Record(batch, [*group, ("dlq.reason", b"conflict: measurement ... is stored with other content")]),
        Record(batch, [*group, ("dlq.reason", b"conflict: measurement ... (again, redelivered)")], offset=1),
        Record(batch, [("dlq.group", b"api"), ("dlq.reason", b"conflict: another group's")], offset=2),
    ):
        count_record(record, {"pricer"}, T, T + H, seen, counts)
    assert counts.by_row == {(T, "cfapps"): 2} and counts.conflicts_by_row == {(T, "cfapps"): 2}
    assert counts.counted == 4


# ------------------------------------------------------------------------------------------ the CLI


def stub_report(reconciles: bool) -> dict[str, Any]:
    c, p, led = consistent()
    if not reconciles:
        led[(HOURS[1], "cfapps")] = LedgerRow(posted=5, held=2, revisions=7)
    rows = reconcile(HOURS, c, p, led, {}, {})
    dlq = DeadLetterCounts("usage.readings.v2.dlq", ("pricer",), records=4, counted=3, unattributed=1)
    return report_json(HOURS[0], HOURS[-1] + H, rows, ("cfapps",), [dlq], NOW)


def transport(status: int, body: dict[str, Any], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        media = "application/json" if status == 200 else "application/problem+json"
        return httpx.Response(status, content=orjson.dumps(body), headers={"content-type": media})

    return httpx.MockTransport(handle)


def run(
    args: tuple[str, str], status: int, body: dict[str, Any], **kw: Any
) -> tuple[int, str, str, list[httpx.Request]]:
    out, err, seen = io.StringIO(), io.StringIO(), []
    code = completeness(
        *args, "http://api.test", "tok", out=out, err=err, transport=transport(status, body, seen), **kw
    )
    return code, out.getvalue(), err.getvalue(), seen


def test_the_cli_exits_0_when_everything_reconciles_and_1_when_not():
    code, out, _, seen = run(("2026-10-06T04:00Z", "2026-10-06T08:00Z"), 200, stub_report(True))
    assert code == EXIT_OK and "Every hour reconciles" in out
    assert seen[0].url.path == "/admin/completeness" and seen[0].headers["authorization"] == "Bearer tok"
    assert dict(seen[0].url.params) == {"from": "2026-10-06T04:00:00Z", "to": "2026-10-06T08:00:00Z"}
    code, out, _, _ = run(("2026-10-06T04:00Z", "2026-10-06T08:00Z"), 200, stub_report(False))
    assert code == EXIT_FLAGGED
    assert "2026-10-06T05:00:00Z cfapps posted: priced 7 + unpriced 3 = 10 charges" in out
    assert "1 row(s) do not reconcile" in out and "3 reconciling rows not shown" in out
    assert "usage.readings.v2.dlq (pricer): 3 dead-lettered, 1 without an hour and meter" in out


def test_the_cli_prints_the_api_json_as_it_came():
    body = stub_report(False)
    code, out, _, _ = run(("2026-10-06T04:00Z", "2026-10-06T08:00Z"), 200, body, as_json=True)
    assert code == EXIT_FLAGGED and json.loads(out) == body


def test_the_cli_refuses_bad_arguments_and_reports_api_errors():
    assert run(("2026-10-06T04:00", "2026-10-06T08:00Z"), 200, {})[0] == EXIT_USAGE
    assert run(("2026-10-06T08:00Z", "2026-10-06T04:00Z"), 200, {})[0] == EXIT_USAGE
    code, _, err, _ = run(("2026-10-06T04:00Z", "2026-10-06T08:00Z"), 403, {"title": "Forbidden", "status": 403})
    assert code == EXIT_API and "403" in err and "usage.admin" in err
    code, _, err, _ = run(
        ("2026-10-01T00:00Z", "2026-12-01T00:00Z"),
        422,
        {"title": "Invalid parameter", "status": 422, "detail": "the range is longer than 744 hours"},
    )
    assert code == EXIT_API and "744 hours" in err
    out, err = io.StringIO(), io.StringIO()
    assert completeness("2026-10-06T04:00Z", "2026-10-06T08:00Z", "http://api.test", "", out=out, err=err) == EXIT_USAGE


def test_the_cli_command_is_registered_with_its_options():
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # typer needs two commands to keep the name
    result = CliRunner().invoke(app, ["completeness", "--help"])
    assert result.exit_code == 0
    for option in ("--from", "--to", "--json", "--all", "--api-url", "--token"):
        assert option in result.output
