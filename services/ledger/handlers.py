"""Routes and subscribers of the ledger: thin; the logic lives in service.py."""

from __future__ import annotations

from starlette.routing import BaseRoute

from shared.runtime import Runtime


def routes() -> list[BaseRoute]:
    return []


async def start(runtime: Runtime) -> None:
    """Register the consumers and build the service objects once the pool and producer exist."""
