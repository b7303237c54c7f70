"""Corrections of a closed range at the pricer (issue 18, item 3), on the real PostgreSQL and Kafka.

``POST /internal/rerates`` stores the corrected terms as a price correction over [from, to) of one (meter,
kind) and a job that re-prices, in the background of the pricer, the latest charges of that meter, kind and
range as revision n+1, published on usage.charges.v3 with ``correction = {id, reason}``; everything outside
is untouched. Overlapping corrections are a 409, bad terms a 422 problem with nothing stored, the job's
progress reaches its total, and a pricer restarted in the middle of a job finishes it without publishing
different content for the same charge revision twice.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import pytest

from cli.rerate import rerate
from services.pricer.app import create_app
from shared.batches import Charges
from tests.integration.test_pricer_prices import (
    Key,
    Running,
    batches,
    items_of,
    price_body,
    read_charges,
    received,
    running,  # noqa: F401  (the fixture)
    settings,
    stored,
)
from tests.sim_server import serve_app
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

H0 = datetime(2026, 1, 10, 0, tzinfo=UTC)  # hours H0 .. H0+3 of a January (any closed month will do)
RATE, UNIT = 1_000_000, 730 * 1024  # the price of cfapps/"" at first
NEW_RATE, NEW_UNIT = 900_001, 1000  # the corrected terms (flat)
OTHER_RATE = 7  # cfapps/"task", not corrected


def readings_of(hour: datetime) -> list[tuple[str, int, str]]:
    """Twelve resources of kind "" and four of kind "task" (several shards), values varying by hour."""
    k = int((hour - H0).total_seconds()) // 3600
    return [(f"app-{i}", 1000 * (i + 1) + 7 * k, "") for i in range(12)] + [
        (f"task-{i}", 50 + i + k, "task") for i in range(4)
    ]


def rerate_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "meter": "cfapps",
        "resource_kind": "",
        "from": (H0 + timedelta(hours=1)).isoformat(),
        "to": (H0 + timedelta(hours=3)).isoformat(),
        "reason": "January's cfapps price was entered 10% too high",
        "price": {"unit_of_measure": "MB-hour", "microcredits_per_unit": NEW_RATE, "unit": NEW_UNIT},
    }
    body.update(overrides)
    return body


async def seed(http: httpx.AsyncClient, handle: Any) -> dict[Key, int]:
    """Two prices and the readings of four hours (both kinds), priced; the values by measurement."""
    for body in (price_body(unit=UNIT, microcredits_per_unit=RATE),
                 price_body(resource_kind="task", unit_of_measure="task-hour", microcredits_per_unit=OTHER_RATE,
                            unit=1)):
        r = await http.post("/internal/prices", json=body)
        assert r.status_code == 201, r.text
    values: dict[Key, int] = {}
    for k in range(4):
        hour = H0 + timedelta(hours=k)
        assert await handle(received(batches(hour, readings_of(hour)))) == []
        values.update({(hour, "cfapps", rid): v for rid, v, _ in readings_of(hour)})
    return values


async def wait_done(http: httpx.AsyncClient, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job: dict[str, Any] = (await http.get(f"/internal/rerates/{job_id}")).json()
        if job["state"] != "running" or asyncio.get_running_loop().time() > deadline:
            return job
        await asyncio.sleep(0.1)


def in_range(key: Key) -> bool:
    return H0 + timedelta(hours=1) <= key[0] < H0 + timedelta(hours=3) and key[2].startswith("app-")


async def test_a_correction_re_prices_exactly_the_range_as_revision_2_with_the_correction(running: Running) -> None:
    values = await seed(running.http, running.pricer.handle_readings)
    before = await stored(running)
    assert len(before) == 64 and all(v[0] == 1 for v in before.values())

    r = await running.http.post("/internal/rerates", json=rerate_body())
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["state"], job["meter"], job["resource_kind"]) in {
        ("running", "cfapps", ""), ("done", "cfapps", "")}
    assert job["total"] == 32  # both kinds of the two hours: the measurements of the meter in the range
    correction_id = uuid.UUID(job["price"]["id"])
    assert job["price"]["microcredits_per_unit"] == NEW_RATE and job["price"]["valid_until"] is not None

    job = await wait_done(running.http, job["id"])
    assert job["state"] == "done", job
    assert (job["done"], job["total"], job["repriced"], job["refused"], job["failure"]) == (32, 32, 24, 0, None)

    # The store: revision 2 with the correction for exactly the 24 items of cfapps/"" in [H0+1, H0+3), amounts
    # from the definition value * rate / unit; every other item still at its revision 1.
    after = await stored(running)
    for key, (rev, price, amount) in after.items():
        if in_range(key):
            assert (rev, price, amount) == (2, correction_id, Fraction(values[key] * NEW_RATE, NEW_UNIT)), key
        else:
            assert (rev, price, amount) == before[key], key
    assert sum(1 for k in after if in_range(k)) == 24

    # The topic: the 8 first batches... plus batches of revision 2 carrying the correction, nothing else new.
    published = await read_charges(running.kafka, running.charges_topic, expected=10_000, timeout=4)
    corrected: list[Charges] = [c for _, c in published if c.correction is not None]
    plain = [c for _, c in published if c.correction is None]
    assert all(v[0] == 1 for c in plain for v in items_of(c).values())
    assert {c.correction.id for c in corrected if c.correction} == {uuid.UUID(job["id"])}
    assert {c.correction.reason for c in corrected if c.correction} == {rerate_body()["reason"]}
    got = {k: v for c in corrected for k, v in items_of(c).items()}
    assert got == {k: (2, correction_id, Fraction(values[k] * NEW_RATE, NEW_UNIT)) for k in values if in_range(k)}
    assert sum(len(c.resource_id) for c in corrected) == 24  # each once

    # New readings of a corrected hour are priced with the correction too; the listing of prices is unchanged.
    late_hour = H0 + timedelta(hours=2)
    assert await running.pricer.handle_readings(received(batches(late_hour, [("app-late", 5, "")]))) == []
    assert (await stored(running))[(late_hour, "cfapps", "app-late")] == (
        1, correction_id, Fraction(5 * NEW_RATE, NEW_UNIT))
    listed = (await running.http.get("/internal/prices", params={"meter": "cfapps"})).json()["items"]
    assert str(correction_id) not in {p["id"] for p in listed} and len(listed) == 2
    assert (await running.http.get(f"/internal/prices/{correction_id}")).json()["id"] == str(correction_id)
    end = await running.http.post(f"/internal/prices/{correction_id}/end", json={"at": late_hour.isoformat()})
    assert end.status_code == 409, end.text

    # Listed, newest first, paged.
    second = await running.http.post(
        "/internal/rerates", json=rerate_body(resource_kind="task", reason="task price", price={
            "unit_of_measure": "task-hour", "microcredits_per_unit": 3, "unit": 1}))
    assert second.status_code == 202, second.text
    page1 = (await running.http.get("/internal/rerates", params={"limit": 1})).json()
    page2 = (await running.http.get("/internal/rerates", params={"limit": 1, "cursor": page1["next_cursor"]})).json()
    assert [j["id"] for j in page1["items"] + page2["items"]] == [second.json()["id"], job["id"]]
    assert page2["next_cursor"] is None
    assert (await running.http.get("/internal/rerates", params={"cursor": "nonsense"})).status_code == 422
    assert (await running.http.get(f"/internal/rerates/{uuid.uuid4()}")).status_code == 404
    assert (await wait_done(running.http, second.json()["id"]))["repriced"] == 8


async def test_overlapping_corrections_are_409_and_bad_terms_422_with_nothing_stored(running: Running) -> None:
    await seed(running.http, running.pricer.handle_readings)
    first = await running.http.post("/internal/rerates", json=rerate_body())
    assert first.status_code == 202, first.text
    overlap = await running.http.post("/internal/rerates", json=rerate_body(
        **{"from": (H0 + timedelta(hours=2)).isoformat(), "to": (H0 + timedelta(hours=5)).isoformat()}))
    assert overlap.status_code == 409 and overlap.headers["content-type"] == "application/problem+json"
    assert overlap.json()["conflicts"] == [first.json()["price"]["id"]]
    # Adjacent is not overlapping; another kind neither.
    adjacent = rerate_body(**{"from": (H0 + timedelta(hours=3)).isoformat(),
                              "to": (H0 + timedelta(hours=4)).isoformat()})
    assert (await running.http.post("/internal/rerates", json=adjacent)).status_code == 202

    async def counts() -> tuple[int, int]:
        async with running.pool.acquire() as conn:
            return (await conn.fetchval("SELECT count(*) FROM prices"),
                    await conn.fetchval("SELECT count(*) FROM rerate_jobs"))

    before = await counts()
    feb = "2026-02-01T05:00:00Z"  # midnight America/New_York, February 1st
    bands = [{"up_to": "10", "microcredits_per_unit": 5}, {"up_to": None, "microcredits_per_unit": 1}]
    bad: list[tuple[str, dict[str, Any]]] = [
        ("from not a whole hour", rerate_body(**{"from": "2026-01-10T01:30:00Z"})),
        ("to before from", rerate_body(to=H0.isoformat())),
        ("naive time", rerate_body(**{"from": "2026-01-10T01:00:00"})),
        ("empty reason", rerate_body(reason="")),
        ("reason too long", rerate_body(reason="x" * 501)),
        ("flat without a rate", rerate_body(price={"unit_of_measure": "MB-hour", "unit": 1})),
        ("unit 0", rerate_body(price={"unit_of_measure": "MB-hour", "microcredits_per_unit": 1, "unit": 0})),
        ("flat with bands", rerate_body(price={"unit_of_measure": "MB-hour", "microcredits_per_unit": 1, "unit": 1,
                                               "bands": bands})),
        ("graduated mid-month", rerate_body(price={"unit_of_measure": "MB-hour", "model": "graduated",
                                                   "bands": bands, "unit": 1})),
        ("graduated bad bands", rerate_body(**{"from": "2026-01-01T05:00:00Z", "to": feb}, price={
            "unit_of_measure": "MB-hour", "model": "graduated", "unit": 1,
            "bands": [{"up_to": "10", "microcredits_per_unit": 5}]})),
        ("meter and range in the terms", rerate_body(price={"unit_of_measure": "MB-hour", "microcredits_per_unit": 1,
                                                            "unit": 1, "valid_from": feb})),
        ("unknown field", rerate_body(extra=1)),
        ("no price", {k: v for k, v in rerate_body().items() if k != "price"}),
    ]
    for case, body in bad:
        r = await running.http.post("/internal/rerates", json=body)
        assert r.status_code == 422, (case, r.text)
        assert r.headers["content-type"] == "application/problem+json", case
    assert await counts() == before
    # A command: sent again with its Idempotency-Key, the first answer is replayed and no second job starts;
    # each request is in the audit trail.
    keyed = rerate_body(resource_kind="task", reason="keyed")
    once = await running.http.post("/internal/rerates", json=keyed, headers={"Idempotency-Key": "rerate-1"})
    twice = await running.http.post("/internal/rerates", json=keyed, headers={"Idempotency-Key": "rerate-1"})
    assert once.status_code == twice.status_code == 202, twice.text
    assert twice.headers["idempotent-replayed"] == "true" and twice.json()["id"] == once.json()["id"]
    assert (await counts())[1] == before[1] + 1
    trail = (await running.http.get("/internal/audit", params={"kind": "pricer.rerate.start"})).json()["items"]
    assert {(e["status"], e["replay"]) for e in trail} >= {(202, False), (202, True), (409, False), (422, False)}
    # A graduated correction on month boundaries is accepted.
    ok = rerate_body(resource_kind="task", **{"from": "2026-02-01T05:00:00Z", "to": "2026-03-01T05:00:00Z"}, price={
        "unit_of_measure": "task-hour", "model": "graduated", "unit": 1, "bands": bands})
    r = await running.http.post("/internal/rerates", json=ok)
    assert r.status_code == 202, r.text
    assert r.json()["price"]["model"] == "graduated"


async def test_a_restarted_pricer_finishes_an_unfinished_job_without_publishing_different_content_twice(
    infra: Any, database: Any, topic_prefix: str, issuer: LocalIssuer
) -> None:
    @asynccontextmanager
    async def app_running() -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
        app = create_app(settings(database, infra, topic_prefix, issuer))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pricer",
                                         headers=issuer.bearer()) as http:
                yield app, http

    topic = topic_prefix + "usage.charges.v3"
    async with app_running() as (app, http):
        pricer = app.state.runtime.state["pricer"]
        values = await seed(http, pricer.handle_readings)
        # This instance stops re-rating (as if it died before getting to it) ...
        runner = app.state.runtime.state.pop("rerates")
        runner.cancel()
        r = await http.post("/internal/rerates", json=rerate_body())
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        # ... after one chunk of one shard, committed but not yet published (a crash before the publish).
        pricer.rerate_shards = 1
        published_nothing = pricer.flush_outbox

        async def no_publish(limit: int = 200) -> int:
            return 0

        pricer.flush_outbox = no_publish
        assert await pricer.rerate_step(uuid.UUID(job_id)) is True
        pricer.flush_outbox = published_nothing
        job = (await http.get(f"/internal/rerates/{job_id}")).json()
        assert job["state"] == "running" and 0 < job["done"] < job["total"] and job["repriced"] > 0, job
        async with app.state.runtime.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM unpublished_batches") == 1

    async with app_running() as (app, http):  # the restart: publishes what was stored, then goes on
        job = await wait_done(http, job_id)
        assert job["state"] == "done" and job["done"] == job["total"] == 32 and job["repriced"] == 24, job
        async with app.state.runtime.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM unpublished_batches") == 0

    published = await read_charges(infra.kafka, topic, expected=10_000, timeout=4)
    seen: dict[tuple[Key, int], tuple[Any, ...]] = {}
    for _, c in published:
        for key, charge in items_of(c).items():
            content = (charge, c.correction)
            assert seen.setdefault((key, charge[0]), content) == content, key  # never two contents for one revision
    revised = {k: v for (k, rev), (v, _) in seen.items() if rev == 2}
    assert revised.keys() == {k for k in values if in_range(k)}
    assert all(v[2] == Fraction(values[k] * NEW_RATE, NEW_UNIT) for k, v in revised.items())
    assert all(corr is not None and str(corr.id) == job_id for (_, rev), (_, corr) in seen.items() if rev == 2)


class _AdminToInternal(httpx.BaseTransport):
    """What the api does for these routes (services/api/forward.py): /admin/rerate(s) to the pricer's
    /internal/rerates, the rest of the request as sent."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.replace("/admin/rerates", "/internal/rerates").replace(
            "/admin/rerate", "/internal/rerates")
        request.url = request.url.copy_with(path=path)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


async def test_billing_rerate_starts_a_job_on_a_running_pricer_and_follows_it_to_done(
    running: Running, issuer: LocalIssuer
) -> None:
    values = await seed(running.http, running.pricer.handle_readings)
    token = issuer.bearer()["authorization"].removeprefix("Bearer ")
    async with serve_app(running.app) as url:
        def run(**overrides: Any) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            args: dict[str, Any] = {
                "meter": "cfapps", "kind": "", "start": (H0 + timedelta(hours=1)).isoformat(),
                "end": (H0 + timedelta(hours=3)).isoformat(), "reason": "wrong rate", "rate": NEW_RATE,
                "unit": NEW_UNIT, "unit_of_measure": "MB-hour", "price_json": None, "job_id": None, "wait": True,
                "api_url": url, "token": token, "poll": 0.05,
            }
            args.update(overrides)
            code = rerate(**args, out=out, err=err, transport=_AdminToInternal())
            return code, out.getvalue(), err.getvalue()

        code, out, err = await asyncio.to_thread(run)
        assert code == 0, (out, err)
        assert "done: 24 charges re-priced of 32 measurements in the range" in out, out
        assert "32/32" in out  # the progress bar ended full
        job_id = out.split("re-rating job ", 1)[1].split(" ", 1)[0]
        job = (await running.http.get(f"/internal/rerates/{job_id}")).json()
        assert (job["state"], job["done"], job["total"], job["reason"]) == ("done", 32, 32, "wrong rate")
        after = await stored(running)
        assert all(after[k][2] == Fraction(values[k] * NEW_RATE, NEW_UNIT) for k in values if in_range(k))

        # The same range again: the pricer refuses the overlap, the CLI says so and exits 3.
        code, out, err = await asyncio.to_thread(run)
        assert code == 3 and "409" in err and "already has a price correction" in err, err
        # Bad terms: the pricer's 422 reason, exit 3; nothing started.
        code, out, err = await asyncio.to_thread(run, kind="task", rate=None, unit=None, price_json=json.dumps(
            {"model": "graduated", "unit": 1, "bands": [{"up_to": None, "microcredits_per_unit": 1}]}))
        assert code == 3 and "422" in err and "billing-month boundary" in err, err
        # --no-wait answers at once; --job follows it.
        code, out, err = await asyncio.to_thread(run, kind="task", wait=False)
        assert code == 0 and "billing rerate --job " in out, (out, err)
        started = out.split("--job ", 1)[1].strip()
        blank = {k: None for k in ("meter", "start", "end", "reason", "rate", "unit", "unit_of_measure")}
        code, out, err = await asyncio.to_thread(run, **blank, job_id=started)
        assert code == 0 and "done: 8 charges re-priced" in out, (out, err)
