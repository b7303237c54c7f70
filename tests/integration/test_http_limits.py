"""Slow clients cannot hold a service: a service's app (``shared.runtime``: its middleware and exception
handlers) served by uvicorn over a real socket with the options ``shared.server`` gives every service, with
short deadlines. A head that trickles in one byte at a time is answered 408 and disconnected once its
deadline passes, however it trickles; so is a body (a clean 408 problem where the route reads it, a closed
connection where nobody does); the connection cap answers 503 beyond it; an answer that takes longer than
the deadlines is not cut."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import uvicorn
from pydantic import BaseModel
from starlette.responses import Response

from services.pricer.settings import PricerSettings
from shared.edge import Answer, Call, Operation, answer
from shared.runtime import Runtime
from shared.server import BODY_GRACE_SECONDS, MAX_HEAD_BYTES, REQUEST_TIMEOUT, server_options
from tests.sim_server import serve_config

pytestmark = pytest.mark.integration

HEAD_TIMEOUT, BODY_TIMEOUT = 2.0, 2.0
SLACK = 1.0  # the event loop's and the machine's lateness, on a shared 2-core machine


class Echo(BaseModel):
    text: str


class Done(BaseModel):
    done: bool


async def echo(call: Call) -> Response:
    assert isinstance(call.body, Echo)
    return answer(call.body)


async def slow(call: Call) -> Response:
    await asyncio.sleep(HEAD_TIMEOUT + BODY_TIMEOUT + 1)
    return answer(Done(done=True))


OPEN = "a test route"
OPERATIONS = [
    Operation("POST", "/echo", "Echo", {200: Answer(Echo)}, None, OPEN, body=Echo).bind(echo),
    Operation("GET", "/slow", "An answer slower than both deadlines", {200: Answer(Done)}, None, OPEN).bind(slow),
]


@contextlib.asynccontextmanager
async def served(**settings: Any) -> AsyncIterator[int]:
    """A service's app (its runtime's middleware and handlers, no lifespan) on uvicorn as ``serve`` runs
    it; yields the port."""
    s = PricerSettings(
        port=0, http_header_timeout_seconds=HEAD_TIMEOUT, http_body_timeout_seconds=BODY_TIMEOUT, **settings
    )
    app = Runtime("pricer", s).app(OPERATIONS)
    options = server_options(s) | {"lifespan": "off", "log_level": "warning"}
    async with serve_config(uvicorn.Config(app, **options)) as port:
        yield port


async def until_closed(reader: asyncio.StreamReader, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            out += chunk
    return out


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float, stop: asyncio.Event) -> None:
    """Send ``data`` one byte every ``every`` seconds, until it is sent, the server closes, or ``stop``."""
    for i in range(len(data)):
        if stop.is_set() or writer.is_closing():
            return
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every)


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return parse(await until_closed(reader) if b"close" in raw.lower() else await one_response(reader))
    finally:
        writer.close()


async def one_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    return head + await reader.readexactly(length)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


GET = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


async def test_a_head_sent_one_byte_at_a_time_is_cut_off_at_the_head_deadline() -> None:
    async with served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stop = asyncio.Event()
        started = time.monotonic()
        sending = asyncio.create_task(trickle(writer, GET, 0.5, stop))  # would take 19 s
        answer = await until_closed(reader)
        elapsed = time.monotonic() - started
        stop.set()
        await sending
        writer.close()
        status, headers, body = parse(answer)
        assert status == 408 and headers["connection"] == "close"
        assert body == f"the request head was not received within {HEAD_TIMEOUT:g} s".encode()
        assert HEAD_TIMEOUT - 0.1 <= elapsed <= HEAD_TIMEOUT + SLACK

        # A connection that sends nothing at all is cut off the same way.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert parse(await until_closed(reader))[0] == 408
        assert HEAD_TIMEOUT - 0.1 <= time.monotonic() - started <= HEAD_TIMEOUT + SLACK
        writer.close()

        # A kept-alive connection: its next request has its own deadline, from its first byte.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET)
        assert parse(await one_response(reader))[0] == 200
        await asyncio.sleep(1)  # idle, within the keep-alive time
        started = time.monotonic()
        sending = asyncio.create_task(trickle(writer, GET, 0.5, stop := asyncio.Event()))
        assert parse(await until_closed(reader))[0] == 408
        assert HEAD_TIMEOUT - 0.1 <= time.monotonic() - started <= HEAD_TIMEOUT + SLACK
        stop.set()
        await sending
        writer.close()

        # Meanwhile the server answers others, and a head too large is refused at once.
        assert (await request(port, GET))[0] == 200
        big = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\nX-Big: " + b"a" * MAX_HEAD_BYTES
        for ending in (b"\r\n\r\n", b""):  # complete, or still coming: refused either way
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(big + ending)
            status, headers, body = parse(await until_closed(reader, 5))
            writer.close()
            assert status == 431 and body == f"the request head exceeds {MAX_HEAD_BYTES} bytes".encode()


async def test_a_body_sent_one_byte_at_a_time_is_cut_off_at_the_body_deadline() -> None:
    payload = orjson.dumps({"text": "x" * 200})
    head = (
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    async with served() as port:
        # The route reads the body: a 408 problem document, and the connection is closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()
        started = time.monotonic()
        stop = asyncio.Event()
        sending = asyncio.create_task(trickle(writer, payload, 0.25, stop))  # would take 52 s
        answer = await until_closed(reader)
        elapsed = time.monotonic() - started
        stop.set()
        await sending
        writer.close()
        status, headers, body = parse(answer)
        assert status == 408 and headers["content-type"] == "application/problem+json"
        assert headers["connection"] == "close"
        assert orjson.loads(body) == {
            "type": REQUEST_TIMEOUT.uri,
            "title": "Request Timeout",
            "status": 408,
            "detail": f"the request body was not received within {BODY_TIMEOUT:g} s",
        }
        assert BODY_TIMEOUT - 0.1 <= elapsed <= BODY_TIMEOUT + SLACK

        # Nobody reads it (no such route: 404 at once): the connection is closed all the same, a second later.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.replace(b"/echo", b"/nowhere"))
        await writer.drain()
        started = time.monotonic()
        sending = asyncio.create_task(trickle(writer, payload, 0.25, stop := asyncio.Event()))
        answer = await until_closed(reader)
        elapsed = time.monotonic() - started
        stop.set()
        await sending
        writer.close()
        assert parse(answer)[0] == 404
        assert BODY_TIMEOUT + BODY_GRACE_SECONDS - 0.1 <= elapsed <= BODY_TIMEOUT + BODY_GRACE_SECONDS + SLACK

        # A body sent at once is answered; an answer longer than both deadlines is not cut.
        assert (await request(port, head + payload))[0:3:2] == (200, orjson.dumps({"text": "x" * 200}))
        started = time.monotonic()
        status, _, body = await request(port, b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        assert (status, orjson.loads(body)) == (200, {"done": True})
        assert time.monotonic() - started >= HEAD_TIMEOUT + BODY_TIMEOUT


async def test_beyond_the_connection_cap_requests_are_answered_503() -> None:
    async with served(http_max_connections=4) as port:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        assert (await request(port, GET))[0] == 200  # 3 connections with its own
        idle.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.2)  # the server has accepted it
        status, headers, body = await request(port, GET)
        assert (status, body) == (503, b"Service Unavailable") and headers["connection"] == "close"
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.2)
        assert (await request(port, GET))[0] == 200
        # The idle ones did not keep their places: they were cut off at the head deadline anyway.
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(HEAD_TIMEOUT + SLACK)
        assert (await request(port, GET))[0] == 200
        for reader, writer in idle:
            assert parse(await until_closed(reader, 1))[0] == 408
            writer.close()
