"""``billing webhook-receiver``: a small HTTP server that receives the api's webhook deliveries, verifies each
signature and timestamp (``shared.webhooks.verify``, the same code the api signs with) and prints the event
ids it accepts, for demos and tests. A bad or missing signature, or a timestamp more than 5 minutes away, is
answered 400 and not counted; an accepted delivery 204."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import typer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.clock import utcnow
from shared.webhooks import ID_HEADER, SignatureError, verify

__all__ = ["Received", "receiver_app", "register"]

MAX_BODY = 1_000_000


class Received:
    """What a receiver accepted (event dicts, in order) and how many requests it refused."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.delivery_ids: list[str] = []
        self.refused = 0


def _refuse(detail: str) -> Response:
    return JSONResponse(
        {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail},
        status_code=400,
        media_type="application/problem+json",
    )


def receiver_app(
    secret: str,
    received: Received | None = None,
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Starlette:
    """The receiver's app: POST to any path. ``clock`` decides which timestamps are recent (a test moves it)."""
    seen = received if received is not None else Received()

    async def receive(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            seen.refused += 1
            return _refuse("body too large")
        try:
            verify(secret, request.headers, body, clock())
            event = json.loads(body)
            if not isinstance(event, dict) or not isinstance(event.get("id"), str):
                raise SignatureError("the body is not an event")  # signed, but not ours to count
        except (SignatureError, ValueError) as exc:
            seen.refused += 1
            return _refuse(str(exc))
        seen.events.append(event)
        seen.delivery_ids.append(request.headers.get(ID_HEADER, ""))
        if on_event is not None:
            on_event(event)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/{path:path}", receive, methods=["POST"])])
    app.state.received = seen
    return app


def register(app: typer.Typer) -> None:
    @app.command("webhook-receiver")
    def webhook_receiver(
        secret: Annotated[str, typer.Option(envvar="BILLING_WEBHOOK_SECRET", help="The subscription's secret.")],
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8099,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    ) -> None:
        """Receive webhook deliveries: verify each signature, print each accepted event id (400 otherwise)."""
        import uvicorn

        def show(event: dict[str, Any]) -> None:
            typer.echo(f"{event.get('type', '?')} {event['id']} customer={event.get('customer_id', '?')}")

        uvicorn.run(receiver_app(secret, on_event=show), host=host, port=port, log_level="warning")
