"""Serve ASGI apps (the Cloud Foundry simulator among them) over real HTTP inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from simulator import SimConfig, create_app
from simulator.state import SimState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a random local port (no lifespan); yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def running_sim(config: SimConfig) -> AsyncIterator[tuple[str, SimState]]:
    """Yields the simulator's base URL and its live state (to change faults mid-test)."""
    app = create_app(config)
    async with serve_app(app) as url:
        yield url, app.state.sim
