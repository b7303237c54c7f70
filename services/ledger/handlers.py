"""Routes and subscribers of the ledger: thin; the logic lives in service.py and posting.py.

Internal HTTP commands (JSON; errors are application/problem+json):
  POST /internal/tiers                               {name, credits_per_period}
  GET  /internal/tiers                               ?limit=&cursor=
  POST /internal/customers                           {name, tier}
  GET  /internal/customers                           ?limit=&cursor=
  GET  /internal/customers/{id}
  GET  /internal/customers/{id}/balance              ?as_of=
  GET  /internal/customers/{id}/statements/{YYYY-MM}
  POST /internal/org-assignments                     {org_id, customer_id, starts_at}
  GET  /internal/org-assignments                     ?org_id=&customer_id=&limit=&cursor=
  POST /internal/agreements                          {customer_id, starts_at, ends_at, credits?}
  GET  /internal/agreements                          ?customer_id=&limit=&cursor=
  POST /internal/months/{YYYY-MM}/close
  POST /internal/transactions/{id}/reverse           {reason?}
  POST /internal/expire-agreements
  GET  /internal/held                                ?limit=&cursor=
  GET  /internal/completeness                        ?from=&to=  (services/ledger/completeness.py)
  GET  /internal/audit                               ?actor=&kind=&from=&to=&limit=&cursor=

Every POST is a command (shared/commands.py): audited, and idempotent under an Idempotency-Key header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.ledger import completeness
from services.ledger.outbox import Outbox
from services.ledger.schemas import AgreementIn, AssignmentIn, CustomerIn, ReverseIn, TierIn
from services.ledger.service import LedgerError, LedgerService
from services.ledger.settings import LedgerSettings
from shared.audit import audit_route
from shared.batches import SHARDS, Charges, decode_charges
from shared.clock import as_utc, parse_month
from shared.commands import command
from shared.contracts import AlertRaised, ChargesComputed, TransactionPosted
from shared.http import ORJSONResponse, ProblemError, read_json
from shared.kafka import Received
from shared.runtime import Runtime
from shared.topics import ALERTS, CHARGES, TRANSACTIONS, dlq

__all__ = ["charges_handler", "declare", "routes", "start", "stop"]

log = logging.getLogger(__name__)

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000

Endpoint = Callable[[Request], Awaitable[Response]]


# ---------------------------------------------------------------- consumer


def charges_handler(
    ledger: LedgerService, outbox: Outbox
) -> Callable[[list[Received[Charges]]], Awaitable[list[tuple[Received[Charges], str]]]]:
    """The usage.charges.v2 batch handler: post the batches in one transaction, publish the committed
    transactions and alerts (refused items never reach it: the decoder splits them off to the DLQ)."""

    async def handle(batch: list[Received[Charges]]) -> list[tuple[Received[Charges], str]]:
        posting = await ledger.post_charges([r.message for r in batch])
        await outbox.flush(posting.outbox_ids)
        return []

    return handle


def declare(runtime: Runtime) -> None:
    """The ledger's topics: the charges it consumes (handled by what ``start`` builds) and what it publishes."""

    async def charges(batch: list[Received[Any]]) -> Any:
        return await runtime.state["charges_handler"](batch)

    def decode(raw: bytes) -> tuple[Any, list[Any]]:
        decoded = decode_charges(raw)
        return decoded.message, decoded.rejected

    runtime.consume(
        CHARGES, ChargesComputed, decode, charges,
        description="Charges in batches, posted continuously to each customer's credit pool (per customer and "
        "reading hour), exactly: floor of the exact sum per customer, month and price.",
    )
    runtime.publishes(
        TRANSACTIONS, TransactionPosted,
        "Every committed ledger transaction (TransactionPosted) and month statement (StatementIssued, told apart "
        "by schema_name), keyed by customer id.",
    )
    runtime.publishes(ALERTS, AlertRaised, "A customer's used share of funded credits crossed 50/75/90/100 %.")
    runtime.publishes(dlq(CHARGES), None, "Charges the ledger could not process, with the reason in dlq.reason.")


# ---------------------------------------------------------------- lifecycle


async def start(runtime: Runtime) -> None:
    """Build the service objects, publish what a previous run left in the outbox and start the periodic task
    (expiry, month close, held charges, outbox sweep); the subscriber starts after this returns."""
    settings = runtime.settings
    assert isinstance(settings, LedgerSettings)
    ledger = LedgerService(runtime.pool, settings)
    outbox = Outbox(runtime.pool, runtime.publisher, settings)
    runtime.state["ledger"] = ledger
    runtime.state["outbox"] = outbox
    runtime.state["charges_handler"] = charges_handler(ledger, outbox)
    await outbox.sweep(0)
    if settings.periodic_interval_seconds > 0:
        runtime.state["periodic"] = asyncio.create_task(_periodic(ledger, outbox, settings), name="ledger-periodic")


async def stop(runtime: Runtime) -> None:
    task = runtime.state.pop("periodic", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _periodic(ledger: LedgerService, outbox: Outbox, settings: LedgerSettings) -> None:
    while True:
        await asyncio.sleep(settings.periodic_interval_seconds)
        try:
            await outbox.flush(await ledger.run_periodic())
            await outbox.sweep(settings.outbox_sweep_after_seconds)
        except Exception:  # the task keeps its schedule; the next run retries
            log.exception("periodic ledger task failed")


# ---------------------------------------------------------------- helpers


def _services(request: Request) -> tuple[LedgerService, Outbox]:
    state = request.app.state.runtime.state
    return state["ledger"], state["outbox"]


def _path_uuid(request: Request, name: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError:
        raise ProblemError(404, f"{what} not found", f"{request.path_params[name]!r} is not a known id") from None


def _query_uuid(request: Request, name: str) -> uuid.UUID | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ProblemError(422, "Invalid query", f"{name} must be a UUID") from None


def _month(text: str) -> date:
    try:
        return parse_month(text)
    except ValueError as exc:
        raise ProblemError(422, "Invalid month", str(exc)) from None


def _limit(request: Request) -> int:
    text = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ProblemError(422, "Invalid query", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


def _encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def _decode_cursor(request: Request) -> Any:
    text = request.query_params.get("cursor")
    if not text:
        return None
    try:
        return orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise ProblemError(422, "Invalid cursor", "pass back the next_cursor of a previous page") from None


def _page(items: Sequence[dict[str, Any]], limit: int, cursor_of: Callable[[dict[str, Any]], Any]) -> Response:
    nxt = _encode_cursor(cursor_of(items[-1])) if len(items) == limit else None
    return ORJSONResponse({"items": list(items), "next_cursor": nxt})


def _guard(endpoint: Endpoint) -> Endpoint:
    """Answer the service's named refusals as problem documents."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except LedgerError as exc:
            raise ProblemError(exc.status, exc.title, exc.detail) from None

    wrapped.__name__ = endpoint.__name__
    return wrapped


# ---------------------------------------------------------------- routes


async def create_tier(request: Request) -> Response:
    body: TierIn = await read_json(request, TierIn)
    ledger, _ = _services(request)
    result = await ledger.create_tier(body.name, body.credits_per_period)
    return ORJSONResponse(result.body, status_code=201)


async def list_tiers(request: Request) -> Response:
    ledger, _ = _services(request)
    limit, after = _limit(request), _decode_cursor(request)
    if after is not None and not isinstance(after, str):
        raise ProblemError(422, "Invalid cursor", "pass back the next_cursor of a previous page")
    return _page(await ledger.list_tiers(after, limit), limit, lambda t: t["name"])


async def create_customer(request: Request) -> Response:
    body: CustomerIn = await read_json(request, CustomerIn)
    ledger, _ = _services(request)
    result = await ledger.create_customer(body.name, body.tier)
    return ORJSONResponse(result.body, status_code=201)


def _cursor_uuid(request: Request) -> uuid.UUID | None:
    after = _decode_cursor(request)
    if after is None:
        return None
    try:
        return uuid.UUID(str(after))
    except ValueError:
        raise ProblemError(422, "Invalid cursor", "pass back the next_cursor of a previous page") from None


async def list_customers(request: Request) -> Response:
    ledger, _ = _services(request)
    limit = _limit(request)
    return _page(await ledger.list_customers(_cursor_uuid(request), limit), limit, lambda c: str(c["id"]))


async def get_customer(request: Request) -> Response:
    ledger, _ = _services(request)
    return ORJSONResponse(await ledger.get_customer(_path_uuid(request, "customer_id", "Customer")))


async def balance(request: Request) -> Response:
    ledger, _ = _services(request)
    customer_id = _path_uuid(request, "customer_id", "Customer")
    as_of = None
    text = request.query_params.get("as_of")
    if text:
        try:
            as_of = datetime.fromisoformat(text.replace(" ", "+"))
        except ValueError:
            raise ProblemError(422, "Invalid query", "as_of must be an ISO-8601 time with a zone") from None
        if as_of.tzinfo is None:
            raise ProblemError(422, "Invalid query", "as_of must carry a time zone (e.g. Z)")
    return ORJSONResponse(await ledger.balance(customer_id, as_of))


async def statement(request: Request) -> Response:
    ledger, _ = _services(request)
    customer_id = _path_uuid(request, "customer_id", "Customer")
    return ORJSONResponse(await ledger.statement(customer_id, _month(request.path_params["month"])))


async def assign_org(request: Request) -> Response:
    body: AssignmentIn = await read_json(request, AssignmentIn)
    ledger, outbox = _services(request)
    result = await ledger.assign_org(body.org_id, body.customer_id, body.starts_at)
    await outbox.flush(result.outbox_ids)
    return ORJSONResponse(result.body, status_code=201)


async def list_assignments(request: Request) -> Response:
    ledger, _ = _services(request)
    limit, after = _limit(request), _decode_cursor(request)
    cursor: tuple[str, datetime] | None = None
    if after is not None:
        try:
            cursor = (str(after[0]), datetime.fromisoformat(after[1]))
        except (TypeError, IndexError, KeyError, ValueError):
            raise ProblemError(422, "Invalid cursor", "pass back the next_cursor of a previous page") from None
    items = await ledger.list_assignments(
        request.query_params.get("org_id"), _query_uuid(request, "customer_id"), cursor, limit
    )
    return _page(items, limit, lambda a: [a["org_id"], a["starts_at"].isoformat()])


async def create_agreement(request: Request) -> Response:
    body: AgreementIn = await read_json(request, AgreementIn)
    ledger, outbox = _services(request)
    result = await ledger.create_agreement(body.customer_id, body.starts_at, body.ends_at, body.credits)
    await outbox.flush(result.outbox_ids)
    return ORJSONResponse(result.body, status_code=201)


async def list_agreements(request: Request) -> Response:
    ledger, _ = _services(request)
    limit = _limit(request)
    items = await ledger.list_agreements(_query_uuid(request, "customer_id"), _cursor_uuid(request), limit)
    return _page(items, limit, lambda a: str(a["id"]))


async def close_month(request: Request) -> Response:
    ledger, outbox = _services(request)
    result = await ledger.close_month(_month(request.path_params["month"]))
    await outbox.flush(result.outbox_ids)
    return ORJSONResponse(
        {
            "month": result.month.isoformat()[:7],  # YYYY-MM, zero-padded below year 1000 too
            "closed_at": result.closed_at,
            "statements": result.statements,
            "already_closed": result.already_closed,
        },
        status_code=200 if result.already_closed else 201,
    )


async def reverse(request: Request) -> Response:
    transaction_id = _path_uuid(request, "transaction_id", "Transaction")
    reason = ""
    if await request.body():
        reason = (await read_json(request, ReverseIn)).reason
    ledger, outbox = _services(request)
    result = await ledger.reverse(transaction_id, reason)
    await outbox.flush(result.outbox_ids)
    return ORJSONResponse(result.body, status_code=201 if result.created else 200)


async def expire_agreements(request: Request) -> Response:
    ledger, outbox = _services(request)
    count, ids = await ledger.expire_due()
    await outbox.flush(ids)
    return ORJSONResponse({"expired": count})


async def held(request: Request) -> Response:
    ledger, _ = _services(request)
    limit = _limit(request)
    after = _decode_cursor(request)
    cursor: tuple[datetime, str, int, str, str] | None = None
    if after is not None:
        try:
            hour, meter, shard, org_id, resource = after
            if not (isinstance(meter, str) and isinstance(org_id, str) and isinstance(resource, str)
                    and type(shard) is int and 0 <= shard < SHARDS):
                raise ValueError("not a cursor")
            cursor = (as_utc(datetime.fromisoformat(hour)), meter, shard, org_id, resource)
        except (TypeError, ValueError):
            raise ProblemError(422, "Invalid cursor", "pass back the next_cursor of a previous page") from None
    page = await ledger.list_held(cursor, limit)
    nxt = None
    if page.next_cursor is not None:
        h, m, sh, o, r = page.next_cursor
        nxt = _encode_cursor([h.isoformat(), m, sh, o, r])
    return ORJSONResponse({"items": page.items, "next_cursor": nxt})


# The commands (shared/commands.py): audited, idempotent under an Idempotency-Key; the value is their kind.
COMMANDS: dict[Endpoint, str] = {
    create_tier: "ledger.tier.create",
    create_customer: "ledger.customer.create",
    assign_org: "ledger.org_assignment.create",
    create_agreement: "ledger.agreement.create",
    close_month: "ledger.month.close",
    reverse: "ledger.transaction.reverse",
    expire_agreements: "ledger.agreements.expire",
}


def _endpoint(fn: Endpoint) -> Endpoint:
    kind = COMMANDS.get(fn)
    return command(kind)(_guard(fn)) if kind else _guard(fn)


def routes() -> list[BaseRoute]:
    table: list[tuple[str, Endpoint, str]] = [
        ("/internal/tiers", create_tier, "POST"),
        ("/internal/tiers", list_tiers, "GET"),
        ("/internal/customers", create_customer, "POST"),
        ("/internal/customers", list_customers, "GET"),
        ("/internal/customers/{customer_id}", get_customer, "GET"),
        ("/internal/customers/{customer_id}/balance", balance, "GET"),
        ("/internal/customers/{customer_id}/statements/{month}", statement, "GET"),
        ("/internal/org-assignments", assign_org, "POST"),
        ("/internal/org-assignments", list_assignments, "GET"),
        ("/internal/agreements", create_agreement, "POST"),
        ("/internal/agreements", list_agreements, "GET"),
        ("/internal/months/{month}/close", close_month, "POST"),
        ("/internal/transactions/{transaction_id}/reverse", reverse, "POST"),
        ("/internal/expire-agreements", expire_agreements, "POST"),
        ("/internal/held", held, "GET"),
    ]
    return [Route(path, _endpoint(fn), methods=[method], name=f"{fn.__name__}") for path, fn, method in table] + [
        Route("/internal/completeness", completeness.completeness, methods=["GET"]),
        audit_route(),
    ]
