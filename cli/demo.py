"""``billing demo``: the main job on a built-in scenario, through the public API only.

Sets up a tier, customers, agreements, org assignments and prices; replays a whole month of hourly
readings through the collector's backfill; waits until the pricer, the ledger and the api have consumed
everything; closes the month; prints each customer's statement, balance and usage report and the admin
lists of unpriced and unassigned usage; and checks the ledger against the figures the seed implies,
to the microcredit. Exit code 0 only when everything matches.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from fractions import Fraction
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from cli.report import report
from cli.scenario import DEMO, SMALL, Expected, ExpectedCorrection, Scenario, expected_correction, expected_posting
from shared.kafka import group_lag
from shared.money import display_credits
from shared.topics import ASSIGNMENTS, CHARGES, READINGS, TRANSACTIONS
from simulator.oidc import mint_token

__all__ = ["SCENARIOS", "run_demo"]

SCENARIOS = {"demo": DEMO, "small": SMALL}
console = Console()


class DemoError(RuntimeError):
    """The demo could not go on; the message says why and what to do."""


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.token = token
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    async def call(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kw: Any) -> Any:
        resp = await self.http.request(method, path, **kw)
        if resp.status_code not in ok:
            raise DemoError(f"{method} {path} answered {resp.status_code}: {resp.text[:500]}")
        return resp.json() if resp.content else None

    async def items(self, path: str, **params: Any) -> list[Any]:
        out: list[Any] = []
        cursor = None
        while True:
            body = await self.call("GET", path, params={**params, **({"cursor": cursor} if cursor else {})})
            if isinstance(body, list):
                return body
            out.extend(body.get("items", []))
            cursor = body.get("next_cursor")
            if not cursor:
                return out


async def wait_ready(url: str, seconds: float = 120) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(int(seconds * 5)):
            try:
                if (await c.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise DemoError(f"{url} is not ready; start the stack with `make up`")


async def check_simulator(sim_url: str, s: Scenario) -> None:
    async with httpx.AsyncClient() as c:
        try:
            info = (await c.get(f"{sim_url}/sim/info")).json()
        except httpx.TransportError:
            raise DemoError(f"the simulator does not answer at {sim_url}; start the stack with `make up`") from None
    want = {
        "seed": s.seed,
        "orgs": s.orgs,
        "apps": s.apps,
        "services": s.services,
        "plans": s.plans,
        "spaces_per_org": s.spaces_per_org,
    }
    got = {k: info.get(k) for k in want}
    if got != want:
        raise DemoError(f"the simulator runs another world ({got}); restart it with: make down && make demo")


async def set_up(api: Api, s: Scenario) -> list[str]:
    """Tier, customers, agreements, assignments and prices, each created once (re-runs reuse them)."""
    tiers = {t["name"] for t in await api.items("/admin/tiers")}
    for tier in (s.tier, s.rate_card_tier):
        if tier not in tiers:
            await api.call("POST", "/admin/tiers", json={"name": tier, "credits_per_period": s.tier_credits})
    found = await api.items("/admin/customers")
    existing = {c["name"]: c["id"] for c in found}
    for c in found:
        if c["name"] in s.customers and c["tier"] != s.tier_of(s.customers.index(c["name"])):
            raise DemoError(
                f"this database holds an earlier demo's {c['name']} on tier {c['tier']} (the scenario puts it on "
                f"{s.tier_of(s.customers.index(c['name']))}): start afresh with `make clean && make demo`"
            )
    ids: list[str] = []
    for i, name in enumerate(s.customers):
        if name not in existing:
            made = await api.call("POST", "/admin/customers", json={"name": name, "tier": s.tier_of(i)})
            existing[name] = made["id"]
        ids.append(existing[name])
    start, _ = s.bounds
    for cid in ids:
        if not await api.items("/admin/agreements", customer_id=cid):
            await api.call(
                "POST",
                "/admin/agreements",
                json={
                    "customer_id": cid,
                    "starts_at": start.isoformat(),
                    "ends_at": (start + timedelta(days=365)).isoformat(),
                },
            )
    assigned = {(a["org_id"], a["customer_id"]) for a in await api.items("/admin/org-assignments")}
    for org, customer, starts in s.assignments():
        if (org, ids[customer]) not in assigned:
            await api.call(
                "POST",
                "/admin/org-assignments",
                json={"org_id": org, "customer_id": ids[customer], "starts_at": starts.isoformat()},
            )
    for p in s.prices():
        body: dict[str, Any] = {
            "meter": p.meter,
            "resource_kind": p.resource_kind,
            "unit_of_measure": p.unit_of_measure,
            "unit": p.unit,
            "valid_from": p.valid_from.isoformat(),
            "valid_until": p.valid_until.isoformat() if p.valid_until else None,
        }
        if p.bands is None:
            body["microcredits_per_unit"] = p.microcredits_per_unit
        else:
            body["model"] = "graduated"
            body["bands"] = [
                {"up_to": None if up_to is None else str(up_to), "microcredits_per_unit": rate}
                for up_to, rate in p.bands
            ]
        if p.tier is not None:
            body["scope"] = {"tier": p.tier}
        await api.call("POST", "/admin/prices", ok=(200, 201, 409), json=body)  # 200, 409: an earlier run's
    return ids


async def wait_drained(kafka: str, prefix: str, quiet_rounds: int = 3, timeout: float = 900) -> None:
    """Until the pricer, the ledger and the api have committed everything on their topics."""
    groups = [("pricer", READINGS), ("pricer-assignments", ASSIGNMENTS), ("ledger", CHARGES), ("api", CHARGES),
              ("api", TRANSACTIONS)]
    quiet = 0
    deadline = time.monotonic() + timeout
    with console.status("waiting for the pricer, the ledger and the api to catch up") as status:
        while time.monotonic() < deadline:
            lags = [await group_lag(kafka, prefix + g, prefix + t) for g, t in groups]
            status.update(
                "waiting for the pipeline: lag "
                + ", ".join(f"{g}@{t}={n}" for (g, t), n in zip(groups, lags, strict=True))
            )
            quiet = quiet + 1 if sum(lags) == 0 else 0
            if quiet >= quiet_rounds:
                return
            await asyncio.sleep(1)
    raise DemoError("the pipeline did not catch up in time; see `make logs`")


def credits(micro: int) -> str:
    return display_credits(micro, 2)


async def show_and_check(api: Api, s: Scenario, ids: list[str], expected: Expected, month: str) -> bool:
    ok = True
    summary = Table(title=f"Statements for {month} (America/New_York) — ledger vs. the seed's oracle")
    for col in ("customer", "funded", "used (ledger)", "used (oracle)", "closing balance", "match"):
        summary.add_column(col, justify="right" if col != "customer" else "left")
    for i, (name, cid) in enumerate(zip(s.customers, ids, strict=True)):
        # Version 1, as the month closed (a re-run finds the amended versions too).
        statement = await api.call("GET", f"/v1/customers/{cid}/statements/{month}", params={"version": 1})
        used = int(statement["used"])
        want = expected.posted.get(i, 0)
        by_kind_ledger: dict[tuple[str, str], int] = {}
        for line in statement.get("used_by_kind", []):  # a line per (meter, kind, price)
            key = (line["meter"], line["resource_kind"])
            by_kind_ledger[key] = by_kind_ledger.get(key, 0) + int(line["microcredits"])
        by_kind_oracle = {(m, k): v for (c, m, k), v in expected.by_meter_kind.items() if c == i}
        match = used == want and {k: v for k, v in by_kind_ledger.items() if v} == {
            k: v for k, v in by_kind_oracle.items() if v
        }
        ok &= match
        summary.add_row(name, credits(int(statement["funded"])), f"{used:,} µcr", f"{want:,} µcr",
                        credits(int(statement["closing_balance"])), "[green]yes" if match else "[red]NO")
        if not match:
            for key in sorted(set(by_kind_ledger) | set(by_kind_oracle)):
                if by_kind_ledger.get(key, 0) != by_kind_oracle.get(key, 0):
                    console.print(
                        f"[red]{name} {key[0]} {key[1] or '-'}: ledger {by_kind_ledger.get(key, 0):,} µcr, "
                        f"oracle {by_kind_oracle.get(key, 0):,} µcr"
                    )
    ok &= await check_usage_by_org(api, s, ids, expected)
    for name, cid in zip(s.customers, ids, strict=True):
        console.rule(f"{name}: usage by org and space (billing report --depth space)")
        code = await asyncio.to_thread(report, cid, month, "table", str(api.http.base_url), api.token, depth="space")
        ok &= code == 0
    console.print(summary)
    for name, cid in zip(s.customers, ids, strict=True):
        balance = await api.call("GET", f"/v1/customers/{cid}/balance")
        console.print(
            f"[bold]{name}[/] balance now: funded {credits(int(balance['funded']))}, "
            f"used {credits(int(balance['used']))}, "
            f"remaining {credits(int(balance['remaining']))} credits"
        )
    unpriced = await api.items("/admin/unpriced")
    unassigned = await api.items("/admin/unassigned")
    console.print(f"Unpriced charges (admin list): {len(unpriced)}")
    console.print(f"Usage held for orgs without a customer (admin list): {len(unassigned)} entries; "
                  f"the oracle expects {expected.held_measurements} measurements held")
    return ok


async def correct_and_check(api: Api, s: Scenario, ids: list[str], expected: Expected, kafka: str, prefix: str) -> bool:
    """Correct a price after the month closed (``POST /admin/rerate``), wait for the re-rating and its
    postings, amend the statements (``POST /admin/statements/amend``) and check each customer's amended
    statement and balance against the seed's oracle: original, correction and amended totals."""
    fix = s.correction()
    month = s.month.strftime("%Y-%m")
    console.rule(f"A price corrected after {month} closed: {fix.meter} {fix.resource_kind or '-'}, "
                 f"{fix.valid_from:%Y-%m-%d %H:%M}Z to {fix.valid_until:%Y-%m-%d %H:%M}Z")
    before = {cid: await api.call("GET", f"/v1/customers/{cid}/balance") for cid in ids}
    body = {
        "meter": fix.meter, "resource_kind": fix.resource_kind, "from": fix.valid_from.isoformat(),
        "to": fix.valid_until.isoformat(), "reason": fix.reason,
        "price": {"unit_of_measure": fix.unit_of_measure, "microcredits_per_unit": fix.microcredits_per_unit,
                  "unit": fix.unit},
    }
    key = {"Idempotency-Key": f"demo-rerate-{s.name}-{month}"}
    job = await api.call("POST", "/admin/rerate", ok=(202, 409), json=body, headers=key)
    if "id" not in job:  # entered by an earlier run whose key has expired: follow that job
        same = [j for j in await api.items("/admin/rerates") if j.get("reason") == fix.reason]
        if not same:
            raise DemoError(f"the correction was refused: {job}")
        job = same[0]
    with console.status("re-rating") as status:
        while job["state"] == "running":
            status.update(f"re-rating: {job['done']:,} of {job['total']:,} measurements looked at")
            await asyncio.sleep(0.5)
            job = await api.call("GET", f"/admin/rerates/{job['id']}")
    if job["state"] != "done":
        raise DemoError(f"the re-rating failed: {job}")
    console.print(f"re-rating {job['id']}: {job['state']}, {job['done']:,} measurements looked at")
    await wait_drained(kafka, prefix)
    amended = await api.call(
        "POST", "/admin/statements/amend", headers={"Idempotency-Key": f"demo-amend-{job['id']}"}
    )
    console.print(f"amended statements issued: {len(amended['issued'])}")
    await wait_drained(kafka, prefix)
    want: ExpectedCorrection = await asyncio.to_thread(expected_correction, s, expected)
    ok = True
    table = Table(title=f"Amended statements for {month} — ledger vs. the seed's oracle")
    for col in ("customer", "version", "original used", "correction", "amended used", "oracle (orig / corr / amended)",
                "balance moved", "match"):
        table.add_column(col, justify="left" if col == "customer" else "right")
    for i, (name, cid) in enumerate(zip(s.customers, ids, strict=True)):
        statement = await api.call("GET", f"/v1/customers/{cid}/statements/{month}")
        after = await api.call("GET", f"/v1/customers/{cid}/balance")
        original, corr, used = (int(statement.get("original_used") or 0), int(statement.get("correction") or 0),
                                int(statement["used"]))
        moved = int(after["used"]) - int(before[cid]["used"])
        match = (
            statement.get("version", 1) >= 2 and original == want.original.get(i, 0)
            and corr == want.correction.get(i, 0) and used == want.amended(i) and moved == corr
        )
        ok &= match
        table.add_row(
            name, str(statement.get("version", 1)), f"{original:,}", f"{corr:+,}", f"{used:,}",
            f"{want.original.get(i, 0):,} / {want.correction.get(i, 0):+,} / {want.amended(i):,}", f"{moved:+,}",
            "[green]yes" if match else "[red]NO",
        )
    console.print(table)
    console.print("(µcr; the correction is posted in the first open month as a `correction` transaction, so the "
                  "balance moves by exactly it; the amended statement restates the month's `used`.)")
    return ok


async def check_usage_by_org(api: Api, s: Scenario, ids: list[str], expected: Expected) -> bool:
    """The api's usage of the month by org, exact, against the seed's oracle: what a customer is shown
    before any rounding equals the sum of its orgs' exact charges."""
    first, stop = s.bounds
    got: dict[tuple[int, str], Fraction] = {}
    monthly: dict[int, int] = {}
    for i, cid in enumerate(ids):
        rows = await api.items(f"/v1/customers/{cid}/usage", **{
            "from": first.isoformat(), "to": stop.isoformat(), "granularity": "month", "group_by": "org"})
        for row in rows:
            if row.get("priced") == "monthly":  # a rate card: what the ledger posted, attributed to hours and orgs
                monthly[i] = monthly.get(i, 0) + int(row["microcredits"])
            else:
                got[(i, row["group"]["org_id"])] = Fraction(row["microcredits_exact"])
    want = expected.by_org
    wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if monthly != expected.monthly:
        console.print(f"[red]Usage priced on the month's total (rate cards): api {monthly}, oracle {expected.monthly}")
        return False
    for i, org in wrong[:10]:
        console.print(
            f"[red]{s.customers[i]} org {org}: api {got.get((i, org))}, oracle {want.get((i, org))} µcr (exact)"
        )
    if wrong:
        console.print(f"[red]The api's usage by org differs from the seed's for {len(wrong)} (customer, org) pairs")
    else:
        console.print(
            f"The api's usage by org equals the seed's exactly ({len(want)} customer-org pairs, as fractions)."
        )
    return not wrong


async def run_demo(scenario: str = "demo", api_url: str = "http://127.0.0.1:8080", sim_url: str = "http://127.0.0.1:8090",
                   kafka: str | None = None, topic_prefix: str = "") -> bool:
    s = SCENARIOS[scenario]
    kafka = kafka or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    month = s.month.strftime("%Y-%m")
    await check_simulator(sim_url, s)
    await wait_ready(api_url)
    api = Api(api_url, mint_token(["usage.admin", "usage.read"], subject="demo-admin"))
    try:
        console.rule(
            f"[bold]billing demo[/]: scenario {s.name}, {len(s.customers)} customers, {s.orgs} orgs, month {month}"
        )
        ids = await set_up(api, s)
        console.print(f"set up: tier {s.tier}, customers {', '.join(s.customers)}, {len(s.prices())} prices, "
                      f"{s.orgs} org assignments (one from mid-month); {s.customers[s.rate_card_customer]} on tier "
                      f"{s.rate_card_tier}, whose rate card prices the first service plan graduated on the month's "
                      "total (1 instance-month at 2 credits, up to 5 at 1.5, then 1)")
        from services.collector.backfill import backfill

        start, end = s.bounds
        t0 = time.perf_counter()
        totals = await backfill(start, end, console=console)
        console.print(
            f"backfill: {totals['hours']} hours, {totals['measurements']:,} measurements "
            f"in {time.perf_counter() - t0:.0f} s"
        )
        expected = await asyncio.to_thread(expected_posting, s)
        await wait_drained(kafka, topic_prefix)
        closed = await api.call("POST", f"/admin/months/{month}/close", ok=(200, 201, 409))
        console.print(
            f"month {month} closed: {closed if isinstance(closed, dict) and len(str(closed)) < 200 else 'ok'}"
        )
        await wait_drained(kafka, topic_prefix)
        ok = await show_and_check(api, s, ids, expected, month)
        ok &= await correct_and_check(api, s, ids, expected, kafka, topic_prefix)
        if ok:
            console.print(
                f"[bold green]The ledger matches the seed's usage to the microcredit[/] "
                f"({expected.measurements:,} measurements, {sum(expected.posted.values()):,} microcredits posted)."
            )
        else:
            console.print("[bold red]The ledger does NOT match the seed's usage.[/]")
        return ok
    finally:
        await api.http.aclose()
