"""Webhook delivery end to end: the real api (Kafka consumers, PostgreSQL, its sending loop) delivers the alerts
published to ``ledger.alerts.v1`` and a statement published to ``ledger.transactions.v1`` to a real
``billing webhook-receiver`` app listening on a local port. The receiver is stopped for ten minutes of
simulated time (the api's clock and the receiver's are moved by the test) while every attempt fails; after
it comes back every event arrives exactly once, by id, with a valid signature; the attempts are listed by
the admin API; a subscription whose URL never answers ends failed 24 hours after each event; and a request
with a wrong signature is refused by the receiver."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn

from cli.webhook_receiver import Received, receiver_app
from services.api.webhooks import Webhooks
from shared.contracts import AlertRaised
from shared.kafka import Outgoing, encode, group_lag
from shared.topics import ALERTS
from shared.webhooks import signed_headers
from tests.conftest import Database, Infra
from tests.sim_server import serve_config
from tests.support.api_factories import statement, txn
from tests.support.api_harness import ApiHarness, running_api

pytestmark = pytest.mark.integration

A = uuid.uuid4()
SECRET = "whsec-test-0123456789abcdef"


class Clock:
    """The time the api's webhooks and the receiver see, moved by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@contextlib.asynccontextmanager
async def receiver(app: Any, port: int = 0) -> AsyncIterator[int]:
    """The receiver app served by uvicorn on ``port`` (0: a free one); yields the port."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none")
    async with serve_config(config) as bound:
        yield bound


def alert(percent: int) -> AlertRaised:
    return AlertRaised(
        id=uuid.uuid4(),
        customer_id=A,
        agreement_id=uuid.UUID(int=1),
        threshold_percent=percent,  # type: ignore[arg-type]
        funded=10_000_000,
        used=percent * 100_000,
        raised_at=datetime(2026, 11, 20, 15, tzinfo=UTC),
    )


async def settled(h: ApiHarness, clock: Clock) -> None:
    """Wait until the api has tried every delivery due by the clock (and recorded the attempt)."""

    async def check() -> bool:
        due = await h.sql(
            "SELECT count(*) FROM webhook_delivery WHERE status = 'pending' AND next_attempt_at <= $1", clock.now
        )
        return int(due) == 0

    await h.until(check, "the due deliveries to be tried", timeout=30)


async def deliveries(h: ApiHarness, hook: str) -> list[dict[str, Any]]:
    """Every delivery of ``hook``, through the admin API, two per page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        r = await h.client.get(f"/admin/webhooks/{hook}/deliveries", params=params, headers=h.admin)
        assert r.status_code == 200, r.text
        page = r.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_every_alert_arrives_once_after_the_receiver_was_down_ten_minutes(
    infra: Infra, database: Database, topic_prefix: str
) -> None:
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    got = Received()
    app = receiver_app(SECRET, got, clock=clock)
    async with running_api(
        infra, database, topic_prefix, webhook_poll_seconds=0.05, webhook_timeout_seconds=2
    ) as h:
        h.app.state.api.webhooks.clock = clock
        await h.publish_ledger([txn(A, "funding", 10_000_000, occurred_at=datetime(2026, 11, 1, 4, tzinfo=UTC))])
        await h.until_count("customer", 1)

        async with receiver(app) as port:
            pass  # the receiver's port, then it is stopped: it is down while the events come

        # Bad subscriptions change nothing.
        for bad in (
            {"customer_id": str(A), "url": "ftp://127.0.0.1/x", "events": ["alert.raised"]},
            {"customer_id": str(A), "url": f"http://127.0.0.1:{port}/", "events": []},
            {"customer_id": str(A), "url": f"http://127.0.0.1:{port}/", "events": ["alert.raised", "alert.raised"]},
            {"customer_id": str(A), "url": f"http://127.0.0.1:{port}/", "events": ["alert.raised"], "secret": "short"},
        ):
            r = await h.client.post("/admin/webhooks", json=bad, headers=h.admin)
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", (bad, r.text)
        h.app.state.api.webhooks.https_only = True  # as in production: an http URL is refused
        r = await h.client.post(
            "/admin/webhooks", headers=h.admin,
            json={"customer_id": str(A), "url": f"http://127.0.0.1:{port}/", "events": ["alert.raised"]},
        )
        assert r.status_code == 422 and "https" in r.json()["detail"], r.text
        h.app.state.api.webhooks.https_only = False
        assert int(await h.sql("SELECT count(*) FROM webhook_subscription")) == 0

        body = {
            "customer_id": str(A), "url": f"http://127.0.0.1:{port}/hooks",
            "events": ["alert.raised", "statement.issued"], "secret": SECRET,
        }
        r = await h.client.post("/admin/webhooks", json=body, headers=h.admin)
        assert r.status_code == 201, r.text
        hook = r.json()
        assert hook["secret"] == SECRET and hook["active"] is True and hook["created_by"] == "admin-1"
        r = await h.client.post(
            "/admin/webhooks", headers=h.admin,
            json={"customer_id": str(A), "url": "http://127.0.0.1:9/never", "events": ["alert.raised"]},
        )
        assert r.status_code == 201, r.text
        dead = r.json()
        assert len(dead["secret"]) >= 32  # generated
        r = await h.client.get("/admin/webhooks", params={"customer_id": str(A)}, headers=h.admin)
        assert r.status_code == 200
        assert {w["id"] for w in r.json()["items"]} == {hook["id"], dead["id"]}
        assert SECRET not in r.text and dead["secret"] not in r.text and "secret" not in r.text

        # The events, with the receiver down: four alerts (the first one published twice) and a statement.
        alerts = [alert(p) for p in (50, 75, 90, 100)]
        await h.publisher.publish(
            h.settings.topic(ALERTS), [Outgoing(str(A).encode(), encode(m)) for m in [*alerts, alerts[0]]]
        )
        closed = statement(A, "2026-11", funded=10_000_000, used=9_000_000, closing_balance=1_000_000)
        await h.publish_ledger([closed])
        expected = {str(a.id): "alert.raised" for a in alerts} | {str(closed.id): "statement.issued"}

        async def all_consumed() -> bool:
            lag = await group_lag(h.settings.kafka_bootstrap_servers, h.settings.topic("api"), h.settings.topic(ALERTS))
            tried = await h.sql("SELECT count(*) FROM webhook_delivery WHERE attempts >= 1")
            return lag == 0 and int(tried) == len(expected) + len(alerts)

        await h.until(all_consumed, "every event consumed and tried once")
        assert int(await h.sql("SELECT count(*) FROM webhook_delivery")) == len(expected) + len(alerts)

        # Ten minutes of simulated time with the receiver down: every attempt fails.
        for _ in range(20):
            clock.advance(timedelta(seconds=30))
            await settled(h, clock)
        assert got.events == []
        down = await deliveries(h, hook["id"])
        assert all(d["status"] == "pending" and d["attempts"] >= 4 for d in down), down

        # It comes back on the same port: within the backoff every event arrives, exactly once.
        async with receiver(app, port):
            for _ in range(120):
                clock.advance(timedelta(minutes=1))
                await settled(h, clock)
                if len(got.events) >= len(expected):
                    break
            for _ in range(3):  # a little more time: nothing comes twice
                clock.advance(timedelta(hours=1))
                await settled(h, clock)

            assert sorted(e["id"] for e in got.events) == sorted(expected), got.events
            assert {e["id"]: e["type"] for e in got.events} == expected
            assert all(e["customer_id"] == str(A) for e in got.events)
            assert got.refused == 0  # every one carried a valid signature and a recent timestamp
            alert_data = {e["data"]["threshold_percent"] for e in got.events if e["type"] == "alert.raised"}
            assert alert_data == {50, 75, 90, 100}

            # The attempts, through the admin API: failures (no answer) and then the 204.
            listed = await deliveries(h, hook["id"])
            assert sorted(d["event_id"] for d in listed) == sorted(expected)
            assert sorted(got.delivery_ids) == sorted(d["id"] for d in listed)
            for d in listed:
                assert d["status"] == "delivered" and d["next_attempt_at"] is None and d["finished_at"], d
                log = d["attempt_log"]
                assert [a["n"] for a in log] == list(range(1, d["attempts"] + 1))
                assert d["attempts"] >= 5
                assert log[-1]["status_code"] == 204 and log[-1]["error"] is None
                assert all(a["status_code"] is None and a["error"] for a in log[:-1]), log

            # A wrong signature is refused by the receiver, and not counted.
            payload = b'{"id":"00000000-0000-0000-0000-000000000001","type":"alert.raised"}'
            forged = signed_headers("whsec-someone-else-000000", uuid.uuid4(), clock.now, payload)
            async with httpx.AsyncClient() as client:
                r = await client.post(f"http://127.0.0.1:{port}/hooks", content=payload, headers=forged)
                assert r.status_code == 400
                ok = signed_headers(SECRET, uuid.uuid4(), clock.now, payload)
                r = await client.post(f"http://127.0.0.1:{port}/hooks", content=payload, headers=ok)
                assert r.status_code == 204  # the same request signed with the secret is accepted
            assert got.refused == 1 and len(got.events) == len(expected) + 1

        # The subscription nobody answers: its deliveries end failed 24 hours after their events.
        for _ in range(24):
            clock.advance(timedelta(hours=1))
            await settled(h, clock)
        failed = await deliveries(h, dead["id"])
        assert sorted(d["event_id"] for d in failed) == sorted(str(a.id) for a in alerts)
        for d in failed:
            assert d["status"] == "failed" and d["next_attempt_at"] is None, d
            created = datetime.fromisoformat(d["created_at"])
            times = [datetime.fromisoformat(a["at"]) for a in d["attempt_log"]]
            assert times[-1] >= created + timedelta(hours=24) > times[-2]
            assert d["attempts"] >= 25  # 30 s doubling to an hour apart, for a day
        r = await h.client.get(f"/admin/webhooks/{dead['id']}/deliveries", params={"status": "failed"}, headers=h.admin)
        assert len(r.json()["items"]) == len(alerts)

        # Deleted: no longer listed; a second delete is 404.
        r = await h.client.delete(f"/admin/webhooks/{dead['id']}", headers=h.admin)
        assert r.status_code == 204
        r = await h.client.delete(f"/admin/webhooks/{dead['id']}", headers=h.admin)
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        r = await h.client.get("/admin/webhooks", headers=h.admin)
        assert [w["id"] for w in r.json()["items"]] == [hook["id"]]
        assert int(await h.sql("SELECT count(*) FROM audit_log WHERE kind LIKE 'api.webhook.%'")) >= 3
        assert await h.sql("SELECT count(*) FROM audit_log WHERE strpos(body::text, $1) > 0", SECRET) == 0


async def test_three_senders_on_one_database_deliver_each_event_once(
    infra: Infra, database: Database, topic_prefix: str
) -> None:
    """Several api instances send from the same tables: each claims what the others have not locked."""
    got = Received()
    inner = receiver_app(SECRET, got)

    async def slow(scope: Any, receive: Any, send: Any) -> None:  # a receiver that takes its time
        if scope["type"] == "http":
            await asyncio.sleep(0.05)
        await inner(scope, receive, send)

    async with running_api(infra, database, topic_prefix, webhook_poll_seconds=0.02) as h, receiver(slow) as port:
        api = h.app.state.api
        await h.publish_ledger([txn(A, "funding", 10_000_000, occurred_at=datetime(2026, 11, 1, 4, tzinfo=UTC))])
        await h.until_count("customer", 1)
        r = await h.client.post(
            "/admin/webhooks", headers=h.admin,
            json={
                "customer_id": str(A), "url": f"http://127.0.0.1:{port}/", "events": ["alert.raised"], "secret": SECRET,
            },
        )
        assert r.status_code == 201, r.text
        others = [Webhooks(lambda: api.runtime.pool, api._known_customer, poll_seconds=0.02, batch=3) for _ in range(2)]
        api.webhooks.batch = 3
        for w in others:
            await w.start()
        try:
            alerts = [alert(p) for p in (50, 75, 90, 100) for _ in range(8)]
            await h.publisher.publish(h.settings.topic(ALERTS), [Outgoing(str(A).encode(), encode(m)) for m in alerts])

            async def delivered() -> bool:
                done = await h.sql("SELECT count(*) FROM webhook_delivery WHERE status = 'delivered'")
                return int(done) == len(alerts)

            await h.until(delivered, "every alert delivered")
        finally:
            for w in others:
                await w.stop()
        assert sorted(e["id"] for e in got.events) == sorted(str(a.id) for a in alerts)
        assert int(await h.sql("SELECT count(*) FROM webhook_attempt")) == len(alerts)


async def test_no_transaction_stays_open_while_a_receiver_answers_and_a_dead_senders_claim_runs_out(
    infra: Infra, database: Database, topic_prefix: str
) -> None:
    """A receiver that takes its time: while it holds the POST, the api has no transaction open (the claim was
    committed first); another sender skips the claimed delivery. A delivery claimed by a sender that died
    (its claim left behind) is sent once the claim has run out, not before."""
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    got = Received()
    inner = receiver_app(SECRET, got, clock=clock)
    answering = asyncio.Event()
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            answering.set()
            await release.wait()
        await inner(scope, receive, send)

    async with running_api(
        infra, database, topic_prefix, webhook_poll_seconds=0.05, webhook_timeout_seconds=10
    ) as h, receiver(slow) as port:
        api = h.app.state.api
        api.webhooks.clock = clock
        await h.publish_ledger([txn(A, "funding", 10_000_000, occurred_at=datetime(2026, 11, 1, 4, tzinfo=UTC))])
        await h.until_count("customer", 1)
        r = await h.client.post(
            "/admin/webhooks", headers=h.admin,
            json={"customer_id": str(A), "url": f"http://127.0.0.1:{port}/", "events": ["alert.raised"],
                  "secret": SECRET},
        )
        assert r.status_code == 201, r.text
        first = alert(50)
        await h.publisher.publish(h.settings.topic(ALERTS), [Outgoing(str(A).encode(), encode(first))])
        await asyncio.wait_for(answering.wait(), 30)

        # The api's connections (not this one, the admin's) while the receiver holds the POST.
        api_connections = await h.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND usename <> current_user"
        )
        in_transaction = await h.sql(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND usename <> current_user AND state LIKE 'idle in transaction%'"""
        )
        other = Webhooks(lambda: api.runtime.pool, api._known_customer, poll_seconds=0.05)
        other.clock = clock
        await other.start()
        try:
            assert await other.send_due() == 0  # claimed by the first sender
        finally:
            await other.stop()
        release.set()
        await h.until(
            lambda: _count(h, "SELECT count(*) FROM webhook_delivery WHERE status = 'delivered'", 1), "delivered"
        )
        assert int(api_connections) > 0 and int(in_transaction) == 0

        # A sender died holding a claim on the next alert: nobody sends it until the claim has run out.
        await api.webhooks.stop()  # the api's own sender stands aside; ``other`` plays the senders left
        second = alert(75)
        await h.publisher.publish(h.settings.topic(ALERTS), [Outgoing(str(A).encode(), encode(second))])
        await h.until(lambda: _count(h, "SELECT count(*) FROM webhook_delivery", 2), "the second delivery")
        await h.sql(
            "UPDATE webhook_delivery SET claimed_until = $1 WHERE status = 'pending'", clock.now + timedelta(minutes=1)
        )
        other = Webhooks(lambda: api.runtime.pool, api._known_customer, poll_seconds=3600)
        other.clock = clock
        await other.start()
        try:
            assert await other.send_due() == 0
            clock.advance(timedelta(minutes=1))
            assert await other.send_due() == 1
        finally:
            await other.stop()
        assert sorted(e["id"] for e in got.events) == sorted([str(first.id), str(second.id)])


async def _count(h: ApiHarness, sql: str, expected: int) -> bool:
    return int(await h.sql(sql)) == expected
