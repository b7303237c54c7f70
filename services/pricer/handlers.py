"""Entrypoints of the pricer, thin: the subscribers of the readings topics and the internal price routes
call ``service.Pricer``, which owns the transactions (see there).

Subscribers: ``usage.readings.v2`` (batches) and ``usage.readings.v1`` (single measurements, still
accepted from producers that have not moved), both in group ``pricer``; output ``usage.charges.v2``,
keyed ``shard-<n>``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.pricer import completeness
from services.pricer.pricing import PriceEndRefusedError, PriceNotFoundError, PriceOverlapError
from services.pricer.schemas import PriceCreatedOut, PriceEndIn, PriceIn, PriceList, PriceOut, UnpricedList
from services.pricer.service import CatalogBusyError, Pricer
from services.pricer.settings import PricerSettings
from shared.audit import audit_route
from shared.batches import SHARDS, decode_measurements
from shared.clock import as_utc
from shared.commands import command
from shared.contracts import ChargesComputed, MeasurementsTaken, MeasurementTaken
from shared.http import ORJSONResponse, ProblemError, read_json
from shared.kafka import Received, model_decoder
from shared.runtime import Runtime
from shared.topics import CHARGES, READINGS, READINGS_V1, dlq
from shared.wire import decoder_for

__all__ = ["declare", "routes", "start", "stop"]

log = logging.getLogger(__name__)


def _pricer(request: Request) -> Pricer:
    pricer: Pricer = request.app.state.runtime.state["pricer"]
    return pricer


def _invalid(name: str, why: str) -> ProblemError:
    return ProblemError(422, "Invalid query parameter", f"{name}: {why}")


def _time_param(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        # A '+' of an offset sent unencoded arrives as a space.
        value = datetime.fromisoformat(raw.strip().replace(" ", "+"))
    except ValueError:
        raise _invalid(name, "not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise _invalid(name, "give a time zone (e.g. Z)")
    return value


def _limit_param(request: Request, default: int, maximum: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= maximum:
        raise _invalid("limit", f"an integer from 1 to {maximum}")
    return int(raw)


Cursor = tuple[datetime, str, int, str, str]  # reading hour, meter, shard, kind, resource id


def _encode_cursor(position: Cursor) -> str:
    hour, meter, shard, kind, resource = position
    return base64.urlsafe_b64encode(orjson.dumps([hour.isoformat(), meter, shard, kind, resource])).decode().rstrip("=")


def _decode_cursor(raw: str | None) -> Cursor | None:
    if not raw:
        return None
    try:
        value = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not (isinstance(value, list) and len(value) == 5):
            raise ValueError("not a cursor")
        hour_text, meter, shard, kind, resource = value
        if not (isinstance(hour_text, str) and isinstance(meter, str) and isinstance(kind, str)
                and isinstance(resource, str) and isinstance(shard, int) and not isinstance(shard, bool)
                and 0 <= shard < SHARDS):
            raise ValueError("not a cursor")
        hour = as_utc(datetime.fromisoformat(hour_text))
        return hour, meter, shard, kind, resource
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise _invalid("cursor", "not a cursor this endpoint returned") from None


def _problem_for(exc: PriceNotFoundError | PriceOverlapError | PriceEndRefusedError | CatalogBusyError) -> ProblemError:
    if isinstance(exc, PriceNotFoundError):
        return ProblemError(404, "Not Found", str(exc))
    if isinstance(exc, PriceOverlapError):
        return ProblemError(409, "Price overlaps", str(exc), conflicts=[str(c) for c in exc.conflicts])
    if isinstance(exc, PriceEndRefusedError):
        return ProblemError(409, "Price cannot end then", str(exc))
    return ProblemError(503, "Service Unavailable", str(exc))


async def post_price(request: Request) -> Response:
    body: PriceIn = await read_json(request, PriceIn)
    try:
        price, created, repriced = await _pricer(request).add_price(body)
    except (PriceOverlapError, CatalogBusyError) as exc:
        raise _problem_for(exc) from None
    out = PriceCreatedOut(**PriceOut.of(price).model_dump(), repriced_charges=repriced)
    headers = {"Location": f"/internal/prices/{price.id}"}
    return ORJSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200, headers=headers)


async def post_price_end(request: Request) -> Response:
    body: PriceEndIn = await read_json(request, PriceEndIn)
    try:
        price = await _pricer(request).end_price(request.path_params["price_id"], body.at)
    except (PriceNotFoundError, PriceEndRefusedError, CatalogBusyError) as exc:
        raise _problem_for(exc) from None
    return ORJSONResponse(PriceOut.of(price).model_dump(mode="json"))


async def get_price(request: Request) -> Response:
    try:
        price = await _pricer(request).get_price(request.path_params["price_id"])
    except PriceNotFoundError as exc:
        raise _problem_for(exc) from None
    return ORJSONResponse(PriceOut.of(price).model_dump(mode="json"))


async def list_prices(request: Request) -> Response:
    q = request.query_params
    meter = q.get("meter") or None
    # The empty kind is a kind: the filter applies whenever the parameter is present.
    resource_kind = q.get("resource_kind")
    prices = await _pricer(request).list_prices(meter, resource_kind, _time_param(request, "at"), _limit_param(request, 1000, 10_000))
    return ORJSONResponse(PriceList(items=[PriceOut.of(p) for p in prices]).model_dump(mode="json"))


async def list_unpriced(request: Request) -> Response:
    limit = _limit_param(request, 100, 1000)
    after = _decode_cursor(request.query_params.get("cursor"))
    page = await _pricer(request).unpriced(after, limit)
    cursor = _encode_cursor(page.next_cursor) if page.next_cursor is not None else None
    return ORJSONResponse(UnpricedList(items=page.items, next_cursor=cursor).model_dump(mode="json"))


def routes() -> list[BaseRoute]:
    return [
        # Commands (shared/commands.py): audited, idempotent under an Idempotency-Key.
        Route("/internal/prices", command("pricer.price.add")(post_price), methods=["POST"]),
        Route("/internal/prices", list_prices, methods=["GET"]),
        Route("/internal/prices/{price_id:uuid}", get_price, methods=["GET"]),
        Route("/internal/prices/{price_id:uuid}/end", command("pricer.price.end")(post_price_end), methods=["POST"]),
        Route("/internal/charges/unpriced", list_unpriced, methods=["GET"]),
        Route("/internal/completeness", completeness.completeness, methods=["GET"]),
        audit_route(),
    ]


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
        description="Readings in batches (one reading hour, meter and shard each), priced into usage.charges.v2.",
    )
    runtime.consume(
        READINGS_V1, MeasurementTaken, model_decoder(decoder_for(MeasurementTaken), MeasurementTaken), readings_v1,
        description="Single measurements from producers that have not moved to v2: regrouped by shard and priced "
        "like the batches (the same measurement counts once, on either topic).",
    )
    runtime.publishes(
        CHARGES, ChargesComputed,
        "Exact charges in batches (one reading hour, meter and shard each), keyed shard-<n>; a re-priced "
        "measurement comes again with a higher revision.",
    )
    for topic in (READINGS, READINGS_V1):
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


async def stop(runtime: Runtime) -> None:
    """After the subscribers stopped (the runtime stops them first): end the maintenance loop."""
    task: asyncio.Task[None] | None = runtime.state.pop("maintenance", None)
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
