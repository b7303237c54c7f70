"""``billing report`` over real HTTP against the running api, whose read model was filled through the
topics: the month's figures are the oracle's."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from fractions import Fraction

import pytest

from cli.report import report
from tests.sim_server import serve_app
from tests.support.api_harness import ApiHarness, harness  # noqa: F401  (fixture)
from tests.support.api_read_model import A, fill, ny_month, oracle

pytestmark = pytest.mark.integration


async def test_the_report_of_a_month_matches_what_flowed_through_the_topics(harness: ApiHarness) -> None:
    h = harness
    await fill(h)
    token = h.issuer.token(customers=[str(A)], sub="report-user")
    expected = {k[1]: v for k, v in oracle(A, ny_month, lambda c: c.org_id).items() if k[0] == "2026-10"}
    async with serve_app(h.app) as url:  # the app's lifespan is already running
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(report, str(A), "2026-10", "json", url, token, out=out, err=err)
        assert code == 0, err.getvalue()
        doc = json.loads(out.getvalue())
        by_org = {o["org_id"]: o for o in doc["orgs"]}
        assert set(by_org) == set(expected)
        for org, (_, exact) in expected.items():
            assert by_org[org]["microcredits_exact"] == f"{exact.numerator}/{exact.denominator}"
            assert by_org[org]["org_name"] == f"name-of-{org}"
        total = sum((v[1] for v in expected.values()), Fraction(0))
        assert doc["total"]["microcredits"] == total.numerator // total.denominator

        out = io.StringIO()
        assert await asyncio.to_thread(report, str(A), "2026-10", "csv", url, token, out=out) == 0
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        by_resource = {k[1]: v for k, v in oracle(A, ny_month, lambda c: c.resource_id).items() if k[0] == "2026-10"}
        assert {r["resource_id"] for r in rows} == set(by_resource)
        assert set(by_resource) == {"app-x1", "svc-x2", "app-x3", "app-x6", "app-z1"}
        for r in rows:
            assert r["microcredits_exact"] == "{0.numerator}/{0.denominator}".format(by_resource[r["resource_id"]][1])

        out = io.StringIO()
        assert await asyncio.to_thread(report, str(A), "2026-10", "table", url, token, out=out) == 0
        assert "name-of-org-x" in out.getvalue() and "name-of-app-x1" in out.getvalue()

        # another customer's reader gets nothing
        err = io.StringIO()
        stranger = h.issuer.token(customers=[], sub="someone-else")
        code = await asyncio.to_thread(report, str(A), "2026-10", "json", url, stranger, out=io.StringIO(), err=err)
        assert code == 1
        assert "404" in err.getvalue()
