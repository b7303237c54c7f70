"""Run the Cloud Foundry simulator over real HTTP inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn

from simulator import SimConfig, create_app
from simulator.state import SimState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running_sim(config: SimConfig) -> AsyncIterator[tuple[str, SimState]]:
    """Yields the simulator's base URL and its live state (to change faults mid-test)."""
    port = free_port()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.02)
        else:
            raise RuntimeError("the simulator did not start")
        yield f"http://127.0.0.1:{port}", app.state.sim
    finally:
        server.should_exit = True
        await task
