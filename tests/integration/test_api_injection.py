"""SQL injection attempts in every path and query parameter of the api: each is answered 4xx, and the
read model is byte for byte what it was (every table's content hashed before and after; the audit trail,
which records every command request, refused ones too, is checked on its own)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from tests.support.api_harness import ApiHarness, harness  # noqa: F401  (fixture)
from tests.support.api_read_model import A, fill

pytestmark = pytest.mark.integration

PAYLOADS = [
    "' OR '1'='1",
    "1; DROP TABLE api.charge_shard; --",
    "'; DELETE FROM api.ledger_transaction; --",
    f"{A}' OR 1=1 --",
    f"{A}; TRUNCATE api.usage_month",
    "2026-10' UNION SELECT subject FROM api.entitlement --",
    '") OR ("a"="a',
    "1) OR pg_sleep(5)--",
    "$1",
    "%27%20OR%201%3D1",
    "org_id",
    "org, (SELECT 1)",
    "\x00",
    "A" * 5000,
]

OK_TIME = "2026-10-01T04:00:00Z"
USAGE = {"from": OK_TIME, "to": "2026-11-01T04:00:00Z", "granularity": "month", "group_by": "org"}

# (method, path template with {p} where the payload goes, query) — the payload in one place at a time.
PATH_TARGETS = [
    ("GET", "/v1/customers/{p}/balance", {}),
    ("GET", "/v1/customers/{p}/usage", USAGE),
    ("GET", "/v1/customers/{p}/transactions", {}),
    ("GET", "/v1/customers/{p}/statements/2026-10", {}),
    ("GET", f"/v1/customers/{A}/statements/{{p}}", {}),
    ("GET", "/admin/customers/{p}", {}),
    ("POST", "/admin/months/{p}/close", {}),
    ("POST", "/admin/transactions/{p}/reverse", {}),
    ("POST", "/admin/prices/{p}/end", {}),
]
QUERY_TARGETS: list[tuple[str, str, dict[str, str], list[str]]] = [
    ("GET", f"/v1/customers/{A}/balance", {}, ["as_of"]),
    ("GET", f"/v1/customers/{A}/usage", USAGE, ["from", "to", "granularity", "group_by", "limit", "cursor"]),
    ("GET", f"/v1/customers/{A}/transactions", {}, ["limit", "cursor", "type", "from", "to"]),
    ("GET", "/v1/customers", {}, ["limit", "cursor"]),
    ("GET", "/admin/entitlements", {}, ["subject", "customer_id", "limit", "cursor"]),
    ("DELETE", "/admin/entitlements", {"subject": "carol", "customer_id": str(A)}, ["subject", "customer_id"]),
    ("GET", "/admin/customers", {}, ["limit", "cursor", "customer_id", "org_id", "meter", "resource_kind", "at"]),
    ("GET", "/admin/unpriced", {}, ["limit", "cursor", "meter"]),
    ("POST", "/admin/readings", {}, ["at", "org_id"]),
]


async def snapshot(h: ApiHarness) -> dict[str, str]:
    tables = await h.sql(
        "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables"
        " WHERE table_schema = 'api'"
    )
    out = {"_tables": tables}
    for t in tables.split(","):
        if t == "audit_log":  # appended to by every command request, refused or not
            continue
        out[t] = await h.sql(f"SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM api.{t} x")
    return out


async def test_injection_in_every_parameter_is_4xx_and_changes_nothing(harness: ApiHarness) -> None:
    h = harness
    await fill(h)
    await h.client.post("/admin/entitlements", json={"subject": "carol", "customer_id": str(A)}, headers=h.admin)
    before = await snapshot(h)
    usage_before = (await h.client.get(f"/v1/customers/{A}/usage", params=USAGE, headers=h.admin)).json()
    for headers in (h.admin, h.headers(customers=[str(A)])):
        for payload in PAYLOADS:
            for method, template, query in PATH_TARGETS:
                if template.startswith("/admin") and headers is not h.admin:
                    continue
                path = template.replace("{p}", quote(payload, safe=""))
                r = await h.client.request(method, path, params=query, headers=headers)
                assert 400 <= r.status_code < 500, (method, template, payload[:40], r.status_code, r.text[:200])
            for method, path, base, names in QUERY_TARGETS:
                if path.startswith("/admin") and headers is not h.admin:
                    continue
                for name in names:
                    r = await h.client.request(method, path, params={**base, name: payload}, headers=headers)
                    assert 400 <= r.status_code < 500, (method, path, name, payload[:40], r.status_code, r.text[:200])
    assert await snapshot(h) == before
    assert (await h.client.get(f"/v1/customers/{A}/usage", params=USAGE, headers=h.admin)).json() == usage_before


async def test_hostile_text_in_a_token_and_a_body_is_only_ever_data(harness: ApiHarness) -> None:
    h = harness
    await fill(h)
    before = await snapshot(h)
    hostile = h.headers(customers=[str(A)], sub="x'); DROP TABLE api.entitlement; --")
    r = await h.client.get("/v1/customers", headers=hostile)
    assert r.status_code == 200 and [c["customer_id"] for c in r.json()["items"]] == [str(A)]
    r = await h.client.get(f"/v1/customers/{A}/balance", headers=hostile)
    assert r.status_code == 200
    bad_body: Any
    for bad_body in (
        {"subject": "x'); DROP TABLE api.entitlement; --", "customer_id": str(A)},
        {"subject": "carol", "customer_id": "' OR 1=1 --"},
        {"subject": "carol", "customer_id": str(A), "granted_by": "me"},
    ):
        r = await h.client.post("/admin/entitlements", json=bad_body, headers=h.admin)
        assert r.status_code == 422, r.text
    assert await snapshot(h) == before
    # Each refused command is recorded, its hostile text kept as data.
    recorded = await h.sql(
        "SELECT string_agg(status::text || ' ' || (body->>'subject'), '|' ORDER BY id) FROM api.audit_log"
    )
    assert recorded == "422 x'); DROP TABLE api.entitlement; --|422 carol|422 carol"
