"""Entrypoints of the pricer: the readings consumer, the internal price routes, re-pricing and the outbox.

Each entrypoint owns its transaction: it takes the catalog lock (see repository.py), asks service.py
to price, stores through repository.py, commits, and only then publishes to ``usage.charges.v1`` (keyed
by org id). The readings handler returns before the consumer commits its offsets, so a crash anywhere
re-delivers the batch; a redelivered measurement publishes its stored latest revision again, never a
new one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.pricer import completeness, repository, service
from services.pricer.schemas import PriceCreatedOut, PriceEndIn, PriceIn, PriceList, PriceOut, UnpricedList
from services.pricer.service import (
    Catalog,
    Price,
    PriceEndRefusedError,
    PriceNotFoundError,
    PriceOverlapError,
)
from services.pricer.settings import PricerSettings
from shared.clock import utcnow
from shared.contracts import MeasurementTaken
from shared.wire import Measurement
from shared.http import ORJSONResponse, ProblemError, read_json
from shared.ids import uuid7
from shared.kafka import Outgoing, Publisher, Received
from shared.runtime import Runtime
from shared.topics import CHARGES, READINGS

__all__ = ["Pricer", "routes", "start", "stop", "CatalogBusyError"]

log = logging.getLogger(__name__)

CHARGES_STORED = Counter(
    "billing_pricer_charges_total",
    "Charge revisions stored and published; rate() is charges per second",
    ["status", "origin"],
)
CHARGES_REPUBLISHED = Counter(
    "billing_pricer_charges_republished_total", "Stored charges published again for redelivered measurements"
)
UNPRICED = Gauge("billing_pricer_unpriced_charges", "Charges whose latest revision is unpriced")
CATALOG_RELOADS = Counter("billing_pricer_catalog_reloads_total", "Times the in-memory price catalog was reloaded")

ReadingsBatch = list[Received[Measurement]]  # the consumer hands over shared.wire's mirror


class CatalogBusyError(Exception):
    """A price change could not take the catalog lock in time (batches kept it)."""


class Pricer:
    """The pricer's use cases over a pool and a publisher."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: Publisher,
        charges_topic: str,
        *,
        reprice_chunk: int = 2000,
        lock_timeout_ms: int = 10_000,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._topic = charges_topic
        self._chunk = reprice_chunk
        self._lock_timeout_ms = lock_timeout_ms
        self._catalog = Catalog((), version=0)
        self._swept_version = 0

    async def _current_catalog(self, conn: asyncpg.Connection) -> Catalog:
        """The catalog as committed; reloaded only when its version moved. Call under the lock."""
        version = await repository.catalog_version(conn)
        if version != self._catalog.version:
            self._catalog = Catalog(await repository.load_prices(conn), version)
            CATALOG_RELOADS.inc()
        return self._catalog

    # -- usage.readings.v1 ------------------------------------------------------------------------

    async def handle_readings(self, batch: ReadingsBatch) -> list[tuple[Received[Measurement], str]]:
        """Price a batch in one transaction, publish the charges after the commit, return the rejects."""
        priced_at = utcnow()
        messages = [r.message for r in batch]
        inserted = unpriced = 0
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await repository.lock_catalog_shared(conn)
                catalog = await self._current_catalog(conn)
                priced = service.price_batch(messages, catalog, priced_at)
                payloads = priced.payloads
                if priced.rows:
                    inserted, unpriced = await repository.store_charges(conn, priced.rows, priced.unpriced)
                    if inserted < len(priced.rows):
                        # Some were stored before (a redelivery): publish what is stored, the latest revision.
                        stored = await repository.latest_staged_charges(conn)
                        payloads = [service.stored_charge_payload(m, stored[m.id]) for m in priced.measurements]
        await self._publisher.publish(
            self._topic, [Outgoing(m.org_id.encode(), p) for m, p in zip(priced.measurements, payloads, strict=True)]
        )
        CHARGES_STORED.labels("priced", "readings").inc(inserted - unpriced)
        CHARGES_STORED.labels("unpriced", "readings").inc(unpriced)
        CHARGES_REPUBLISHED.inc(len(priced.rows) - inserted)
        UNPRICED.inc(unpriced)
        return [(batch[i], why) for i, why in priced.rejects]

    # -- the catalog ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _catalog_change(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction holding the catalog lock exclusively: it waits for the in-flight batches to
        commit, but no longer than the lock timeout (then CatalogBusyError)."""
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await repository.lock_catalog_exclusive(conn, self._lock_timeout_ms)
                    yield conn
            except asyncpg.LockNotAvailableError:
                raise CatalogBusyError("the price catalog is busy; retry") from None

    async def add_price(self, body: PriceIn) -> tuple[Price, bool, int]:
        """Add a price; returns (price, created, charges re-priced). Re-sending a price identical to an
        existing one returns that one (created False); any other overlap raises PriceOverlapError."""
        new = Price(
            id=uuid7(),
            meter=body.meter,
            resource_kind=body.resource_kind,
            unit_of_measure=body.unit_of_measure,
            microcredits_per_unit=body.microcredits_per_unit,
            unit=body.unit,
            valid_from=body.valid_from,
            valid_until=body.valid_until,
            created_at=utcnow(),
        )
        async with self._catalog_change() as conn:
            try:
                async with conn.transaction():  # a savepoint, so that the overlap can be described
                    price = await repository.insert_price(conn, new)
            except asyncpg.ExclusionViolationError:
                conflicts = await repository.overlapping_prices(
                    conn, new.meter, new.resource_kind, new.valid_from, new.valid_until
                )
                if len(conflicts) == 1 and _same_terms(conflicts[0], new):
                    return conflicts[0], False, 0
                ids = ", ".join(str(c.id) for c in conflicts)
                raise PriceOverlapError(
                    f"{new.meter}/{new.resource_kind or '-'} already has a price in that range ({ids})",
                    [c.id for c in conflicts],
                ) from None
        repriced = await self.reprice(only=price)
        return price, True, repriced

    async def end_price(self, price_id: UUID, at: datetime) -> Price:
        async with self._catalog_change() as conn:
            price = await repository.get_price_for_update(conn, price_id)
            if price is None:
                raise PriceNotFoundError(f"no price {price_id}")
            last = await repository.last_priced_hour(conn, price_id, at)
            if service.check_end(price, at, last):
                price = await repository.end_price(conn, price_id, at)
        return price

    async def get_price(self, price_id: UUID) -> Price:
        async with self._pool.acquire() as conn:
            price = await repository.get_price(conn, price_id)
        if price is None:
            raise PriceNotFoundError(f"no price {price_id}")
        return price

    async def list_prices(
        self, meter: str | None, resource_kind: str | None, at: datetime | None, limit: int
    ) -> list[Price]:
        async with self._pool.acquire() as conn:
            return await repository.list_prices(conn, meter, resource_kind, at, limit)

    # -- re-pricing and the outbox ----------------------------------------------------------------

    async def reprice(self, only: Price | None = None) -> int:
        """Re-price the unpriced charges that a price now covers (those of ``only``, or all), a chunk per
        transaction, each chunk's revisions queued in the outbox and then published; returns how many."""
        total = 0
        after: tuple[datetime, UUID] | None = None
        while True:
            priced_at = utcnow()
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    await repository.lock_catalog_shared(conn)
                    catalog = await self._current_catalog(conn)
                    rows = await repository.covered_unpriced(conn, after, self._chunk, only)
                    done = [
                        r
                        for r in (
                            service.reprice_document(orjson.loads(row["charge"]), row["reading_hour"], catalog, priced_at)
                            for row in rows
                        )
                        if r is not None
                    ]
                    if done:
                        await repository.store_repriced(
                            conn, [r.row for r in done], [(r.row[1], r.row[2], r.org_id, r.payload) for r in done]
                        )
            if rows:
                after = (rows[-1]["reading_hour"], rows[-1]["measurement_id"])
            if done:
                total += len(done)
                CHARGES_STORED.labels("priced", "repricing").inc(len(done))
                UNPRICED.dec(len(done))
                await self.flush_outbox()
            if len(rows) < self._chunk:
                return total

    async def sweep_if_catalog_changed(self) -> int:
        """Re-price everything the catalog covers when its version moved since the last full sweep: the
        instance that added a price may have died before re-pricing (it re-prices on its next start,
        but it may never start again)."""
        async with self._pool.acquire() as conn:
            version = await repository.catalog_version(conn)
        if version == self._swept_version:
            return 0
        repriced = await self.reprice()
        self._swept_version = version
        return repriced

    async def flush_outbox(self, limit: int = 2000) -> int:
        """Publish the re-priced revisions not yet published (deleting them once acknowledged)."""
        total = 0
        while True:
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    rows = await repository.take_outbox(conn, limit)
                    if rows:
                        await self._publisher.publish(
                            self._topic, [Outgoing(r["org_id"].encode(), bytes(r["payload"])) for r in rows]
                        )
                        await repository.delete_outbox(conn, [(r["measurement_id"], r["revision"]) for r in rows])
            total += len(rows)
            if len(rows) < limit:
                return total

    async def unpriced(self, after: tuple[datetime, UUID] | None, limit: int) -> list[asyncpg.Record]:
        async with self._pool.acquire() as conn:
            return await repository.list_unpriced(conn, after, limit)

    async def refresh_unpriced_gauge(self) -> None:
        async with self._pool.acquire() as conn:
            UNPRICED.set(await repository.count_unpriced(conn))


def _terms(p: Price) -> tuple[Any, ...]:
    return (p.meter, p.resource_kind, p.unit_of_measure, p.microcredits_per_unit, p.unit, p.valid_from, p.valid_until)


def _same_terms(a: Price, b: Price) -> bool:
    return _terms(a) == _terms(b)


# -- HTTP -----------------------------------------------------------------------------------------


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


def _encode_cursor(hour: datetime, measurement: UUID) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([hour.isoformat(), str(measurement)])).decode().rstrip("=")


def _decode_cursor(raw: str | None) -> tuple[datetime, UUID] | None:
    if not raw:
        return None
    try:
        value = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ValueError("not a cursor")
        hour_text, measurement = value
        hour = datetime.fromisoformat(hour_text)
        if hour.tzinfo is None:
            raise ValueError("naive")
        return hour, UUID(measurement)
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
    rows = await _pricer(request).unpriced(after, limit)
    next_cursor = _encode_cursor(rows[-1]["reading_hour"], rows[-1]["measurement_id"]) if len(rows) == limit else None
    page = UnpricedList(items=[orjson.loads(r["charge"]) for r in rows], next_cursor=next_cursor)
    return ORJSONResponse(page.model_dump(mode="json"))


def routes() -> list[BaseRoute]:
    return [
        Route("/internal/prices", post_price, methods=["POST"]),
        Route("/internal/prices", list_prices, methods=["GET"]),
        Route("/internal/prices/{price_id:uuid}", get_price, methods=["GET"]),
        Route("/internal/prices/{price_id:uuid}/end", post_price_end, methods=["POST"]),
        Route("/internal/charges/unpriced", list_unpriced, methods=["GET"]),
        Route("/internal/completeness", completeness.completeness, methods=["GET"]),
    ]


# -- lifecycle ------------------------------------------------------------------------------------


async def start(runtime: Runtime) -> None:
    """Build the pricer, publish what a crash left in the outbox, re-price what a price added before a
    crash covers, then register the readings consumer and the maintenance loop."""
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
    runtime.consume(READINGS, MeasurementTaken, pricer.handle_readings)
    runtime.state["maintenance"] = asyncio.create_task(
        _maintenance(pricer, s.maintenance_interval_seconds), name="pricer-maintenance"
    )


async def stop(runtime: Runtime) -> None:
    """After the consumers stopped (the runtime stops them first): end the maintenance loop."""
    task: asyncio.Task[None] | None = runtime.state.pop("maintenance", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _maintenance(pricer: Pricer, interval: float) -> None:
    """Publish outbox rows another instance left behind (crash), re-price what a price added elsewhere
    covers if its instance did not, and refresh the unpriced gauge."""
    while True:
        await asyncio.sleep(interval)
        try:
            await pricer.flush_outbox()
            await pricer.sweep_if_catalog_changed()
            await pricer.refresh_unpriced_gauge()
        except Exception:  # keep the loop alive: the next round retries
            log.exception("pricer maintenance failed")
