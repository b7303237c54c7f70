"""The HTTP server every service runs: uvicorn, with the limits that keep slow or numerous clients from
holding a process.

uvicorn bounds the idle time between two requests of a connection (``timeout_keep_alive``) and, with
``limit_concurrency``, answers 503 once too many connections are open, but nothing bounds the time a
client takes to send a request: its keep-alive timer is only armed after a response and is cancelled by
every byte received, so a client that sends one byte every few seconds holds its connection (and its
place under the cap) for as long as it likes. ASGI middleware cannot help with the head: the app is called
only once the head is complete. So:

- ``guarded_protocol`` is uvicorn's httptools protocol with two deadlines per request: its **head**
  (request line and headers) must be complete within ``header_timeout`` seconds of its first byte (of the
  connection being opened, for the first request), else the client gets ``408`` and is disconnected; its
  **body** must be complete within ``body_timeout`` (+1 s of grace, see below) of the head, else the
  connection is closed (after a ``408`` if no response was started). A head larger than ``MAX_HEAD_BYTES``
  is answered ``431`` and disconnected. Both deadlines are absolute: bytes that trickle in do not move
  them. A response, however long it takes, is not bounded.
- ``BodyDeadline`` (ASGI middleware) enforces the body deadline where the app reads the body, so that the
  client gets a ``408`` problem document (``Connection: close``) and the route stops cleanly; the protocol's
  own body deadline, a second later, is the backstop for bodies that nobody reads (a route that answers
  without reading, or a body still trickling in after the answer).
- ``server_options`` are uvicorn's options from a service's settings (``<SVC>_HTTP_*``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.edge import ProblemError, ProblemType
from shared.settings import ServiceSettings

__all__ = [
    "BODY_GRACE_SECONDS",
    "MAX_HEAD_BYTES",
    "REQUEST_TIMEOUT",
    "BodyDeadline",
    "guarded_protocol",
    "server_options",
]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""The largest request head (request line and headers) accepted; a larger one is answered 431."""

REQUEST_TIMEOUT = ProblemType("request-timeout", 408, "Request Timeout")
"""The problem type of a request whose body did not arrive in time (the same in every service)."""

BODY_GRACE_SECONDS = 1.0
"""How long after the body deadline the protocol closes a connection whose body is still incomplete (the
app's own 408 comes first when it reads the body)."""

CUT_OFF = Counter(
    "billing_http_connections_cut_total",
    "Connections closed because a request's head or body did not arrive in time, or its head was too large",
    ["reason"],
)


def _plain(status: bytes, text: str) -> bytes:
    body = text.encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class _Guarded(HttpToolsProtocol):
    """HttpToolsProtocol with a deadline on each request's head and body, and a cap on the head's size
    (set by ``guarded_protocol``)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_head_bytes: int = MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = True  # bytes received now belong to a request head
        self._head_bytes = 0  # received since the head began (bounds a head that never completes)
        self._head_size = 0  # its request target and headers as parsed (bounds one that comes at once)
        self._too_large = False
        super().connection_made(transport)
        self._arm(self.header_timeout, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        too_large = self._too_large or (self._in_head and self._head_bytes > self.max_head_bytes)
        if too_large and not self.transport.is_closing():
            self._cut(b"431 Request Header Fields Too Large", f"the request head exceeds {self.max_head_bytes} bytes",
                      "head_too_large")

    # Parser callbacks: the head starts, its parts, the head is complete, the body, the message is complete.

    def on_message_begin(self) -> None:
        self._head_size = 0
        if self._deadline is None:  # the next request of a kept-alive connection
            self._arm(self.header_timeout, "head")
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._grew(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grew(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        if self._too_large:
            return  # not handed to the app: answered 431 once the data is parsed
        self._arm(self.body_timeout + BODY_GRACE_SECONDS, "body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._too_large:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True  # what comes next is the head of the next request
        if not self._too_large:
            super().on_message_complete()

    def _grew(self, n: int) -> None:
        self._head_size += n
        if self._head_size > self.max_head_bytes:
            self._too_large = True

    # Deadlines.

    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if phase == "head":
            self._cut(b"408 Request Timeout", f"the request head was not received within {self.header_timeout:g} s",
                      "head_timeout")
        else:
            self._cut(b"408 Request Timeout", f"the request body was not received within {self.body_timeout:g} s",
                      "body_timeout")

    def _cut(self, status: bytes, why: str, reason: str) -> None:
        """Answer ``status`` when no response of this connection is under way, then close it."""
        self._disarm()
        cycle = self.cycle
        idle = cycle is None or cycle.response_complete
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app's answer, if it ever comes, is dropped
            cycle.message_event.set()
            idle = True
        if idle:
            self.transport.write(_plain(status, why))
        self.transport.close()
        CUT_OFF.labels(reason).inc()
        log.info("connection closed: %s", why, extra={"client": self.client, "reason": reason})


def guarded_protocol(header_timeout: float, body_timeout: float, max_head_bytes: int = MAX_HEAD_BYTES) -> type:
    """uvicorn's httptools protocol with these deadlines (a class: uvicorn builds one per connection)."""
    return type(
        "GuardedHttpToolsProtocol",
        (_Guarded,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_head_bytes": max_head_bytes},
    )


class BodyDeadline:
    """Bound the time an app waits for a request body: once ``seconds`` have passed since the request
    reached the app, reading more body raises a 408 problem (the app's exception handlers answer it), and
    that answer carries ``Connection: close`` (the rest of the body is not read)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        complete = False
        timed_out = False

        async def bounded() -> Message:
            nonlocal complete, timed_out
            if complete:
                return await receive()  # after the body: waiting for a disconnect is not bounded here
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise ProblemError(
                    REQUEST_TIMEOUT, f"the request body was not received within {self.seconds:g} s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        async def closing(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, bounded, closing)


def server_options(settings: ServiceSettings) -> dict[str, Any]:
    """uvicorn's options for a service (``uvicorn.run(app, **options)``, ``uvicorn.Config(app, **options)``):
    its host and port, the request deadlines, the keep-alive time and the connection cap of its settings
    (``<SVC>_HTTP_*``)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 30,
        "lifespan": "on",
        "http": guarded_protocol(settings.http_header_timeout_seconds, settings.http_body_timeout_seconds),
        "ws": "none",
        "timeout_keep_alive": settings.http_keep_alive_seconds,
        "limit_concurrency": settings.http_max_connections,
    }
