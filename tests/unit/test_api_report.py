"""``billing report`` against a stub of the API's usage route (httpx MockTransport): it asks for the whole
New York month by resource, follows every cursor, sums the exact amounts (not the rounded ones), and
prints a table, JSON or CSV; errors become exit statuses with a readable message."""

from __future__ import annotations

import csv
import io
import json
import uuid
from fractions import Fraction
from typing import Any

import httpx
import typer
from typer.testing import CliRunner

from cli.report import register, report

CUSTOMER = str(uuid.uuid4())


def item(
    org: str, space: str, resource: str, exact: Fraction, value: int, meter: str = "cfapps", unit: str = "MB"
) -> dict[str, Any]:
    return {
        "period": "2026-10",
        "period_start": "2026-10-01T04:00:00Z",
        "period_end": "2026-11-01T04:00:00Z",
        "group": {
            "resource_id": resource,
            "resource_name": f"{resource}-name",
            "meter": meter,
            "resource_kind": "",
            "space_id": space,
            "space_name": f"{space}-name",
            "org_id": org,
            "org_name": f"{org}-name",
        },
        "quantities": [{"unit": unit, "value": value}],
        "microcredits": exact.numerator // exact.denominator,
        "microcredits_exact": f"{exact.numerator}/{exact.denominator}",
        "credits": "ignored",
    }


# Three resources of a third of a microcredit each: every line floors to 0, the exact total is 1.
PAGES = [
    [item("org-a", "space-1", "app-1", Fraction(1, 3), 10), item("org-a", "space-1", "app-2", Fraction(1, 3), 20)],
    [
        item("org-a", "space-2", "app-3", Fraction(1, 3), 30),
        item("org-b", "space-9", "svc-1", Fraction(2_500_000), 2, "cfservices", "instance"),
    ],
]


class StubApi:
    def __init__(self, pages: list[list[dict[str, Any]]] = PAGES, status: int = 200) -> None:
        self.pages, self.status, self.requests = pages, status, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status != 200:
            problem = {"type": "about:blank", "title": "Nope", "status": self.status, "detail": "no such customer"}
            return httpx.Response(self.status, json=problem)
        i = int(request.url.params.get("cursor", "0"))
        nxt = str(i + 1) if i + 1 < len(self.pages) else None
        return httpx.Response(200, json={"items": self.pages[i], "next_cursor": nxt})


def run(fmt: str, stub: StubApi | None = None, **kw: Any) -> tuple[int, str, str, StubApi]:
    stub = stub or StubApi()
    out, err = io.StringIO(), io.StringIO()
    code = report(
        kw.get("customer", CUSTOMER), kw.get("month", "2026-10"), fmt, "http://api.test", kw.get("token", "tok"),
        out=out, err=err, transport=httpx.MockTransport(stub),
    )
    return code, out.getvalue(), err.getvalue(), stub


def test_it_asks_for_the_new_york_month_by_resource_and_follows_the_cursors() -> None:
    code, _, _, stub = run("json")
    assert code == 0
    first, second = stub.requests
    assert first.url.path == f"/v1/customers/{CUSTOMER}/usage"
    assert dict(first.url.params) == {
        "from": "2026-10-01T04:00:00Z",  # midnight in New York, EDT
        "to": "2026-11-01T04:00:00Z",
        "granularity": "month",
        "group_by": "resource",
        "limit": "500",
    }
    assert second.url.params["cursor"] == "1"
    assert first.headers["authorization"] == "Bearer tok"


def test_json_groups_org_space_resource_and_totals_exactly() -> None:
    code, out, _, _ = run("json")
    doc = json.loads(out)
    assert code == 0
    assert doc["total"]["microcredits_exact"] == "2500001/1"  # 1/3 * 3 + 2,500,000, while each line floors to 0
    org_a = doc["orgs"][0]
    assert (org_a["org_id"], org_a["microcredits"], org_a["microcredits_exact"]) == ("org-a", 1, "1/1")
    assert [s["space_id"] for s in org_a["spaces"]] == ["space-1", "space-2"]
    assert [r["resource_id"] for r in org_a["spaces"][0]["resources"]] == ["app-1", "app-2"]
    assert org_a["spaces"][0]["resources"][0]["microcredits"] == 0
    assert doc["orgs"][1]["credits"] == "2.500000"


def test_csv_has_one_row_per_resource() -> None:
    code, out, _, _ = run("csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert [r["resource_id"] for r in rows] == ["app-1", "app-2", "app-3", "svc-1"]
    assert rows[3]["units"] == "instance" and rows[3]["values"] == "2" and rows[3]["microcredits"] == "2500000"
    assert rows[0]["microcredits_exact"] == "1/3"


def test_the_table_shows_the_tree_and_the_total() -> None:
    code, out, _, _ = run("table")
    assert code == 0
    for text in ("org-a-name", "space-1-name", "app-1-name", "org-b-name", "svc-1-name", "Total", "2.500001"):
        assert text in out, text
    assert out.index("org-a-name") < out.index("space-1-name") < out.index("app-1-name") < out.index("org-b-name")


def test_errors_are_exit_statuses_with_a_message() -> None:
    code, _, err, _ = run("json", StubApi(status=404))
    assert code == 1 and "404" in err and "no such customer" in err
    code, _, err, _ = run("json", StubApi(status=401))
    assert code == 1 and "BILLING_TOKEN" in err
    assert run("json", month="2026-13")[0] == 2
    assert run("json", month="October")[0] == 2
    assert run("json", customer="acme")[0] == 2
    assert run("yaml")[0] == 2
    assert run("json", token="")[0] == 2

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    err = io.StringIO()
    code = report(
        CUSTOMER, "2026-10", "json", "http://api.test", "tok", out=io.StringIO(), err=err,
        transport=httpx.MockTransport(refuse),
    )
    assert code == 1 and "cannot reach the API" in err.getvalue()


def test_register_adds_the_report_command() -> None:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    for option in ("--customer", "--month", "--format", "--api-url", "--token"):
        assert option in result.output
    result = runner.invoke(app, ["report", "--customer", CUSTOMER, "--month", "2026-13", "--token", "t"])
    assert result.exit_code == 2
