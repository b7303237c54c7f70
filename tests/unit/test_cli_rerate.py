"""``billing rerate`` without a running stack: its help, its argument errors (exit 2, nothing sent), and how it
reports a job that failed (exit 1 with the reason) against a scripted API."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
from typer.testing import CliRunner

from cli.main import app
from cli.rerate import EXIT_FAILED, EXIT_USAGE, rerate

BASE: dict[str, Any] = {
    "meter": "cfapps", "kind": "", "start": "2026-10-01T04:00Z", "end": "2026-10-02T04:00Z", "reason": "wrong rate",
    "rate": 5, "unit": 1, "unit_of_measure": "MB-hour", "price_json": None, "job_id": None, "wait": True,
    "api_url": "http://api.test", "token": "t-admin",
}


def run(transport: httpx.BaseTransport | None = None, **overrides: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = rerate(**{**BASE, **overrides}, out=out, err=err, transport=transport, poll=0, sleep=lambda _: None)
    return code, out.getvalue(), err.getvalue()


def test_help_explains_the_command() -> None:
    result = CliRunner().invoke(app, ["rerate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for words in ("--from", "--to", "--reason", "--price-json", "--no-wait", "--job", "progress bar", "BILLING_TOKEN"):
        assert words in result.output, words


def test_argument_errors_exit_2_and_send_nothing() -> None:
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(500))
    cases = [
        ({"meter": None}, "missing --meter"),
        ({"reason": None, "start": None}, "missing --from, --reason"),
        ({"start": "2026-10-01T04:00"}, "has no time zone"),
        ({"end": "yesterday"}, "not an ISO-8601 time"),
        ({"end": "2026-10-01T04:00Z"}, "--to must be after --from"),
        ({"rate": None}, "--rate, --unit and --unit-of-measure"),
        ({"price_json": "{"}, "give either --price-json or --rate/--unit"),
        ({"rate": None, "unit": None, "price_json": "{"}, "not JSON"),
        ({"rate": None, "unit": None, "price_json": "[1]"}, "must be a JSON object"),
        ({"job_id": "not-a-uuid", **{k: None for k in ("meter", "start", "end", "reason", "rate", "unit")}},
         "badly formed"),
        ({"job_id": "0190a000-0000-7000-8000-00000000000d"}, "--job follows a job already started"),
        ({"token": ""}, "a token is needed"),
    ]
    for overrides, message in cases:
        code, _, err = run(transport, **overrides)
        assert code == EXIT_USAGE and message in err, (overrides, err)
    assert sent == []
    result = CliRunner().invoke(app, ["rerate", "--meter", "cfapps", "--token", "t"])
    assert result.exit_code == EXIT_USAGE


def test_a_failed_job_exits_1_with_its_reason_after_following_it() -> None:
    job = {"id": "0190a000-0000-7000-8000-00000000000d", "state": "running", "meter": "cfapps", "resource_kind": "",
           "from": "2026-10-01T04:00:00Z", "to": "2026-10-02T04:00:00Z", "price": {"id": "p"}, "done": 0,
           "total": 10, "repriced": 0, "refused": 0, "failure": None}
    polls = iter([{**job, "done": 4}, {**job, "state": "failed", "done": 4, "failure": "ValueError: broken"}])
    seen: list[tuple[str, str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, json.loads(request.content) if request.content else None))
        assert request.headers["authorization"] == "Bearer t-admin"
        if request.method == "POST":
            assert request.headers["idempotency-key"].startswith("billing-rerate-")
            return httpx.Response(202, json=job)
        return httpx.Response(200, json=next(polls))

    code, out, err = run(httpx.MockTransport(answer))
    assert code == EXIT_FAILED and "failed: ValueError: broken" in err, (out, err)
    assert [(m, p) for m, p, _ in seen] == [("POST", "/admin/rerate"), ("GET", f"/admin/rerates/{job['id']}"),
                                            ("GET", f"/admin/rerates/{job['id']}")]
    assert seen[0][2] == {"meter": "cfapps", "resource_kind": "", "from": "2026-10-01T04:00:00Z",
                          "to": "2026-10-02T04:00:00Z", "reason": "wrong rate",
                          "price": {"unit_of_measure": "MB-hour", "microcredits_per_unit": 5, "unit": 1}}
