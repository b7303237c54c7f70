"""Every customer route answering from data that flowed through the real topics: ChargeComputed and
TransactionPosted/StatementIssued messages published to fresh topics, consumed by the api's own
consumers into its read model, queried over HTTP with valid tokens. Expected figures are computed from the
messages with Fractions (the oracle, in tests/support/api_read_model.py), not by the api's code."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest

from tests.support.api_factories import txn
from tests.support.api_harness import ApiHarness, harness  # noqa: F401  (fixture)
from tests.support.api_read_model import (
    EARLY,
    H1,
    H2,
    H3,
    H4,
    LATE,
    LEDGER_AMOUNTS,
    NOV_END,
    NY,
    OCT,
    A,
    B,
    fill,
    final_charges,
    ny_day,
    ny_month,
    oracle,
    ts,
)
from tests.support.openapi_checks import DOC, response_schema, violations

pytestmark = pytest.mark.integration


def only(expected: dict[tuple[Any, Any], Any], prefix: str) -> dict[tuple[Any, Any], Any]:
    """The oracle's cells whose period starts with ``prefix`` (e.g. a month)."""
    return {k: v for k, v in expected.items() if str(k[0]).startswith(prefix)}


def as_answered(items: list[dict[str, Any]], group_key: str) -> dict[tuple[Any, Any], tuple[dict[str, int], Fraction]]:
    out = {}
    for it in items:
        n, d = it["microcredits_exact"].split("/")
        exact = Fraction(int(n), int(d))
        assert it["microcredits"] == exact.numerator // exact.denominator  # floor of the exact sum
        assert f"{exact.numerator}/{exact.denominator}" == it["microcredits_exact"]  # reduced
        key = tuple(it["group"][k] for k in group_key.split(",")) if "," in group_key else it["group"][group_key]
        out[(it["period"], key)] = ({q["unit"]: q["value"] for q in it["quantities"]}, exact)
    return out


def template_of(path: str) -> str:
    for template in DOC["paths"]:
        if re.fullmatch(re.sub(r"{\w+}", "[^/]+", template), path):
            return template
    raise AssertionError(f"{path} is not in the OpenAPI document")


async def get(h: ApiHarness, path: str, headers: dict[str, str], **params: Any) -> Any:
    """GET, expect 200, and hold the body against the OpenAPI document's schema for it."""
    r = await h.client.get(path, params=params, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert violations(body, response_schema(template_of(path), "get", 200)) == []
    return body


async def test_routes_answer_from_what_flowed_through_the_topics(harness: ApiHarness):
    h = harness
    msgs = await fill(h)
    reader_a = h.headers(customers=[str(A)], sub="reader-a")

    # usage by org, by month (America/New_York), October and November
    body = await get(h, f"/v1/customers/{A}/usage", reader_a, **{"from": ts(OCT[0]), "to": ts(NOV_END), "granularity": "month", "group_by": "org"})
    assert as_answered(body["items"], "org_id") == oracle(A, ny_month, lambda c: c.org_id)
    assert {it["group"]["org_name"] for it in body["items"]} == {"name-of-org-x", "name-of-org-z"}
    assert body["next_cursor"] is None
    by_period = {(it["period"], it["group"]["org_id"]): it for it in body["items"]}
    assert by_period[("2026-10", "org-x")]["period_start"] == "2026-10-01T04:00:00Z"
    assert by_period[("2026-11", "org-x")]["period_end"] == "2026-12-01T05:00:00Z"

    # the other customer's share of the reassigned org
    body = await get(h, f"/v1/customers/{B}/usage", h.headers(customers=[str(B)]), **{"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "month", "group_by": "org"})
    assert as_answered(body["items"], "org_id") == oracle(B, ny_month, lambda c: c.org_id)

    # by day and resource across the month boundary and the end of daylight saving time
    day_q = {"from": "2026-10-31T00:00:00-04:00", "to": "2026-11-02T00:00:00-05:00", "granularity": "day", "group_by": "resource"}
    body = await get(h, f"/v1/customers/{A}/usage", reader_a, **day_q)
    expected = {k: v for k, v in oracle(A, ny_day, lambda c: c.resource_id).items() if k[0] in ("2026-10-31", "2026-11-01")}
    assert as_answered(body["items"], "resource_id") == expected
    nov1 = next(it for it in body["items"] if it["period"] == "2026-11-01")
    assert (nov1["period_start"], nov1["period_end"]) == ("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z")  # 25 hours
    svc = next(it for it in body["items"] if it["group"]["resource_id"] == "svc-x2")
    assert svc["group"] == {
        "resource_id": "svc-x2",
        "resource_name": "name-of-svc-x2",
        "meter": "cfservices",
        "resource_kind": "plan-a",
        "space_id": "space-x2",
        "space_name": "name-of-space-x2",
        "org_id": "org-x",
        "org_name": "name-of-org-x",
    }

    # the same pages one item at a time, following the cursors
    walked, cursor = [], None
    for _ in range(20):
        page = await get(h, f"/v1/customers/{A}/usage", reader_a, **day_q, limit=1, **({"cursor": cursor} if cursor else {}))
        walked.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert walked == body["items"]

    # by hour and meter; by kind; by space
    hour_q = {"from": ts(H1), "to": ts(H2 + timedelta(hours=1)), "granularity": "hour"}
    body = await get(h, f"/v1/customers/{A}/usage", reader_a, **hour_q, group_by="meter")
    assert as_answered(body["items"], "meter") == {
        (ts(k[0]), k[1]): v for k, v in oracle(A, lambda t: t, lambda c: c.meter).items() if k[0] in (H1, H2)
    }
    body = await get(h, f"/v1/customers/{A}/usage", reader_a, **{"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "month", "group_by": "kind"})
    assert as_answered(body["items"], "meter,resource_kind") == only(oracle(A, ny_month, lambda c: (c.meter, c.resource_kind)), "2026-10")
    body = await get(h, f"/v1/customers/{A}/usage", reader_a, **{"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "day", "group_by": "space"})
    assert as_answered(body["items"], "space_id") == only(oracle(A, ny_day, lambda c: c.space_id), "2026-10-")

    # balances now and as of a past time
    used = sum(LEDGER_AMOUNTS.values()) - LEDGER_AMOUNTS[H2] - LEDGER_AMOUNTS[H3]  # two usages reversed
    bal = await get(h, f"/v1/customers/{A}/balance", reader_a)
    assert {k: bal[k] for k in ("funded", "used", "expired", "remaining", "overage")} == {
        "funded": 100_000_000,
        "used": used,
        "expired": 2_000_000,
        "remaining": 100_000_000 - used - 2_000_000,
        "overage": 0,
    }
    assert bal["credits"]["funded"] == "100.000000"
    past = await get(h, f"/v1/customers/{A}/balance", reader_a, as_of="2026-10-10T00:00:00Z")
    assert (past["funded"], past["used"], past["expired"]) == (100_000_000, LEDGER_AMOUNTS[H1] + LEDGER_AMOUNTS[H2], 0)
    before = await get(h, f"/v1/customers/{A}/balance", reader_a, as_of="2026-09-30T00:00:00-04:00")
    assert (before["funded"], before["used"], before["remaining"]) == (0, 0, 0)
    bal_b = await get(h, f"/v1/customers/{B}/balance", h.headers(customers=[str(B)]))
    assert (bal_b["remaining"], bal_b["overage"]) == (1_000 - 1_500, 500)

    # transactions, newest first, two at a time
    items, cursor = [], None
    for _ in range(10):
        page = await get(h, f"/v1/customers/{A}/transactions", reader_a, limit=2, **({"cursor": cursor} if cursor else {}))
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    sent = [m for m in msgs["a"] if m.schema_name == "ledger.transaction"]
    assert [it["id"] for it in items] == [str(m.id) for m in sorted(sent, key=lambda m: (m.occurred_at, m.id), reverse=True)]
    by_id = {it["id"]: it for it in items}
    assert by_id[str(msgs["by_id"].id)]["reverses"] == str(msgs["orig"].id)
    assert by_id[str(msgs["by_id"].id)]["effect"] == {"bucket": "used", "microcredits": -4_000}
    assert by_id[str(msgs["by_mirror"].id)]["reverses"] == str(msgs["mirror_orig"].id)
    only_funding = await get(h, f"/v1/customers/{A}/transactions", reader_a, type="funding")
    assert [it["type"] for it in only_funding["items"]] == ["funding"]

    # the statement of a closed month, and none for an open one
    st = await get(h, f"/v1/customers/{A}/statements/2026-10", reader_a)
    s = msgs["stmt"]
    assert (st["statement_id"], st["funded"], st["used"], st["expired"], st["closing_balance"]) == (
        str(s.id), s.funded, s.used, s.expired, s.closing_balance
    )
    assert st["used_by_kind"] == [{"meter": "cfapps", "resource_kind": "", "microcredits": s.used}]
    none = await h.client.get(f"/v1/customers/{A}/statements/2026-11", headers=reader_a)
    assert none.status_code == 404

    # the customers each caller may see
    admin_list = await get(h, "/v1/customers", h.admin)
    assert {c["customer_id"] for c in admin_list["items"]} == {str(A), str(B)}
    mine = await get(h, "/v1/customers", reader_a)
    assert [c["customer_id"] for c in mine["items"]] == [str(A)]
    paged = await get(h, "/v1/customers", h.admin, limit=1)
    assert len(paged["items"]) == 1 and paged["next_cursor"]


async def test_replaying_every_message_changes_nothing(harness: ApiHarness):
    h = harness
    msgs = await fill(h)
    reader_a = h.headers(customers=[str(A)])
    q = {"from": ts(OCT[0]), "to": ts(NOV_END), "granularity": "day", "group_by": "resource"}
    before = await get(h, f"/v1/customers/{A}/usage", reader_a, **q)
    bal_before = await get(h, f"/v1/customers/{A}/balance", reader_a, as_of="2026-12-01T00:00:00Z")
    # everything again, in the other order
    await h.publish_ledger(msgs["a"] + msgs["b"])
    await h.publish_charges(LATE + EARLY)
    await h.caught_up()
    assert await get(h, f"/v1/customers/{A}/usage", reader_a, **q) == before
    assert await get(h, f"/v1/customers/{A}/balance", reader_a, as_of="2026-12-01T00:00:00Z") == bal_before
    assert await h.sql("SELECT count(*) FROM api.ledger_transaction") == len(msgs["a"]) + len(msgs["b"]) - 1


async def test_entitlements_grant_and_revoke_what_a_reader_sees(harness: ApiHarness):
    h = harness
    await fill(h)
    reader = h.headers(sub="carol")  # no customers claim
    r = await h.client.get(f"/v1/customers/{B}/balance", headers=reader)
    assert r.status_code == 404
    grant = await h.client.post("/admin/entitlements", json={"subject": "carol", "customer_id": str(B)}, headers=h.admin)
    assert grant.status_code == 201, grant.text
    assert grant.json()["granted_by"] == "admin-1"
    again = await h.client.post("/admin/entitlements", json={"subject": "carol", "customer_id": str(B)}, headers=h.admin)
    assert again.status_code == 200
    assert (await h.client.get(f"/v1/customers/{B}/balance", headers=reader)).status_code == 200
    listed = await get(h, "/admin/entitlements", h.admin, subject="carol")
    assert [(e["subject"], e["customer_id"]) for e in listed["items"]] == [("carol", str(B))]
    assert [c["customer_id"] for c in (await get(h, "/v1/customers", reader))["items"]] == [str(B)]
    gone = await h.client.delete("/admin/entitlements", params={"subject": "carol", "customer_id": str(B)}, headers=h.admin)
    assert gone.status_code == 204
    assert (await h.client.get(f"/v1/customers/{B}/balance", headers=reader)).status_code == 404
    again = await h.client.delete("/admin/entitlements", params={"subject": "carol", "customer_id": str(B)}, headers=h.admin)
    assert again.status_code == 404


async def test_a_ledger_message_of_unknown_schema_goes_to_the_dlq_and_the_rest_is_applied(harness: ApiHarness):
    from aiokafka import AIOKafkaConsumer

    from shared.kafka import Outgoing, encode
    from shared.topics import TRANSACTIONS, dlq

    h = harness
    good = txn(A, "funding", 42, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC))
    bad = encode(good).replace(b'"ledger.transaction"', b'"ledger.unknown"')
    topic = h.settings.topic(TRANSACTIONS)
    await h.publisher.publish(topic, [Outgoing(str(A).encode(), bad), Outgoing(str(A).encode(), encode(good))])
    await h.caught_up()
    assert await h.sql("SELECT amount FROM api.ledger_transaction WHERE transaction_id = $1", good.id) == 42
    consumer = AIOKafkaConsumer(dlq(topic), bootstrap_servers=h.settings.kafka_bootstrap_servers, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    try:
        got = await consumer.getmany(timeout_ms=5000)
        records = [r for rs in got.values() for r in rs]
    finally:
        await consumer.stop()
    assert len(records) == 1
    assert b"schema_name" in dict(records[0].headers)["dlq.reason"]


def test_the_oracle_itself_covers_the_interesting_cases():
    """The scenario must exercise what it claims: revisions, an unpriced charge re-priced, a reassigned
    org, a day of 25 hours, and charges on both sides of the New York month boundary."""
    finals = final_charges()
    assert any(c.revision == 2 for c in finals)
    assert {ny_month(H3), ny_month(H4)} == {"2026-10", "2026-11"}
    assert (H4.astimezone(NY) + timedelta(days=1)).date() == date(2026, 11, 2)
    assert oracle(A, ny_month, lambda c: c.org_id)[("2026-10", "org-z")][1] == Fraction(333)
    assert oracle(B, ny_month, lambda c: c.org_id)[("2026-10", "org-z")][1] == Fraction(1, 9)


async def test_the_group_rollups_filled_by_migration_002_equal_those_kept_up_to_date_by_the_projector(harness: ApiHarness):
    """A read model that existed before migration 002 gets its hourly and daily group rollups from the
    migration's backfill; they must equal, as exact amounts, the ones the projector maintains charge by
    charge (revisions, duplicates and late attribution included)."""
    import asyncpg

    from services.api.repository import group_rollups_backfill_sql

    h = harness
    await fill(h)
    backfill = group_rollups_backfill_sql()
    queries = {t: f"SELECT customer_id, dim, {c}, key, key2, unit, value, amount_num::text, amount_den::text FROM {t}"
               for t, c in (("usage_hour_group", "hour"), ("usage_day_group", "day"))}

    def exact(rows: list[Any]) -> set[tuple[Any, ...]]:
        return {(*r[:7], Fraction(int(r[7]), int(r[8]))) for r in rows if r[6] or int(r[7])}

    conn = await asyncpg.connect(h.admin_dsn, server_settings={"search_path": "api"})
    try:
        live = {t: exact(await conn.fetch(q)) for t, q in queries.items()}
        assert all(live.values()), "the scenario must fill both rollups"
        await conn.execute("TRUNCATE usage_hour_group, usage_day_group")
        await conn.execute(backfill)
        rebuilt = {t: exact(await conn.fetch(q)) for t, q in queries.items()}
    finally:
        await conn.close()
    assert rebuilt == live
