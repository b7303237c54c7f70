"""schemathesis against the api's own ``/openapi.json``, with an admin token, every service running as its
own process: no 5xx, no response that breaks the documented schema, and every error as problem+json."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from simulator.oidc import mint_token
from tests.conftest import Database, Infra
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def fuzz(api_url: str, token: str, examples: int) -> tuple[list[str], dict[str, int]]:
    import schemathesis
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    failures: list[str] = []
    calls: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {token}"}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance])
            key = f"{case.method} {operation.path}"  # noqa: B023 - check() runs in this iteration
            calls[key] = calls.get(key, 0) + 1
            if response.status_code >= 400:
                assert response.headers.get("content-type", [""])[0].startswith("application/problem+json"), (
                    f"{case.method} {case.formatted_path}: {response.status_code} without problem+json"
                )

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
    return failures, calls


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    infra: Infra, database: Database, topic_prefix: str, tmp_path: Path
) -> None:
    stack = Stack(database.dsn, topic_prefix, tmp_path / "logs")
    try:
        await stack.start("sim", "collector", "pricer", "ledger", "api")
        token = mint_token(["usage.admin", "usage.read"], issuer=stack.url("sim"), subject="schemathesis")
        failures, calls = await asyncio.to_thread(fuzz, stack.url("api"), token, 30)
    finally:
        stack.stop()
    assert failures == [], "\n\n".join(failures)
    # Every documented operation was exercised, most of them many times.
    assert len(calls) >= 20, calls
    assert sum(calls.values()) >= 10 * len(calls), calls
