"""Entrypoints of the pricer, thin: the subscribers of the readings topics and the internal price routes
(declared in schemas.py, bound here) call ``service.Pricer``, which owns the transactions (see there).

Subscribers: ``usage.readings.v2`` (batches) and ``usage.readings.v1`` (single measurements, still
accepted from producers that have not moved), both in group ``pricer``; ``ledger.assignments.v1`` (the
ledger's org assignments, for tier and customer prices) in group ``pricer-assignments``; output
``usage.charges.v3``, keyed ``shard-<n>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from starlette.responses import Response

from services.pricer import completeness, schemas
from services.pricer.pricing import (
    PriceEndOffMonthError,
    PriceEndRefusedError,
    PriceNotFoundError,
    PriceOverlapError,
    RerateNotFoundError,
)
from services.pricer.schemas import (
    PriceCreatedOut,
    PriceEndIn,
    PriceIn,
    PriceList,
    PriceOut,
    PricePath,
    PricesQuery,
    RerateIn,
    RerateList,
    RerateOut,
    ReratePath,
    ReratesQuery,
    UnpricedList,
    UnpricedQuery,
)
from services.pricer.service import CatalogBusyError, Pricer
from services.pricer.settings import PricerSettings
from shared.audit import list_audit
from shared.batches import SHARDS, decode_measurements
from shared.contracts import ChargeComputed, ChargesComputed, MeasurementsTaken, MeasurementTaken, OrgAssigned
from shared.edge import (
    CONFLICT,
    INVALID_BODY,
    INVALID_CURSOR,
    NOT_FOUND,
    UNAVAILABLE,
    Call,
    Cursor,
    Operation,
    ProblemError,
    answer,
)
from shared.kafka import Received, model_decoder
from shared.runtime import Runtime
from shared.topics import ASSIGNMENTS, CHARGES, READINGS, READINGS_V1, dlq
from shared.wire import decoder_for

__all__ = ["OPERATIONS", "declare", "start", "stop"]

log = logging.getLogger(__name__)


def _pricer(call: Call) -> Pricer:
    pricer: Pricer = call.request.app.state.runtime.state["pricer"]
    return pricer


def _problem_for(
    exc: PriceNotFoundError | PriceOverlapError | PriceEndRefusedError | PriceEndOffMonthError | CatalogBusyError,
) -> ProblemError:
    if isinstance(exc, PriceEndOffMonthError):
        return ProblemError(INVALID_BODY, str(exc), title="Price cannot end then")
    if isinstance(exc, PriceNotFoundError):
        return ProblemError(NOT_FOUND, str(exc))
    if isinstance(exc, PriceOverlapError):
        return ProblemError(CONFLICT, str(exc), title="Price overlaps", conflicts=[str(c) for c in exc.conflicts])
    if isinstance(exc, PriceEndRefusedError):
        return ProblemError(CONFLICT, str(exc), title="Price cannot end then")
    return ProblemError(UNAVAILABLE, str(exc))


async def post_price(call: Call) -> Response:
    try:
        price, created, repriced = await _pricer(call).add_price(call.body_as(PriceIn))
    except (PriceOverlapError, CatalogBusyError) as exc:
        raise _problem_for(exc) from None
    out = PriceCreatedOut(**PriceOut.of(price).model_dump(), repriced_charges=repriced)
    return answer(out, 201 if created else 200, headers={"Location": f"/internal/prices/{price.id}"})


async def post_price_end(call: Call) -> Response:
    try:
        price = await _pricer(call).end_price(call.path_as(PricePath).price_id, call.body_as(PriceEndIn).at)
    except (PriceNotFoundError, PriceEndRefusedError, PriceEndOffMonthError, CatalogBusyError) as exc:
        raise _problem_for(exc) from None
    return answer(PriceOut.of(price))


async def get_price(call: Call) -> Response:
    try:
        price = await _pricer(call).get_price(call.path_as(PricePath).price_id)
    except PriceNotFoundError as exc:
        raise _problem_for(exc) from None
    return answer(PriceOut.of(price))


async def list_prices(call: Call) -> Response:
    q = call.query_as(PricesQuery)
    # The empty kind is a kind: the filter applies whenever the parameter is present.
    prices = await _pricer(call).list_prices(q.meter, q.resource_kind, q.at, q.limit)
    return answer(PriceList(items=[PriceOut.of(p) for p in prices]))


async def list_unpriced(call: Call) -> Response:
    q = call.query_as(UnpricedQuery)
    scope = Cursor.scope_of("unpriced")
    pos = Cursor.decode(q.cursor, scope, (datetime, str, int, str, str))  # hour, meter, shard, kind, resource
    if pos is not None and not 0 <= pos[2] < SHARDS:
        raise ProblemError(INVALID_CURSOR, "cursor: not a cursor of this query; start again without it")
    page = await _pricer(call).unpriced(tuple(pos) if pos else None, q.limit)
    cursor = Cursor.encode(scope, page.next_cursor) if page.next_cursor is not None else None
    items = [ChargeComputed.model_validate(doc) for doc in page.items]
    return answer(UnpricedList(items=items, next_cursor=cursor))


async def post_rerate(call: Call) -> Response:
    try:
        job = await _pricer(call).start_rerate(call.body_as(RerateIn))
    except PriceOverlapError as exc:
        raise ProblemError(
            CONFLICT, str(exc), title="Correction overlaps", conflicts=[str(c) for c in exc.conflicts]
        ) from None
    except CatalogBusyError as exc:
        raise _problem_for(exc) from None
    return answer(RerateOut.of(job), 202, headers={"Location": f"/internal/rerates/{job.id}"})


async def get_rerate(call: Call) -> Response:
    try:
        job = await _pricer(call).get_rerate(call.path_as(ReratePath).rerate_id)
    except RerateNotFoundError as exc:
        raise ProblemError(NOT_FOUND, str(exc)) from None
    return answer(RerateOut.of(job))


async def list_rerates(call: Call) -> Response:
    q = call.query_as(ReratesQuery)
    scope = Cursor.scope_of("rerates")
    pos = Cursor.decode(q.cursor, scope, (str,))
    before = None
    if pos is not None:
        try:
            before = UUID(pos[0])
        except ValueError:
            raise ProblemError(INVALID_CURSOR, "cursor: not a cursor of this query; start again without it") from None
    jobs = await _pricer(call).list_rerates(before, q.limit + 1)
    more = len(jobs) > q.limit
    jobs = jobs[: q.limit]
    cursor = Cursor.encode(scope, [str(jobs[-1].id)]) if more else None
    return answer(RerateList(items=[RerateOut.of(j) for j in jobs], next_cursor=cursor))


OPERATIONS: tuple[Operation, ...] = (
    schemas.ADD_PRICE.bind(post_price),
    schemas.LIST_PRICES.bind(list_prices),
    schemas.GET_PRICE.bind(get_price),
    schemas.END_PRICE.bind(post_price_end),
    schemas.UNPRICED.bind(list_unpriced),
    schemas.START_RERATE.bind(post_rerate),
    schemas.LIST_RERATES.bind(list_rerates),
    schemas.GET_RERATE.bind(get_rerate),
    schemas.COMPLETENESS.bind(completeness.handler),
    schemas.AUDIT.bind(list_audit),
)


# -- lifecycle ------------------------------------------------------------------------------------


def declare(runtime: Runtime) -> None:
    """The pricer's topics: what it consumes (handled by the Pricer that ``start`` builds) and publishes."""

    def pricer() -> Pricer:
        p: Pricer = runtime.state["pricer"]
        return p

    async def readings(batch: list[Received[Any]]) -> Any:
        return await pricer().handle_readings(batch)

    async def readings_v1(batch: list[Received[Any]]) -> Any:
        return await pricer().handle_readings_v1(batch)

    def v2(raw: bytes) -> tuple[Any, list[Any]]:
        decoded = decode_measurements(raw)
        return decoded.message, decoded.rejected

    runtime.consume(
        READINGS, MeasurementsTaken, v2, readings,
        description="Readings in batches (one reading hour, meter and shard each), priced into usage.charges.v3.",
    )
    runtime.consume(
        READINGS_V1, MeasurementTaken, model_decoder(decoder_for(MeasurementTaken), MeasurementTaken), readings_v1,
        description="Single measurements from producers that have not moved to v2: regrouped by shard and priced "
        "like the batches (the same measurement counts once, on either topic).",
    )
    async def assignments(batch: list[Received[Any]]) -> Any:
        return await pricer().handle_assignments(batch)

    runtime.consume(
        ASSIGNMENTS, OrgAssigned, model_decoder(decoder_for(OrgAssigned), OrgAssigned), assignments,
        group_id="pricer-assignments",
        description="The ledger's org assignments (org, from when, customer, tier), kept in the pricer's own table: "
        "an item is priced with its org's customer price, else its tier's, else the global one; an assignment "
        "that changes the price of charges already priced re-prices them (revision n+1 on usage.charges.v3).",
    )
    runtime.publishes(
        CHARGES, ChargesComputed,
        "Charges in batches (one reading hour, meter and shard each), keyed shard-<n>: exact amounts for flat "
        "prices, units and bands for graduated and volume ones (amount 0/1, priced by the ledger on the month's "
        "total); a re-priced measurement comes again with a higher revision.",
    )
    for topic in (READINGS, READINGS_V1, ASSIGNMENTS):
        runtime.publishes(dlq(topic), None, f"What the pricer could not process from {topic}, with the reason in "
                          "the dlq.reason header (refused items of a batch as a batch of their own).")


async def start(runtime: Runtime) -> None:
    """Build the pricer, publish what a crash left unpublished, re-price what a price added before a crash
    covers, then start the maintenance loop (the subscribers start after this returns)."""
    s = runtime.settings
    assert isinstance(s, PricerSettings)
    pricer = Pricer(
        runtime.pool,
        runtime.publisher,
        s.topic(CHARGES),
        reprice_chunk=s.reprice_chunk,
        lock_timeout_ms=s.catalog_lock_timeout_ms,
        horizon=timedelta(seconds=s.reading_hour_horizon_seconds),
    )
    runtime.state["pricer"] = pricer
    await pricer.flush_outbox()
    repriced = await pricer.sweep_if_catalog_changed()
    if repriced:
        log.info("re-priced charges covered by the catalog at start", extra={"repriced": repriced})
    await pricer.refresh_unpriced_gauge()
    runtime.state["maintenance"] = asyncio.create_task(
        _maintenance(pricer, s.maintenance_interval_seconds), name="pricer-maintenance"
    )
    # Re-rating jobs (corrections) run here, one at a time; an unfinished one continues where it stopped.
    runtime.state["rerates"] = asyncio.create_task(
        pricer.run_rerates(s.maintenance_interval_seconds), name="pricer-rerates"
    )


async def stop(runtime: Runtime) -> None:
    """After the subscribers stopped (the runtime stops them first): end the maintenance loop and the
    re-rating runner (a job stopped midway continues at the next start)."""
    for name in ("rerates", "maintenance"):
        task: asyncio.Task[None] | None = runtime.state.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _maintenance(pricer: Pricer, interval: float) -> None:
    """Publish batches another instance left unpublished (crash), re-price what a price added elsewhere
    covers if its instance did not, and refresh the unpriced gauge."""
    while True:
        await asyncio.sleep(interval)
        try:
            await pricer.flush_outbox()
            await pricer.sweep_if_catalog_changed()
            await pricer.refresh_unpriced_gauge()
        except Exception:  # keep the loop alive: the next round retries
            log.exception("pricer maintenance failed")
