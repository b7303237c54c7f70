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
async def serve_config(config: uvicorn.Config) -> AsyncIterator[int]:
    """Serve with uvicorn as ``config`` says, inside this event loop, until the block ends; yields the port
    it listens on (``port=0``: a free one)."""
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
            await asyncio.sleep(0.01)
        port: int = server.servers[0].sockets[0].getsockname()[1]
        yield port
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serve_app(app: Any, port: int = 0) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on ``port`` (0: a free one; no lifespan); yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none")
    async with serve_config(config) as bound:
        yield f"http://127.0.0.1:{bound}"


@contextlib.asynccontextmanager
async def running_sim(config: SimConfig) -> AsyncIterator[tuple[str, SimState]]:
    """Yields the simulator's base URL and its live state (to change faults mid-test)."""
    app = create_app(config)
    async with serve_app(app) as url:
        yield url, app.state.sim
