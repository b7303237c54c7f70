"""Readiness follows each service's policy: a check the policy does not require is reported and never
takes the service out of its load balancer; the api's /readyz says how fresh its read model is."""

from __future__ import annotations

from services.api.freshness import HEADER, Freshness
from shared.health import ReadinessPolicy, run_checks


async def ok() -> None:
    return None


async def broker_away() -> None:
    raise ConnectionRefusedError("kafka")


CHECKS = {"database": ok, "kafka": broker_away, "consumers": ok}


async def test_by_default_every_check_is_required():
    ready, body = await run_checks(CHECKS, ReadinessPolicy())
    assert not ready
    assert body == {
        "status": "not ready",
        "checks": {"database": "ok", "kafka": "failed: ConnectionRefusedError", "consumers": "ok"},
    }


async def test_a_check_the_policy_does_not_require_is_reported_only():
    ready, body = await run_checks(CHECKS, ReadinessPolicy(required=frozenset({"database", "consumers"})))
    assert ready
    assert body["status"] == "ready"
    assert body["checks"]["kafka"] == "failed: ConnectionRefusedError"
    assert body["not_required"] == ["kafka"]
    ready, _ = await run_checks({**CHECKS, "database": broker_away}, ReadinessPolicy(frozenset({"database"})))
    assert not ready


async def test_starting_is_always_required_and_no_check_at_all_is_not_ready():
    ready, _ = await run_checks({"starting": broker_away}, ReadinessPolicy(required=frozenset({"database"})))
    assert not ready
    ready, _ = await run_checks({}, ReadinessPolicy())
    assert not ready


async def test_a_hanging_check_fails_within_the_timeout():
    import asyncio

    async def hangs() -> None:
        await asyncio.sleep(60)

    ready, body = await run_checks({"database": hangs}, ReadinessPolicy(), timeout=0.05)
    assert not ready and body["checks"]["database"] == "failed: TimeoutError"


async def test_the_read_models_freshness_is_in_the_body_and_the_header():
    now = [1_000_000.0]
    fresh = Freshness(clock=lambda: now[0])
    assert fresh.header() == {}
    assert fresh.details()["read_model"]["age_seconds"] is None
    fresh.applied("charges")
    now[0] += 5
    fresh.applied("transactions")
    now[0] += 7.5
    assert fresh.header() == {HEADER: "7"}
    details = fresh.details()["read_model"]
    assert details["age_seconds"] == 7.5
    assert details["consumers"]["charges"]["age_seconds"] == 12.5
    assert details["last_batch_at"] == "1970-01-12T13:46:45Z"
    _, body = await run_checks({"database": ok}, ReadinessPolicy(details=fresh.details))
    assert body["read_model"] == details
