"""Routes and subscribers of the ledger: thin; the logic lives in service.py and posting.py.

The internal HTTP routes are declared in schemas.py (what each takes and answers, with the scope its
caller's token needs); here each is bound to its handler: parse (done by the edge), call the service,
publish what it committed, answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from starlette.responses import Response

from services.ledger import completeness, schemas
from services.ledger.outbox import Outbox
from services.ledger.schemas import (
    AgreementCreatedOut,
    AgreementIn,
    AgreementOut,
    AgreementsQuery,
    AmendOut,
    AssignmentCreatedOut,
    AssignmentIn,
    AssignmentOut,
    AssignmentsQuery,
    BalanceOut,
    BalanceQuery,
    CustomerIn,
    CustomerOut,
    CustomerPath,
    ExpiredOut,
    HeldChargeOut,
    MonthClosedOut,
    MonthPath,
    PageQuery,
    ReverseIn,
    StatementOut,
    StatementPath,
    StatementQuery,
    TierIn,
    TierOut,
    TransactionOut,
    TransactionPath,
)
from services.ledger.service import LedgerError, LedgerService
from services.ledger.settings import LedgerSettings
from shared.audit import list_audit
from shared.batches import SHARDS, BatchRejected, Charges, decode_charges, encode_charges, subset
from shared.contracts import AlertRaised, ChargesComputed, ChargesComputedV2, OrgAssigned, TransactionPosted
from shared.edge import (
    CONFLICT,
    INVALID_BODY,
    INVALID_CURSOR,
    NOT_FOUND,
    Call,
    Cursor,
    Handler,
    Operation,
    Page,
    ProblemError,
    Reply,
    answer,
    by_status,
)
from shared.kafka import Received
from shared.runtime import Runtime
from shared.topics import ALERTS, ASSIGNMENTS, CHARGES, CHARGES_V2, TRANSACTIONS, dlq

__all__ = ["OPERATIONS", "charges_handler", "declare", "start", "stop"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- consumer


def charges_handler(
    ledger: LedgerService, outbox: Outbox
) -> Callable[[list[Received[Charges]]], Awaitable[list[tuple[Received[Charges], BatchRejected]]]]:
    """The usage.charges.v3 (and v2) batch handler: post the batches in one transaction, publish the committed
    transactions and alerts while the next batch is posted (invalid items never reach it: the decoder
    splits them off to the DLQ; the offsets are committed once the transaction is: the outbox holds what
    is not published yet). Items
    of the revision applied (or held) with other content change nothing and are dead-lettered alone; a
    batch naming a price with another model than the one known for it (or one that cannot exist) changes
    nothing and is dead-lettered whole."""

    async def handle(batch: list[Received[Charges]]) -> list[tuple[Received[Charges], BatchRejected]]:
        posting = await ledger.post_charges([r.message for r in batch])
        await outbox.flush_behind(posting.outbox_ids)
        return [
            *((batch[n], BatchRejected(why, (), encode_charges(batch[n].message))) for n, why in posting.refused),
            *(
                (batch[n], BatchRejected(why, (i,), encode_charges(subset(batch[n].message, [i]))))
                for n, i, why in posting.conflicts
            ),
        ]

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
        "reading hour), exactly: floor of f(exact total) per customer, month and price (f: the price's flat, "
        "graduated or volume function).",
    )
    # Read until its retention has passed: the same handler and group, so a charge seen on both topics counts
    # once (the shards' state deduplicates by measurement and revision, whatever the topic).
    runtime.consume(
        CHARGES_V2, ChargesComputedV2, decode, charges,
        description="Charges of flat prices published before usage.charges.v3, posted like v3's.",
    )
    runtime.publishes(
        TRANSACTIONS, TransactionPosted,
        "Every committed ledger transaction (TransactionPosted) and month statement (StatementIssued, told apart "
        "by schema_name), keyed by customer id.",
    )
    runtime.publishes(ALERTS, AlertRaised, "A customer's used share of funded credits crossed 50/75/90/100 %.")
    runtime.publishes(
        ASSIGNMENTS, OrgAssigned,
        "Every org assignment the ledger committed (org, from when, customer and its tier), keyed by org id and kept "
        "forever: the pricer resolves tier and customer prices with them.",
    )
    for topic in (CHARGES, CHARGES_V2):
        runtime.publishes(dlq(topic), None, "Charges the ledger could not process, with the reason in dlq.reason.")


# ---------------------------------------------------------------- lifecycle


async def start(runtime: Runtime) -> None:
    """Build the service objects, publish what a previous run left in the outbox and start the periodic task
    (expiry, month close, held charges, outbox sweep); the subscriber starts after this returns."""
    settings = runtime.settings
    assert isinstance(settings, LedgerSettings)
    ledger = LedgerService(runtime.pool, settings)
    outbox = Outbox(runtime.pool, runtime.publisher, settings)  # type: ignore[arg-type]  # a Stream publishes too
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
    outbox = runtime.state.get("outbox")
    if outbox is not None:
        await outbox.drain()  # the last batch's messages (the consumer has stopped)


async def _periodic(ledger: LedgerService, outbox: Outbox, settings: LedgerSettings) -> None:
    while True:
        await asyncio.sleep(settings.periodic_interval_seconds)
        try:
            await outbox.flush(await ledger.run_periodic())
            await outbox.sweep(settings.outbox_sweep_after_seconds)
        except Exception:  # the task keeps its schedule; the next run retries
            log.exception("periodic ledger task failed")


# ---------------------------------------------------------------- helpers


def _services(call: Call) -> tuple[LedgerService, Outbox]:
    state = call.request.app.state.runtime.state
    return state["ledger"], state["outbox"]


def _refused(exc: LedgerError) -> ProblemError:
    kind = {404: NOT_FOUND, 409: CONFLICT, 422: INVALID_BODY}.get(exc.status) or by_status(exc.status)
    return ProblemError(kind, exc.detail, title=exc.title)


def _guard(handler: Handler) -> Handler:
    """Answer the service's named refusals as problem documents."""

    async def guarded(call: Call) -> Response:
        try:
            return await handler(call)
        except LedgerError as exc:
            raise _refused(exc) from None

    guarded.__name__ = handler.__name__
    return guarded


def _page(items: Sequence[Any], limit: int, model: type[Reply], scope: str, position: Callable[[Any], Any]) -> Response:
    """A page of ``items`` (each made ``model``), with a cursor after the last when the page is full."""
    nxt = Cursor.encode(scope, position(items[-1])) if len(items) == limit and items else None
    return answer(Page[model](items=[model.model_validate(i) for i in items], next_cursor=nxt))  # type: ignore[valid-type]


# ---------------------------------------------------------------- routes


async def create_tier(call: Call) -> Response:
    body = call.body_as(TierIn)
    ledger, _ = _services(call)
    result = await ledger.create_tier(body.name, body.credits_per_period)
    return answer(TierOut.model_validate(result.body), 201)


async def list_tiers(call: Call) -> Response:
    q = call.query_as(PageQuery)
    scope = Cursor.scope_of("tiers")
    pos = Cursor.decode(q.cursor, scope, (str,))
    ledger, _ = _services(call)
    items = await ledger.list_tiers(pos[0] if pos else None, q.limit)
    return _page(items, q.limit, TierOut, scope, lambda t: [t["name"]])


async def create_customer(call: Call) -> Response:
    body = call.body_as(CustomerIn)
    ledger, _ = _services(call)
    result = await ledger.create_customer(body.name, body.tier)
    return answer(CustomerOut.model_validate(result.body), 201)


async def list_customers(call: Call) -> Response:
    q = call.query_as(PageQuery)
    scope = Cursor.scope_of("customers")
    pos = Cursor.decode(q.cursor, scope, (uuid.UUID,))
    ledger, _ = _services(call)
    items = await ledger.list_customers(pos[0] if pos else None, q.limit)
    return _page(items, q.limit, CustomerOut, scope, lambda c: [c["id"]])


async def get_customer(call: Call) -> Response:
    ledger, _ = _services(call)
    return answer(CustomerOut.model_validate(await ledger.get_customer(call.path_as(CustomerPath).customer_id)))


async def balance(call: Call) -> Response:
    ledger, _ = _services(call)
    customer_id = call.path_as(CustomerPath).customer_id
    return answer(BalanceOut.model_validate(await ledger.balance(customer_id, call.query_as(BalanceQuery).as_of)))


async def statement(call: Call) -> Response:
    ledger, _ = _services(call)
    path = call.path_as(StatementPath)
    version = call.query_as(StatementQuery).version
    return answer(StatementOut.model_validate(await ledger.statement(path.customer_id, path.month, version)))


async def amend_statements(call: Call) -> Response:
    ledger, outbox = _services(call)
    issued, ids = await ledger.amend_statements(quiet_seconds=0)  # the operator asks now: no quiet period
    await outbox.flush(ids)
    return answer(AmendOut.model_validate({"issued": issued}))


async def assign_org(call: Call) -> Response:
    body = call.body_as(AssignmentIn)
    ledger, outbox = _services(call)
    result = await ledger.assign_org(body.org_id, body.customer_id, body.starts_at)
    await outbox.flush(result.outbox_ids)
    return answer(AssignmentCreatedOut.model_validate(result.body), 201)


async def list_assignments(call: Call) -> Response:
    q = call.query_as(AssignmentsQuery)
    scope = Cursor.scope_of("assignments", q.org_id, q.customer_id)
    pos = Cursor.decode(q.cursor, scope, (str, datetime))
    ledger, _ = _services(call)
    after = (pos[0], pos[1]) if pos else None
    items = await ledger.list_assignments(q.org_id, q.customer_id, after, q.limit)
    return _page(items, q.limit, AssignmentOut, scope, lambda a: [a["org_id"], a["starts_at"]])


async def create_agreement(call: Call) -> Response:
    body = call.body_as(AgreementIn)
    ledger, outbox = _services(call)
    result = await ledger.create_agreement(body.customer_id, body.starts_at, body.ends_at, body.credits)
    await outbox.flush(result.outbox_ids)
    return answer(AgreementCreatedOut.model_validate(result.body), 201)


async def list_agreements(call: Call) -> Response:
    q = call.query_as(AgreementsQuery)
    scope = Cursor.scope_of("agreements", q.customer_id)
    pos = Cursor.decode(q.cursor, scope, (uuid.UUID,))
    ledger, _ = _services(call)
    items = await ledger.list_agreements(q.customer_id, pos[0] if pos else None, q.limit)
    return _page(items, q.limit, AgreementOut, scope, lambda a: [a["id"]])


async def close_month(call: Call) -> Response:
    ledger, outbox = _services(call)
    result = await ledger.close_month(call.path_as(MonthPath).month)
    await outbox.flush(result.outbox_ids)
    out = MonthClosedOut(
        month=result.month.isoformat()[:7],  # YYYY-MM
        closed_at=result.closed_at,
        statements=result.statements,
        already_closed=result.already_closed,
    )
    return answer(out, 200 if result.already_closed else 201)


async def reverse(call: Call) -> Response:
    transaction_id = call.path_as(TransactionPath).transaction_id
    body = call.optional_body(ReverseIn)
    ledger, outbox = _services(call)
    result = await ledger.reverse(transaction_id, body.reason if body else "")
    await outbox.flush(result.outbox_ids)
    return answer(TransactionOut.model_validate(result.body), 201 if result.created else 200)


async def expire_agreements(call: Call) -> Response:
    ledger, outbox = _services(call)
    count, ids = await ledger.expire_due()
    await outbox.flush(ids)
    return answer(ExpiredOut(expired=count))


async def held(call: Call) -> Response:
    q = call.query_as(PageQuery)
    scope = Cursor.scope_of("held")
    pos = Cursor.decode(q.cursor, scope, (datetime, str, int, str, str))
    if pos is not None and not 0 <= pos[2] < SHARDS:
        raise ProblemError(INVALID_CURSOR, "cursor: not a cursor of this query; start again without it")
    ledger, _ = _services(call)
    page = await ledger.list_held(tuple(pos) if pos else None, q.limit)
    nxt = Cursor.encode(scope, page.next_cursor) if page.next_cursor is not None else None
    return answer(Page[HeldChargeOut](items=[HeldChargeOut.model_validate(i) for i in page.items], next_cursor=nxt))


OPERATIONS: tuple[Operation, ...] = (
    schemas.CREATE_TIER.bind(_guard(create_tier)),
    schemas.LIST_TIERS.bind(_guard(list_tiers)),
    schemas.CREATE_CUSTOMER.bind(_guard(create_customer)),
    schemas.LIST_CUSTOMERS.bind(_guard(list_customers)),
    schemas.GET_CUSTOMER.bind(_guard(get_customer)),
    schemas.BALANCE.bind(_guard(balance)),
    schemas.STATEMENT.bind(_guard(statement)),
    schemas.ASSIGN_ORG.bind(_guard(assign_org)),
    schemas.LIST_ASSIGNMENTS.bind(_guard(list_assignments)),
    schemas.CREATE_AGREEMENT.bind(_guard(create_agreement)),
    schemas.LIST_AGREEMENTS.bind(_guard(list_agreements)),
    schemas.CLOSE_MONTH.bind(_guard(close_month)),
    schemas.AMEND.bind(_guard(amend_statements)),
    schemas.REVERSE.bind(_guard(reverse)),
    schemas.EXPIRE.bind(_guard(expire_agreements)),
    schemas.HELD.bind(_guard(held)),
    schemas.COMPLETENESS.bind(completeness.handler),
    schemas.AUDIT.bind(list_audit),
)
