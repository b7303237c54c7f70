"""Readiness: which of a service's checks decide whether it takes traffic, and what else ``/readyz`` says.

A readiness probe takes a pod out of its Service while it fails, so it must fail only for what the
service's traffic needs. The api answers reads from its read model: with Kafka away it can still answer
(a little staler), so Kafka is reported there but does not fail it, and ``/readyz`` says how fresh the read
model is instead. The consumer services need their database, the broker and their consumers running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ReadinessPolicy", "ReadyCheck", "run_checks"]

ReadyCheck = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ReadinessPolicy:
    """``required``: the checks that must pass (None: all of them); any other is reported only.
    ``details``: extra fields for the ``/readyz`` body (e.g. the read model's freshness)."""

    required: frozenset[str] | None = None
    details: Callable[[], Mapping[str, Any]] | None = field(default=None, compare=False)

    def needs(self, check: str) -> bool:
        return check == "starting" or self.required is None or check in self.required


async def run_checks(
    checks: Mapping[str, ReadyCheck], policy: ReadinessPolicy, timeout: float = 3.0
) -> tuple[bool, dict[str, Any]]:
    """Run every check (at once, each within ``timeout``); (ready, the ``/readyz`` body)."""

    async def one(check: ReadyCheck) -> str:
        try:
            await asyncio.wait_for(check(), timeout=timeout)
            return "ok"
        except Exception as exc:  # noqa: BLE001 - a readiness probe reports, it never raises
            return f"failed: {type(exc).__name__}"

    names = list(checks)
    results = dict(zip(names, await asyncio.gather(*(one(checks[n]) for n in names)), strict=True))
    gating = [n for n in names if policy.needs(n)]
    ready = bool(gating) and all(results[n] == "ok" for n in gating)
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": results}
    ignored = sorted(n for n in names if not policy.needs(n))
    if ignored:
        body["not_required"] = ignored
    if policy.details is not None:
        body.update(policy.details())
    return ready, body
