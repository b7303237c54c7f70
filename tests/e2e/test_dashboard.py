"""The customer usage dashboard in headless Chromium — Debian's ``chromium`` package driven by Playwright
through its executable path, never a downloaded browser — against the simulator (the OIDC issuer), the
pricer, the ledger and the api, each its own process on a fresh database and fresh topics.

Two weeks of hourly measurements (September into October 2026, America/New_York) are published on the
readings topic (usage.readings.v2) as the collector would: per hour and meter, one batch per shard; the
pricer prices them, the ledger posts them and closes both months, the api projects them. Every figure the
pages show is compared with what the JSON API answers for the same customer (or with figures computed here
from the API's transactions), never with the dashboard's own output. Screenshots go to
.local/screenshots/; with BILLING_SCREENSHOTS=docs they replace the ones the README shows
(docs/screenshots/), so that a plain test run leaves the checkout unchanged.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from shared import ids
from shared.batches import Item, encode_measurements, measurement_batches, shard_key
from shared.kafka import Outgoing, Publisher, group_lag
from shared.topics import CHARGES, READINGS, TRANSACTIONS
from simulator.oidc import mint_token
from tests.conftest import Database, Infra
from tests.stack import ROOT, Stack

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("BILLING_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / ("docs" if os.environ.get("BILLING_SCREENSHOTS") == "docs" else ".local") / "screenshots"
NY = ZoneInfo("America/New_York")
START = datetime(2026, 9, 24, 4, tzinfo=UTC)  # Sep 24, 00:00 in New York
HOURS = [START + timedelta(hours=h) for h in range(14 * 24)]  # to Oct 8, 00:00 in New York
AGREEMENT = (datetime(2026, 9, 1, 4, tzinfo=UTC), datetime(2027, 9, 1, 4, tzinfo=UTC))
TIER_CREDITS = 60_000_000

# org, org name, space, space name, resource, meter, kind, unit, value in the hour h (index from START)
RESOURCES: list[tuple[str, str, str, str, str, str, str, str, Any]] = [
    ("org-a1", "Alpha Apps", "a1-dev", "dev", "a1-web", "cfapps", "", "MB", lambda h: 4096 + (h % 24) * 128),
    ("org-a1", "Alpha Apps", "a1-dev", "dev", "a1-worker", "cfapps", "", "MB", lambda h: 8192),
    (
        "org-a1",
        "Alpha Apps",
        "a1-prod",
        "prod",
        "a1-api",
        "cfapps",
        "",
        "MB",
        lambda h: 16384 if h % 48 < 30 else 12288,
    ),
    ("org-a1", "Alpha Apps", "a1-prod", "prod", "a1-db", "cfservices", "plan-small", "instance", lambda h: 1),
    ("org-a2", "Alpha Data", "a2-main", "main", "a2-etl", "cfapps", "", "MB", lambda h: 2048 * (1 + (h // 24) % 3)),
    ("org-a2", "Alpha Data", "a2-main", "main", "a2-cache", "cfservices", "plan-unpriced", "instance", lambda h: 1),
    ("org-b1", "Bravo", "b1-main", "main", "b1-site", "cfapps", "", "MB", lambda h: 6144),
    ("org-u", "Nobody's", "u-main", "main", "u-app", "cfapps", "", "MB", lambda h: 1024),
]


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium; its absence fails the test (before any service starts), never skips it."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: run `make install` (deploy/local/browser.sh installs "
            "Debian's chromium package); the dashboard's browser test needs it.",
            pytrace=False,
        )
    return CHROMIUM


def ts(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def ny_midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=NY).astimezone(UTC)


def month_range(month: str) -> tuple[str, str]:
    y, m = map(int, month.split("-"))
    nxt = date(y + (m == 12), m % 12 + 1, 1)
    return ts(ny_midnight(date(y, m, 1))), ts(ny_midnight(nxt))


def exact(text: str) -> Fraction:
    return Fraction(text)


# ----------------------------------------------------------------------------------------- the stack


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30)

    async def call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        resp = await self.http.request(method, path, **kw)
        assert resp.status_code in ok, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
        return resp.json() if resp.content else None

    async def items(self, path: str, **params: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        query = {**params, "limit": "500"}
        while True:
            body = await self.call("GET", path, params=query)
            out.extend(body["items"])
            if not body.get("next_cursor"):
                return out
            query["cursor"] = body["next_cursor"]


async def drained(kafka: str, prefix: str, timeout: float = 120) -> None:
    """Until the pricer, the ledger and the api have committed everything (twice in a row)."""
    groups = [("pricer", READINGS), ("ledger", CHARGES), ("api", CHARGES), ("api", TRANSACTIONS)]
    quiet, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Consumer groups are named like the topics (prefixed) or, in older builds, not: a group that never
        # committed counts the whole topic, so the smaller lag is the running group's.
        lags = [
            min(await group_lag(kafka, prefix + g, prefix + t), await group_lag(kafka, g, prefix + t))
            for g, t in groups
        ]
        quiet = quiet + 1 if sum(lags) == 0 else 0
        if quiet >= 2:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"the pipeline did not catch up: {lags}")


async def fill(stack: Stack, admin: Api, kafka: str, prefix: str) -> tuple[str, str]:
    """Tier, two customers with a year's agreement, org assignments (one org left out), prices (one plan
    left unpriced), two weeks of readings, both months closed. Returns the customers' ids."""
    await admin.call("POST", "/admin/tiers", ok=(201,), json={"name": "dashboard", "credits_per_period": TIER_CREDITS})
    a = (
        await admin.call(
            "POST", "/admin/customers", ok=(201,), json={"name": "Agency of Dashboards", "tier": "dashboard"}
        )
    )["id"]
    b = (
        await admin.call("POST", "/admin/customers", ok=(201,), json={"name": "Bureau of Charts", "tier": "dashboard"})
    )["id"]
    for cid in (a, b):
        await admin.call(
            "POST",
            "/admin/agreements",
            ok=(201,),
            json={"customer_id": cid, "starts_at": ts(AGREEMENT[0]), "ends_at": ts(AGREEMENT[1])},
        )
    for org, cid in (("org-a1", a), ("org-a2", a), ("org-b1", b)):
        await admin.call(
            "POST",
            "/admin/org-assignments",
            ok=(201,),
            json={"org_id": org, "customer_id": cid, "starts_at": ts(AGREEMENT[0])},
        )
    for meter, kind, uom, per_unit, unit in (
        ("cfapps", "", "MB-hour", 1_000_000, 730 * 1024),
        ("cfservices", "plan-small", "instance-hour", 2_000_000, 730),
    ):
        await admin.call(
            "POST",
            "/admin/prices",
            ok=(201,),
            json={
                "meter": meter,
                "resource_kind": kind,
                "unit_of_measure": uom,
                "microcredits_per_unit": per_unit,
                "unit": unit,
                "valid_from": ts(AGREEMENT[0]),
                "valid_until": None,
            },
        )
    publisher = Publisher(kafka, client_id="dashboard-test")
    await publisher.start()
    try:
        # as the collector publishes them: per hour and meter, one batch per shard of resources, keyed by shard
        messages = []
        for i, hour in enumerate(HOURS):
            for meter, unit in (("cfapps", "MB"), ("cfservices", "instance")):
                items = [
                    Item(rid, rid, org, org_name, space, space_name, kind, value(i))
                    for org, org_name, space, space_name, rid, m, kind, u, value in RESOURCES
                    if m == meter and u == unit
                ]
                for batch in measurement_batches(
                    hour, meter, unit, items, reading_id=ids.reading_id(hour), taken_at=hour + timedelta(minutes=5)
                ):
                    messages.append(Outgoing(shard_key(batch.shard), encode_measurements(batch)))
        await publisher.publish(prefix + READINGS, messages)
    finally:
        await publisher.stop()
    await drained(kafka, prefix)
    for month in ("2026-09", "2026-10"):
        await admin.call("POST", f"/admin/months/{month}/close", ok=(200, 201))
    await drained(kafka, prefix)
    for cid in (a, b):
        for _ in range(100):
            if (await admin.http.get(f"/v1/customers/{cid}/statements/2026-10")).status_code == 200:
                break
            await asyncio.sleep(0.2)
    return a, b


# ------------------------------------------------------------------------------------ page readers


async def attr_rows(page: Any, selector: str, *attrs: str) -> list[dict[str, str]]:
    return await page.eval_on_selector_all(
        selector,
        # "last": the text of the row's last cell (textContent: the row may sit in a closed <details>)
        "(rows, attrs) => rows.map(r => Object.fromEntries(attrs.map(a => [a, a === 'last'"
        " ? r.lastElementChild.textContent.trim() : (r.getAttribute(a) || '')])))",
        list(attrs),
    )


async def check_balance(page: Any, api: Api, customer: str) -> dict[str, Any]:
    balance = await api.call("GET", f"/v1/customers/{customer}/balance")
    for name in ("funded", "used", "expired", "remaining"):
        dd = page.locator(f"#{name}")
        assert int(await dd.get_attribute("data-microcredits")) == balance[name], name
        assert (await dd.inner_text()).replace(",", "") == balance["credits"][name], name
    return balance


async def check_usage(page: Any, api: Api, customer: str, month: str, group_by: str, org: str | None = None) -> int:
    start, end = month_range(month)
    items = await api.items(
        f"/v1/customers/{customer}/usage", **{"from": start, "to": end, "granularity": "day", "group_by": group_by}
    )
    key = "org_id" if group_by == "org" else "space_id"
    want = {
        (it["period"], it["group"][key]): (it["microcredits_exact"], it["credits"])
        for it in items
        if org is None or it["group"]["org_id"] == org
    }
    rows = await attr_rows(page, "#usage-table tbody tr", "data-day", "data-key", "data-microcredits-exact", "last")
    got = {(r["data-day"], r["data-key"]): (r["data-microcredits-exact"], r["last"].replace(",", "")) for r in rows}
    assert got == want
    # the month's totals per group equal the API's monthly figures
    monthly = await api.items(
        f"/v1/customers/{customer}/usage", **{"from": start, "to": end, "granularity": "month", "group_by": group_by}
    )
    totals = {
        it["group"][key]: exact(it["microcredits_exact"])
        for it in monthly
        if org is None or it["group"]["org_id"] == org
    }
    legend = await attr_rows(page, "#usage-legend tbody tr", "data-key", "data-microcredits-exact")
    assert {r["data-key"]: exact(r["data-microcredits-exact"]) for r in legend} == totals
    return len(got)


async def check_statement(page: Any, api: Api, customer: str, month: str) -> dict[str, Any]:
    st = await api.call("GET", f"/v1/customers/{customer}/statements/{month}")
    rows = await attr_rows(page, "#statement tbody tr", "data-line", "data-meter", "data-kind", "data-microcredits")
    lines = {r["data-line"]: int(r["data-microcredits"]) for r in rows if r["data-line"] != "used_by_kind"}
    assert lines == {k: st[k] for k in ("opening_balance", "funded", "used", "expired", "closing_balance")}
    by_kind = sorted(
        (r["data-meter"], r["data-kind"], int(r["data-microcredits"])) for r in rows if r["data-line"] == "used_by_kind"
    )
    assert by_kind == sorted((u["meter"], u.get("resource_kind", ""), u["microcredits"]) for u in st["used_by_kind"])
    return st


def projected_runout(transactions: list[dict[str, Any]], remaining: int, as_of: datetime) -> str:
    """The run-out date by the rule the page states, from the API's transactions: average daily usage
    over the 30 days up to the end of the last hour with usage, spent from now."""
    usage = [datetime.fromisoformat(t["occurred_at"]) for t in transactions if t["type"] in ("usage", "late_usage")]
    end = max(usage) + timedelta(hours=1)
    start = max(end - timedelta(days=30), min(usage))
    used = sum(
        t["effect"]["microcredits"]
        for t in transactions
        if t["effect"]["bucket"] == "used" and start <= datetime.fromisoformat(t["occurred_at"]) < end
    )
    per_second = Fraction(used, int((end - start).total_seconds()))
    seconds = Fraction(remaining) / per_second
    runout = max(as_of, end) + timedelta(seconds=int(seconds) + 1)
    return runout.astimezone(NY).date().isoformat()


# ----------------------------------------------------------------------------------------------- test


@pytest.fixture
async def stack(infra: Infra, database: Database, topic_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(database.dsn, topic_prefix, tmp_path / "logs")
    try:
        await s.start("sim", "pricer", "ledger", "api")
        yield s
    finally:
        s.stop()


async def test_the_dashboard_shows_the_apis_numbers_to_admins_and_readers(
    chromium: str, infra: Infra, topic_prefix: str, stack: Stack
) -> None:
    from playwright.async_api import async_playwright, expect

    issuer, base = stack.url("sim"), stack.url("api")
    admin_token = mint_token(["usage.admin"], issuer=issuer, subject="dash-admin")
    admin = Api(base, admin_token)
    a, b = await fill(stack, admin, infra.kafka, topic_prefix)
    reader_token = mint_token(["usage.read"], customers=[a], issuer=issuer, subject="reader-a")
    reader = Api(base, reader_token)
    SHOTS.mkdir(parents=True, exist_ok=True)
    # the dashboard is no part of the JSON API's document (schemathesis tests that one)
    doc = (await admin.http.get("/openapi.json")).json()
    assert doc["paths"] and not [path for path in doc["paths"] if path.startswith("/dashboard")]

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            # ------------------------------------------------------------------ an admin, on a desktop
            ctx = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page = await ctx.new_page()
            page.set_default_timeout(10_000)
            await page.goto(f"{base}/dashboard/")
            await expect(page).to_have_url(f"{base}/dashboard/sign-in")
            # the skip link is the first stop of the keyboard and moves focus to the main content
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.textContent") == "Skip to main content"
            await page.keyboard.press("Enter")
            assert await page.evaluate("document.activeElement.id") == "main"
            # a token that does not verify is refused with a message
            await page.get_by_label("Bearer token").fill("not-a-token")
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("alert")).to_contain_text("The token was refused")
            await page.get_by_label("Bearer token").fill(admin_token)
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("heading", name="Customers", exact=True)).to_be_visible()
            cookie = next(c for c in await ctx.cookies() if c["name"] == "billing_dashboard_token")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
            listed = {r["data-customer"] for r in await attr_rows(page, "#customers tbody tr", "data-customer")}
            assert listed == {c["customer_id"] for c in await admin.items("/v1/customers")} == {a, b}

            await page.get_by_role("link", name="Agency of Dashboards").click()
            await expect(page.get_by_role("heading", level=1)).to_contain_text("Agency of Dashboards")
            balance = await check_balance(page, admin, a)
            assert balance["funded"] == TIER_CREDITS and 0 < balance["used"] < TIER_CREDITS
            # the projection, recomputed here from the API's transactions
            transactions = await admin.items(f"/v1/customers/{a}/transactions")
            as_of = datetime.fromisoformat(await page.locator("#as-of").get_attribute("datetime"))
            runout = projected_runout(transactions, balance["remaining"], as_of)
            assert await page.locator("#projection").get_attribute("data-runout") == runout
            await expect(page.locator("#projection")).to_contain_text(runout)
            # the burn-down's days equal the API's balance as of the end of those days
            burn = {
                r["data-day"]: int(r["data-microcredits"])
                for r in await attr_rows(page, "#burn-table tbody tr", "data-day", "data-microcredits")
            }
            assert min(burn) == "2026-09-01" and max(burn) == as_of.astimezone(NY).date().isoformat()
            for day in ("2026-09-01", "2026-09-30", "2026-10-03", max(burn)):
                end_of_day = ny_midnight(date.fromisoformat(day) + timedelta(days=1)) - timedelta(microseconds=1)
                at = await admin.call("GET", f"/v1/customers/{a}/balance", params={"as_of": ts(end_of_day)})
                assert burn[day] == at["remaining"], day
            # the default month is the latest with usage: October, with its statement
            assert await page.locator("#month-shown").get_attribute("data-month") == "2026-10"
            assert await check_usage(page, admin, a, "2026-10", "org") > 0
            await check_statement(page, admin, a, "2026-10")
            await page.screenshot(path=str(SHOTS / "dashboard-customer-desktop.png"), full_page=True)

            # switch month, then choose an org to see its spaces
            await page.get_by_role("link", name="Previous month").click()
            await expect(page.locator("#month-shown")).to_have_attribute("data-month", "2026-09")
            assert await check_usage(page, admin, a, "2026-09", "org") > 0
            september = await check_statement(page, admin, a, "2026-09")
            await page.get_by_role("link", name="Alpha Apps: usage by space").click()
            await expect(
                page.get_by_role("heading", name="Usage in September 2026: spaces of Alpha Apps")
            ).to_be_visible()
            assert await check_usage(page, admin, a, "2026-09", "space", org="org-a1") > 0
            await page.screenshot(path=str(SHOTS / "dashboard-spaces-desktop.png"), full_page=True)

            # the month's statement as CSV
            async with page.expect_download() as download_info:
                await page.locator("#statement-csv").click()
            download = await download_info.value
            assert download.suggested_filename == f"statement-{a}-2026-09.csv"
            text = Path(await download.path()).read_bytes().decode()
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
            assert {(r["customer_id"], r["month"]) for r in rows} == {(a, "2026-09")}
            plain = {r["line"]: int(r["microcredits"]) for r in rows if r["line"] != "used_by_kind"}
            assert plain == {
                k: september[k] for k in ("opening_balance", "funded", "used", "expired", "closing_balance")
            }
            kinds = sorted(
                (r["meter"], r["resource_kind"], int(r["microcredits"])) for r in rows if r["line"] == "used_by_kind"
            )
            assert kinds == sorted(
                (u["meter"], u.get("resource_kind", ""), u["microcredits"]) for u in september["used_by_kind"]
            )
            for r in rows:
                assert Fraction(r["credits"]) * 1_000_000 == int(r["microcredits"])  # exact, 6 decimals
            csv_resp = await page.request.get(f"{base}/dashboard/customers/{a}/statements/2026-09.csv")
            assert csv_resp.status == 200 and await csv_resp.text() == text
            assert csv_resp.headers["content-type"].startswith("text/csv")
            assert csv_resp.headers["content-disposition"].startswith("attachment")

            # the admin lists, as the admin routes answer them
            await page.get_by_role("link", name="Unpriced usage").click()
            unpriced = (await admin.call("GET", "/admin/unpriced", params={"limit": "100"}))["items"]
            shown = [r["data-measurement"] for r in await attr_rows(page, "#unpriced tbody tr", "data-measurement")]
            assert shown == [it["measurement_id"] for it in unpriced] and len(shown) == 100
            await page.get_by_role("link", name="Unassigned usage").click()
            held = (await admin.call("GET", "/admin/unassigned", params={"limit": "100"}))["items"]
            shown = [r["data-measurement"] for r in await attr_rows(page, "#unassigned tbody tr", "data-measurement")]
            assert shown == [it["measurement_id"] for it in held] and shown
            assert {it["org_id"] for it in held} == {"org-u"}
            await page.screenshot(path=str(SHOTS / "dashboard-admin-unassigned.png"))

            await page.get_by_role("button", name="Sign out").click()
            await expect(page.get_by_role("status")).to_contain_text("You are signed out")
            await page.goto(f"{base}/dashboard/customers")
            await expect(page).to_have_url(f"{base}/dashboard/sign-in")
            await ctx.close()

            # -------------------------------------------------------- a usage.read user, on a phone
            ctx = await browser.new_context(viewport={"width": 375, "height": 812}, device_scale_factor=2)
            page = await ctx.new_page()
            await page.goto(f"{base}/dashboard/sign-in")
            await page.get_by_label("Bearer token").fill(reader_token)
            await page.get_by_role("button", name="Sign in").click()
            listed = [r["data-customer"] for r in await attr_rows(page, "#customers tbody tr", "data-customer")]
            assert listed == [c["customer_id"] for c in await reader.items("/v1/customers")] == [a]
            await expect(page.get_by_role("link", name="Unpriced usage")).to_have_count(0)
            await page.locator(f'tr[data-customer="{a}"] a').click()
            await check_balance(page, reader, a)
            await check_statement(page, reader, a, "2026-10")
            assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            await page.screenshot(path=str(SHOTS / "dashboard-customer-phone.png"), full_page=True)

            # another customer answers exactly like one that does not exist
            other = await page.goto(f"{base}/dashboard/customers/{b}")
            assert other is not None and other.status == 404
            other_text = await page.locator("main").inner_text()
            missing = await page.goto(f"{base}/dashboard/customers/{uuid.uuid4()}")
            assert missing is not None and missing.status == 404
            assert await page.locator("main").inner_text() == other_text
            assert (await reader.http.get(f"/v1/customers/{b}/balance")).status_code == 404
            csv_other = await page.request.get(f"{base}/dashboard/customers/{b}/statements/2026-10.csv")
            assert csv_other.status == 404
            forbidden = await page.goto(f"{base}/dashboard/admin/unassigned")
            assert forbidden is not None and forbidden.status == 403
            # bad input answers a clear 4xx page, never a 500
            for path, words in (
                (f"/dashboard/customers/{a}?month=2026-13", "month"),
                (f"/dashboard/customers/{a}?org=no%20such%20org", "org"),
                ("/dashboard/customers/not-a-uuid", "UUID"),
                (f"/dashboard/customers/{a}/statements/2026-9.csv", "csv"),
                ("/dashboard/no-such-page", "no such page"),
            ):
                resp = await page.goto(base + path)
                assert resp is not None and 400 <= resp.status < 500, path
                assert resp.headers["content-type"].startswith("text/html")
                await expect(page.locator("main")).to_contain_text(words)
            await ctx.close()

            # ---------------------------------------------------------- an expired session
            ctx = await browser.new_context()
            expired = mint_token(
                ["usage.read"], customers=[a], issuer=issuer, subject="reader-a", now=int(time.time()) - 7200, ttl=3600
            )
            await ctx.add_cookies([{"name": "billing_dashboard_token", "value": expired, "url": f"{base}/dashboard/"}])
            page = await ctx.new_page()
            await page.goto(f"{base}/dashboard/customers/{a}")
            await expect(page).to_have_url(f"{base}/dashboard/sign-in?reason=expired")
            await expect(page.get_by_role("status")).to_contain_text("expired")
            await ctx.close()
        finally:
            await browser.close()
            await admin.http.aclose()
            await reader.http.aclose()
