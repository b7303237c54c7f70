"""Every customer route answering from data that flowed through the real topics: charges batches
(usage.charges.v2) and TransactionPosted/StatementIssued messages published to fresh topics, consumed by the
api's own consumers into its read model, queried over HTTP with valid tokens. Expected figures are computed
from the charges with Fractions (the oracle, in tests/support/api_read_model.py), not by the api's code."""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any

import msgspec
import pytest

from shared.batches import Charges, encode_charges, read_as_written, shard_of
from shared.kafka import Outgoing, encode
from shared.topics import CHARGES, TRANSACTIONS
from tests.support.api_factories import ChargeItem, batches, charge, outgoing, txn
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
    OWNER,
    A,
    B,
    fill,
    final_charges,
    ledger_list,
    ny_day,
    ny_month,
    oracle,
    ts,
)
from tests.support.openapi_checks import DOC, response_schema, violations

pytestmark = pytest.mark.integration

Cells = dict[tuple[Any, Any], tuple[dict[str, int], Fraction]]

# Group by -> (the group's fields in an answer, the same of a charge)
GROUPS: dict[str, tuple[str, Callable[[ChargeItem], Any]]] = {
    "org": ("org_id", lambda c: c.org_id),
    "space": ("space_id", lambda c: c.space_id),
    "resource": ("resource_id", lambda c: c.resource_id),
    "meter": ("meter", lambda c: c.meter),
    "kind": ("meter,resource_kind", lambda c: (c.meter, c.resource_kind)),
}
# Granularity -> the period of a reading hour as answered
PERIODS: dict[str, Callable[[datetime], str]] = {"hour": ts, "day": ny_day, "month": ny_month}
# Ranges that hold every hour of the scenario: hours in two windows (a query covers at most a month of hours),
# days and months across October and November in New York.
RANGES: dict[str, list[tuple[datetime, datetime]]] = {
    "hour": [
        (datetime(2026, 10, 5, 4, tzinfo=UTC), datetime(2026, 10, 6, 4, tzinfo=UTC)),
        (datetime(2026, 10, 31, 4, tzinfo=UTC), datetime(2026, 11, 2, 5, tzinfo=UTC)),
    ],
    "day": [(OCT[0], NOV_END)],
    "month": [(OCT[0], NOV_END)],
}


def only(expected: dict[tuple[Any, Any], Any], prefix: str) -> dict[tuple[Any, Any], Any]:
    """The oracle's cells whose period starts with ``prefix`` (e.g. a month)."""
    return {k: v for k, v in expected.items() if str(k[0]).startswith(prefix)}


def as_answered(items: list[dict[str, Any]], group_key: str) -> Cells:
    out = {}
    for it in items:
        n, d = it["microcredits_exact"].split("/")
        exact = Fraction(int(n), int(d))
        assert it["microcredits"] == exact.numerator // exact.denominator  # floor of the exact sum
        assert f"{exact.numerator}/{exact.denominator}" == it["microcredits_exact"]  # reduced
        key = tuple(it["group"][k] for k in group_key.split(",")) if "," in group_key else it["group"][group_key]
        assert (it["period"], key) not in out, f"{(it['period'], key)} answered twice"
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


async def walk(h: ApiHarness, path: str, headers: dict[str, str], limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged answer, ``limit`` at a time, following the cursors."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        page = await get(h, path, headers, **params, limit=limit, **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= limit
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the cursors never end")


async def usage(
    h: ApiHarness, customer: uuid.UUID, granularity: str, group_by: str, limit: int = 500
) -> list[dict[str, Any]]:
    """The customer's usage over every range of ``RANGES[granularity]``, all pages."""
    headers = h.headers(customers=[str(customer)])
    out = []
    for start, end in RANGES[granularity]:
        q = {"from": ts(start), "to": ts(end), "granularity": granularity, "group_by": group_by}
        out.extend(await walk(h, f"/v1/customers/{customer}/usage", headers, limit, **q))
    return out


async def test_routes_answer_from_what_flowed_through_the_topics(harness: ApiHarness) -> None:
    h = harness
    msgs = await fill(h)
    reader_a = h.headers(customers=[str(A)], sub="reader-a")
    usage_a = f"/v1/customers/{A}/usage"

    # usage by org, by month (America/New_York), October and November
    q = {"from": ts(OCT[0]), "to": ts(NOV_END), "granularity": "month", "group_by": "org"}
    body = await get(h, usage_a, reader_a, **q)
    assert as_answered(body["items"], "org_id") == oracle(A, ny_month, lambda c: c.org_id)
    assert {it["group"]["org_name"] for it in body["items"]} == {"name-of-org-x", "name-of-org-z"}
    assert body["next_cursor"] is None
    by_period = {(it["period"], it["group"]["org_id"]): it for it in body["items"]}
    assert by_period[("2026-10", "org-x")]["period_start"] == "2026-10-01T04:00:00Z"
    assert by_period[("2026-11", "org-x")]["period_end"] == "2026-12-01T05:00:00Z"

    # the other customer's share of the reassigned org
    q = {"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "month", "group_by": "org"}
    body = await get(h, f"/v1/customers/{B}/usage", h.headers(customers=[str(B)]), **q)
    assert as_answered(body["items"], "org_id") == oracle(B, ny_month, lambda c: c.org_id)

    # by day and resource across the month boundary and the end of daylight saving time
    day_q = {
        "from": "2026-10-31T00:00:00-04:00", "to": "2026-11-02T00:00:00-05:00", "granularity": "day",
        "group_by": "resource",
    }
    body = await get(h, usage_a, reader_a, **day_q)
    expected = {
        k: v for k, v in oracle(A, ny_day, lambda c: c.resource_id).items() if k[0] in ("2026-10-31", "2026-11-01")
    }
    assert as_answered(body["items"], "resource_id") == expected
    nov1 = next(it for it in body["items"] if it["period"] == "2026-11-01")
    assert (nov1["period_start"], nov1["period_end"]) == ("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z")  # 25 h
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
    assert await walk(h, usage_a, reader_a, 1, **day_q) == body["items"]

    # by hour and meter; by kind; by space
    hour_q = {"from": ts(H1), "to": ts(H2 + timedelta(hours=1)), "granularity": "hour"}
    body = await get(h, usage_a, reader_a, **hour_q, group_by="meter")
    assert as_answered(body["items"], "meter") == {
        (ts(k[0]), k[1]): v for k, v in oracle(A, lambda t: t, lambda c: c.meter).items() if k[0] in (H1, H2)
    }
    q = {"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "month", "group_by": "kind"}
    body = await get(h, usage_a, reader_a, **q)
    assert as_answered(body["items"], "meter,resource_kind") == only(
        oracle(A, ny_month, lambda c: (c.meter, c.resource_kind)), "2026-10"
    )
    q = {"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "day", "group_by": "space"}
    body = await get(h, usage_a, reader_a, **q)
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
    items = await walk(h, f"/v1/customers/{A}/transactions", reader_a, 2)
    sent = [m for m in msgs["a"] if m.schema_name == "ledger.transaction"]
    newest_first = sorted(sent, key=lambda m: (m.occurred_at, m.id), reverse=True)
    assert [it["id"] for it in items] == [str(m.id) for m in newest_first]
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
    assert st["used_by_kind"] == [
        {"meter": "cfapps", "resource_kind": "", "microcredits": s.used, "price_id": None, "original": None,
         "correction": None}
    ]
    assert (st["version"], st["original_used"], st["correction"], st["reasons"]) == (1, None, None, [])
    assert [v["version"] for v in st["versions"]] == [1]
    none = await h.client.get(f"/v1/customers/{A}/statements/2026-11", headers=reader_a)
    assert none.status_code == 404

    # the customers each caller may see
    admin_list = await get(h, "/v1/customers", h.admin)
    assert {c["customer_id"] for c in admin_list["items"]} == {str(A), str(B)}
    mine = await get(h, "/v1/customers", reader_a)
    assert [c["customer_id"] for c in mine["items"]] == [str(A)]
    paged = await get(h, "/v1/customers", h.admin, limit=1)
    assert len(paged["items"]) == 1 and paged["next_cursor"]


async def test_every_grouping_at_every_granularity_is_the_oracles(harness: ApiHarness) -> None:
    """Usage by org, space, resource, meter and kind, by hour, day and month, of both customers: exactly
    the latest revision of every charge whose org was theirs in its hour (a revision that came while the
    org's customer was not known yet counts once, as itself; the org that changed customer mid-day counts
    for each in its own hours)."""
    h = harness
    await fill(h)
    for customer in (A, B):
        for granularity, period in PERIODS.items():
            for group_by, (fields, of_charge) in GROUPS.items():
                got = as_answered(await usage(h, customer, granularity, group_by), fields)
                assert got == oracle(customer, period, of_charge), (customer, granularity, group_by)


async def test_replaying_every_message_changes_nothing(harness: ApiHarness) -> None:
    h = harness
    msgs = await fill(h)
    reader_a = h.headers(customers=[str(A)])
    q = {"from": ts(OCT[0]), "to": ts(NOV_END), "granularity": "day", "group_by": "resource"}

    async def answers() -> list[Any]:
        return [
            await get(h, f"/v1/customers/{A}/usage", reader_a, **q),
            await get(h, f"/v1/customers/{A}/balance", reader_a, as_of="2026-12-01T00:00:00Z"),
            *[await usage(h, c, g, d) for c in (A, B) for g in PERIODS for d in ("org", "resource", "kind")],
        ]

    before = await answers()
    # everything again, in the other order, and the same batches once more byte for byte
    await h.publish_ledger(ledger_list(msgs))
    await h.publish_charges(batches(LATE + EARLY) + batches(EARLY))
    await h.caught_up()
    assert await answers() == before
    assert await h.sql("SELECT count(*) FROM api.ledger_transaction") == len(ledger_list(msgs)) - 1


async def test_usage_by_resource_per_day_and_month_is_the_sum_of_its_hours(harness: ApiHarness) -> None:
    """The per-resource days and months (documents of their own) add up to the hours (read from the charges
    of each hour): for org-z, which was A's at H1 and B's at H2 of the same day, each customer's day and
    month hold only its own hour."""
    h = harness
    await fill(h)
    for customer in (A, B):
        headers = h.headers(customers=[str(customer)])
        path = f"/v1/customers/{customer}/usage"
        hours: list[dict[str, Any]] = []
        for month_start, month_end in ((OCT[0], OCT[1]), (OCT[1], NOV_END)):  # every hour of both months
            q = {"from": ts(month_start), "to": ts(month_end), "granularity": "hour", "group_by": "resource"}
            hours.extend(await walk(h, path, headers, 500, **q))
        hourly = as_answered(hours, "resource_id")
        assert hourly == oracle(customer, ts, lambda c: c.resource_id)
        for granularity, period in (("day", ny_day), ("month", ny_month)):
            summed: dict[tuple[Any, Any], list[Any]] = defaultdict(lambda: [defaultdict(int), Fraction(0)])
            for (hour, rid), (values, amount) in hourly.items():
                cell = summed[(period(datetime.fromisoformat(hour)), rid)]
                for unit, value in values.items():
                    cell[0][unit] += value
                cell[1] += amount
            q = {"from": ts(OCT[0]), "to": ts(NOV_END), "granularity": granularity, "group_by": "resource"}
            answered = as_answered(await walk(h, path, headers, 500, **q), "resource_id")
            assert answered == {k: (dict(v[0]), v[1]) for k, v in summed.items()}, (customer, granularity)
    # org-z's app-z1: 333 in A's hour, 1/9 in B's, on the same New York day
    day = ny_day(H1)
    assert ny_day(H2) == day and OWNER[("org-z", H1)] == A and OWNER[("org-z", H2)] == B
    for customer, exact in ((A, Fraction(333)), (B, Fraction(1, 9))):
        q = {"from": ts(OCT[0]), "to": ts(OCT[1]), "granularity": "day", "group_by": "resource"}
        items = await walk(h, f"/v1/customers/{customer}/usage", h.headers(customers=[str(customer)]), 500, **q)
        assert as_answered(items, "resource_id")[(day, "app-z1")] == ({"MB": 128}, exact)


async def test_a_charges_batch_with_a_refused_item_keeps_its_good_items_and_dead_letters_the_bad_one(
    harness: ApiHarness,
) -> None:
    h = harness
    hour = H1
    org = "org-dlq"
    good = [charge(hour, f"app-{i}", org=org, value=100 + i, amount=Fraction(1_000 + i, 7)) for i in range(40)]
    same_shard = [c for c in good if c.shard == good[0].shard]
    assert len(same_shard) >= 2, "the batch needs several good items"
    (batch,) = batches(same_shard)
    stranger = next(f"app-x{i}" for i in range(100) if shard_of(f"app-x{i}") != batch.shard)
    # one more item, of a resource that belongs to another shard: appended column by column
    bad = msgspec.structs.replace(
        batch,
        resource_id=[*batch.resource_id, stranger],
        resource_name=[*batch.resource_name, "name-of-stranger"],
        org=[*batch.org, 0],
        space=[*batch.space, 0],
        kind=[*batch.kind, 0],
        value=[*batch.value, 999_999],
        estimated=[*batch.estimated, False],
        revision=[*batch.revision, 1],
        price=[*batch.price, batch.price[0]],
        amount_numerator=[*batch.amount_numerator, 10**12],
        amount_denominator=[*batch.amount_denominator, 7],
    )
    position = len(batch.resource_id)
    await h.publisher.publish(h.settings.topic(CHARGES), [outgoing(bad)])
    await h.publish_ledger([txn(A, "usage", 10, occurred_at=hour, reading_hour=hour, orgs=[org])])
    await h.caught_up()

    items = await usage(h, A, "hour", "resource")
    assert as_answered(items, "resource_id") == oracle(A, ts, lambda c: c.resource_id, {(org, hour): A}, same_shard)
    assert stranger not in {it["group"]["resource_id"] for it in items}
    (dead,) = await h.dead_letters(CHARGES, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["dlq.items"] == str(position)
    assert "shard" in headers["dlq.reason"] and stranger in headers["dlq.reason"]
    assert headers["dlq.topic"] == h.settings.topic(CHARGES)
    refused = read_as_written(dead.value, Charges)
    assert (refused.resource_id, refused.value, refused.shard) == ([stranger], [999_999], batch.shard)


async def test_usage_by_resource_pages_through_every_period_and_resource_exactly_once(harness: ApiHarness) -> None:
    """Three days of hours around the end of October (and of daylight saving time) with resources that come
    and go and an org that is this customer's only some hours, filled through the projector: paging by
    resource with any page size gives every (period, resource) once, as the whole answer has it, and the
    whole answer is the oracle's."""
    h = harness
    customer, other = uuid.UUID(int=0xD1), uuid.UUID(int=0xD2)
    first = datetime(2026, 10, 30, 4, tzinfo=UTC)  # Oct 30, 00:00 in New York
    hours = [first + timedelta(hours=i) for i in range(0, 73, 2)]  # to Nov 1, 23:00 EST
    items: list[ChargeItem] = []
    owner: dict[tuple[str, datetime], uuid.UUID] = {}
    for n, hour in enumerate(hours):
        owner[("org-p", hour)] = customer
        owner[("org-q", hour)] = customer if n % 3 else other
        for r in range(6):
            if (n + r) % 4 == 0:
                continue  # resources come and go
            org = "org-p" if r < 3 else "org-q"
            items.append(charge(hour, f"res-{r}", org=org, value=10 * r + n, amount=Fraction(n + r, 3 + r)))
    ledger = [
        txn(cust, "usage", 1, occurred_at=hour, reading_hour=hour, orgs=[org]) for (org, hour), cust in owner.items()
    ]
    await h.project(batches(items), ledger)

    headers = h.headers(customers=[str(customer)])
    path = f"/v1/customers/{customer}/usage"
    ranges = {
        "hour": (first, datetime(2026, 11, 2, 5, tzinfo=UTC)),
        "day": (first, datetime(2026, 11, 2, 5, tzinfo=UTC)),
        "month": (OCT[0], NOV_END),
    }
    for granularity, (start, end) in ranges.items():
        q = {"from": ts(start), "to": ts(end), "granularity": granularity, "group_by": "resource"}
        whole = await walk(h, path, headers, 500, **q)
        expected = oracle(customer, PERIODS[granularity], lambda c: c.resource_id, owner, items)
        assert as_answered(whole, "resource_id") == expected, granularity
        assert len(whole) == len(expected)
        assert [(it["period_start"], it["group"]["resource_id"]) for it in whole] == sorted(
            (it["period_start"], it["group"]["resource_id"]) for it in whole
        )
        for limit in (1, 4, 7, len(whole) - 1):
            assert await walk(h, path, headers, limit, **q) == whole, (granularity, limit)


async def test_entitlements_grant_and_revoke_what_a_reader_sees(harness: ApiHarness) -> None:
    h = harness
    await fill(h)
    reader = h.headers(sub="carol")  # no customers claim
    r = await h.client.get(f"/v1/customers/{B}/balance", headers=reader)
    assert r.status_code == 404
    entitlement = {"subject": "carol", "customer_id": str(B)}
    grant = await h.client.post("/admin/entitlements", json=entitlement, headers=h.admin)
    assert grant.status_code == 201, grant.text
    assert grant.json()["granted_by"] == "admin-1"
    again = await h.client.post("/admin/entitlements", json=entitlement, headers=h.admin)
    assert again.status_code == 200
    assert (await h.client.get(f"/v1/customers/{B}/balance", headers=reader)).status_code == 200
    listed = await get(h, "/admin/entitlements", h.admin, subject="carol")
    assert [(e["subject"], e["customer_id"]) for e in listed["items"]] == [("carol", str(B))]
    assert [c["customer_id"] for c in (await get(h, "/v1/customers", reader))["items"]] == [str(B)]
    gone = await h.client.delete("/admin/entitlements", params=entitlement, headers=h.admin)
    assert gone.status_code == 204
    assert (await h.client.get(f"/v1/customers/{B}/balance", headers=reader)).status_code == 404
    again = await h.client.delete("/admin/entitlements", params=entitlement, headers=h.admin)
    assert again.status_code == 404
    # A customer the read model does not know: the ledger is asked; here it cannot be reached, so the grant
    # is refused as such (502) and nothing is stored.
    unknown = {"subject": "carol", "customer_id": "0190a000-0000-7000-8000-00000000dead"}
    refused = await h.client.post("/admin/entitlements", json=unknown, headers=h.admin)
    assert refused.status_code == 502 and refused.json()["type"].endswith("/bad-gateway"), refused.text
    assert (await get(h, "/admin/entitlements", h.admin, subject="carol"))["items"] == []


async def test_a_ledger_message_of_unknown_schema_goes_to_the_dlq_and_the_rest_is_applied(harness: ApiHarness) -> None:
    h = harness
    good = txn(A, "funding", 42, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC))
    bad = encode(good).replace(b'"ledger.transaction"', b'"ledger.unknown"')
    topic = h.settings.topic(TRANSACTIONS)
    await h.publisher.publish(topic, [Outgoing(str(A).encode(), bad), Outgoing(str(A).encode(), encode(good))])
    await h.caught_up()
    assert await h.sql("SELECT amount FROM api.ledger_transaction WHERE transaction_id = $1", good.id) == 42
    (record,) = await h.dead_letters(TRANSACTIONS, 1)
    assert b"schema_name" in dict(record.headers)["dlq.reason"]
    assert record.value == bad


def test_the_oracle_itself_covers_the_interesting_cases() -> None:
    """The scenario must exercise what it claims: revisions (one while its org's customer is unknown), an
    unpriced charge re-priced, duplicates, an org that changes customer within a New York day, a day of 25
    hours, and charges on both sides of the New York month boundary."""
    finals = final_charges()
    assert any(c.revision == 2 for c in finals)
    assert len(EARLY + LATE) > len(finals)  # duplicates and replaced revisions
    app_y2 = [c for c in EARLY if c.resource_id == "app-y2"]
    assert sorted(c.revision for c in app_y2) == [1, 2]
    assert oracle(B, ny_month, lambda c: c.resource_id)[("2026-10", "app-y2")] == ({"MB": 48}, Fraction(2, 11))
    assert {ny_month(H3), ny_month(H4)} == {"2026-10", "2026-11"}
    assert (H4.astimezone(NY) + timedelta(days=1)).date() == date(2026, 11, 2)
    assert oracle(A, ny_month, lambda c: c.org_id)[("2026-10", "org-z")][1] == Fraction(333)
    assert oracle(B, ny_month, lambda c: c.org_id)[("2026-10", "org-z")][1] == Fraction(1, 9) + Fraction(7, 5)
    x3 = [c for c in EARLY + LATE if c.resource_id == "app-x3"]
    assert [c.priced for c in x3] == [False, True]
    # several items share a batch (batches are per shard, not per charge), some with orgs of both customers
    early, late = batches(EARLY), batches(LATE)
    assert any(len(b.resource_id) > 1 and {o.id for o in b.orgs} == {"org-x", "org-y"} for b in early)
    assert any(len(b.resource_id) > 1 and {o.id for o in b.orgs} == {"org-x", "org-z"} for b in late)
    assert all(len(set(b.resource_id)) == len(b.resource_id) for b in batches(EARLY + LATE))
    assert encode_charges(batches(EARLY)[0]) == encode_charges(batches(EARLY)[0])  # the same bytes again
