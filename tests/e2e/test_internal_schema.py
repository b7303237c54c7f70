"""schemathesis against the internal routes of the collector, the pricer and the ledger, each run as its
own process on a real database and broker, from the ``/openapi.json`` it serves (generated from the route
declarations), with an admin's token: no 5xx, no response that breaks the documented schema or status
codes, every error as problem+json; and a request body over the service's limit is refused with 413
(problem+json) on every POST route, whether it declares its length or streams it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.stack import Stack

pytestmark = pytest.mark.e2e

INTERNAL = ("collector", "pricer", "ledger")
DEFAULT_MAX_BODY = 1_000_000  # <SVC>_MAX_BODY_BYTES as the services run by default
# Examples per operation; raise it for a deeper search (INTERNAL_SCHEMA_EXAMPLES=500).
EXAMPLES = int(os.environ.get("INTERNAL_SCHEMA_EXAMPLES", "60"))


def fuzz(url: str, examples: int, headers: dict[str, str]) -> tuple[list[str], dict[str, int]]:
    import schemathesis
    from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(
                headers=headers,
                checks=[not_a_server_error, response_schema_conformance, status_code_conformance],
                timeout=60,
            )
            key = f"{case.method} {case.operation.path}"
            calls[key] = calls.get(key, 0) + 1
            if response.status_code >= 400:
                ctype = response.headers.get("content-type", [""])[0]
                assert ctype.startswith("application/problem+json"), (
                    f"{case.method} {case.formatted_path}: {response.status_code} with {ctype!r}, not problem+json"
                )

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every operation's failures, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
    return failures, calls


async def _chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"x" * n
        sent += n


async def oversized(url: str, doc: dict[str, Any], headers: dict[str, str]) -> list[str]:
    """POST a body one byte over the limit to every POST route, with Content-Length and streamed
    (chunked, no length); the answer must be 413 problem+json. Routes that do not read their body can
    only refuse by the declared length, so the streamed form is sent to those that take a body."""
    wrong: list[str] = []
    sample = {"customer_id": "0190b000-0000-7000-8000-000000000001", "price_id": "0190b000-0000-7000-8000-000000000002",
              "transaction_id": "0190b000-0000-7000-8000-000000000003", "month": "2026-10"}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        for path, ops in doc["paths"].items():
            if "post" not in ops:
                continue
            target = path.format(**sample)
            forms: list[tuple[str, Any]] = [("with Content-Length", b"x" * (DEFAULT_MAX_BODY + 1))]
            if "requestBody" in ops["post"]:
                forms.append(("streamed", _chunks(DEFAULT_MAX_BODY + 1)))
            for how, content in forms:
                try:
                    resp = await client.post(target, content=content, headers={"content-type": "application/json"})
                except httpx.TransportError as exc:
                    wrong.append(f"POST {target} ({how}): {exc!r}")
                    continue
                ctype = resp.headers.get("content-type", "")
                if resp.status_code != 413 or not ctype.startswith("application/problem+json"):
                    wrong.append(f"POST {target} ({how}): {resp.status_code} {ctype} {resp.text[:200]}")
            # One byte under the limit is not refused for its size (whatever else is wrong with it).
            resp = await client.post(
                target, content=b"x" * (DEFAULT_MAX_BODY - 1), headers={"content-type": "application/json"}
            )
            if resp.status_code == 413:
                wrong.append(f"POST {target}: a body under the limit got 413")
    return wrong


async def seed(stack: Stack) -> None:
    """Data for the fuzzed routes to find: a customer with an agreement and an org, a price, a reading."""
    async with httpx.AsyncClient(timeout=60, headers=stack.admin_headers("seed")) as c:
        ledger, pricer = stack.url("ledger"), stack.url("pricer")
        tier = {"name": "seed", "credits_per_period": 10**12}
        (await c.post(f"{ledger}/internal/tiers", json=tier)).raise_for_status()
        customer = (await c.post(f"{ledger}/internal/customers", json={"name": "Seed", "tier": "seed"})).json()["id"]
        for path, body in (
            (
                "/internal/agreements",
                {"customer_id": customer, "starts_at": "2026-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"},
            ),
            (
                "/internal/org-assignments",
                {"org_id": "seed-org", "customer_id": customer, "starts_at": "2026-01-01T05:00:00Z"},
            ),
        ):
            (await c.post(ledger + path, json=body)).raise_for_status()
        (await c.post(f"{pricer}/internal/prices", json={
            "meter": "cfapps", "resource_kind": "", "unit_of_measure": "MB-hour", "microcredits_per_unit": 1_000_000,
            "unit": 747_520, "valid_from": "2026-01-01T00:00:00Z"})).raise_for_status()
        reading = await c.post(stack.url("collector") + "/internal/readings", json={})
        assert reading.status_code == 201 and reading.json()["errors"] == [], reading.text


async def test_schemathesis_finds_no_server_error_on_the_internal_routes_and_big_bodies_get_413(
    infra, database, topic_prefix, tmp_path, monkeypatch
):
    small = ["--orgs", "2", "--apps", "40", "--services", "10"]
    stack = Stack(database.dsn, topic_prefix, tmp_path / "logs", sim_args=small)
    try:
        await stack.start("sim")
        # The collector reads the simulator (its readings are real ones), not whatever listens on 8090.
        monkeypatch.setenv("COLLECTOR_CF_API_URL", stack.url("sim"))
        monkeypatch.setenv("COLLECTOR_UAA_URL", stack.url("sim"))
        monkeypatch.setenv("COLLECTOR_RETRY_ATTEMPTS", "1")
        await stack.start(*INTERNAL)
        await seed(stack)
        results: dict[str, tuple[list[str], dict[str, int]]] = {}
        too_big: dict[str, list[str]] = {}
        docs: dict[str, dict[str, Any]] = {}
        async with httpx.AsyncClient() as client:
            for name in INTERNAL:
                resp = await client.get(stack.url(name) + "/openapi.json")
                assert resp.status_code == 200 and resp.headers["content-type"] == "application/json", resp.text[:300]
                docs[name] = resp.json()
        admin = stack.admin_headers("schemathesis")
        for name in INTERNAL:
            results[name] = await asyncio.to_thread(fuzz, stack.url(name), EXAMPLES, admin)
            too_big[name] = await oversized(stack.url(name), docs[name], admin)
    finally:
        stack.stop()
    failures = [f"{name}: {f}" for name, (fs, _) in results.items() for f in fs]
    assert failures == [], "\n\n".join(failures)
    assert {n: w for n, w in too_big.items() if w} == {}
    for name, (_, calls) in results.items():
        internal = {k for k in calls if " /internal/" in k}
        paths = docs[name]["paths"]
        documented = {f"{m.upper()} {p}" for p, ops in paths.items() if p.startswith("/internal/") for m in ops}
        # Every documented internal operation was exercised, most of them many times.
        assert internal == documented, (name, sorted(documented - internal))
        assert sum(calls[k] for k in internal) >= 10 * len(internal), (name, calls)
