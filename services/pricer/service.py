"""The pricer's use cases: each owns its transaction, asks ``pricing`` to price, stores through
``repository`` and, once committed, publishes to ``usage.charges.v3``.

Readings (``usage.readings.v2`` batches, and ``usage.readings.v1`` single measurements regrouped into
batches) are priced a shard at a time. A shard seen for the first time costs one row: its charges batch,
stored and published as is. A shard that holds batches already (a redelivery, a part of it sent again,
the same measurements on v1 and v2) is read under a lock: the measurements it holds are not priced
again — the batches holding their latest charges are published again, byte for byte — and only the new
ones make a new batch. A measurement held with other content (``shared.batches.content``) is not a
redelivery: it is refused to the DLQ with a ``conflict:`` reason naming the stored copy, which stays as it
is (first write wins, but never silently). The consumer commits its offsets after this returns, so a crash
anywhere delivers the readings again, and that path makes the repeat harmless.

Catalog consistency: every writer of charges (a readings batch, a re-pricing chunk) holds the catalog
lock in SHARED mode for its transaction and reads the catalog inside it; every catalog change holds it
EXCLUSIVE. So a change waits for the batches priced with the old catalog to commit, and no batch commits
charges priced with a catalog older than the last committed change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
from prometheus_client import Counter, Gauge

from services.pricer import repository
from services.pricer.pricing import (
    Assignments,
    Catalog,
    Price,
    Priced,
    PriceEndOffMonthError,
    PriceEndRefusedError,
    PriceNotFoundError,
    PriceOverlapError,
    RerateJob,
    RerateNotFoundError,
    ShardKey,
    batches_of_v1,
    check_end,
    is_month_boundary,
    latest_items,
    price_items,
    reassign_items,
    reprice_items,
    rerate_items,
)
from services.pricer.schemas import PriceIn, RerateIn
from shared.batches import (
    CONFLICT,
    BatchRejected,
    Charges,
    Correction,
    Measurements,
    content,
    content_differences,
    encode_charges,
    encode_measurements,
    hour_text,
    shard_key,
    subset,
)
from shared.blobs import Frames, shard_scope
from shared.clock import utcnow
from shared.contracts import OrgAssigned
from shared.db import Conn
from shared.edge.params import EARLIEST
from shared.ids import charge_id, measurement_id, org_assignment_id, uuid7
from shared.kafka import TRANSIENT, Outgoing, Received, Stream, retry_delay
from shared.money import display_credits
from shared.wire import Measurement

__all__ = ["CatalogBusyError", "Pricer", "UnpricedPage"]

log = logging.getLogger(__name__)

CHARGES_STORED = Counter(
    "billing_pricer_charges_total",
    "Charge revisions stored and published; rate() is charges per second",
    ["status", "origin"],
)
CHARGES_REPUBLISHED = Counter(
    "billing_pricer_batches_republished_total", "Stored charge batches published again for redelivered measurements"
)
CONFLICTS = Counter(
    "billing_pricer_conflicting_measurements_total",
    "Measurements refused to the DLQ because they are stored with other content",
)
UNPRICED = Gauge("billing_pricer_unpriced_charges", "Measurements whose latest charge is unpriced")
CATALOG_RELOADS = Counter("billing_pricer_catalog_reloads_total", "Times the in-memory price catalog was reloaded")

_decode_charges = msgspec.json.Decoder(Charges)


class CatalogBusyError(Exception):
    """A price change could not take the catalog lock in time (batches kept it)."""


@dataclass
class UnpricedPage:
    """A page of the admin list: per-charge documents and the cursor of the next page (None: the end)."""

    items: list[dict[str, Any]]
    next_cursor: tuple[datetime, str, int, str, str] | None


@dataclass
class _Shard:
    """One shard's work in a transaction: what it stores and publishes."""

    stored: list[Charges] = field(default_factory=list)
    stored_raw: list[bytes] = field(default_factory=list)
    next_seq: int = 1


def _stored(rows: Sequence[tuple[int, bytes]]) -> _Shard:
    shard = _Shard()
    for seq, raw in rows:
        shard.stored.append(_decode_charges.decode(raw))
        shard.stored_raw.append(bytes(raw))
        shard.next_seq = seq + 1
    return shard


class Pricer:
    """The pricer's use cases over a pool and the broker."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        stream: Stream,
        charges_topic: str,
        *,
        reprice_chunk: int = 200,
        lock_timeout_ms: int = 10_000,
        horizon: timedelta = timedelta(days=1),
    ) -> None:
        self._pool = pool
        self._stream = stream
        self._topic = charges_topic
        self._chunk = reprice_chunk
        self._lock_timeout_ms = lock_timeout_ms
        self._horizon = horizon
        self._catalog = Catalog((), version=0)
        self._assignments = Assignments((), version=0)
        self._swept_version = 0
        self.frames = Frames()  # the stored batches' compression frames (shared/blobs.py), for this database
        self.rerate_shards = max(1, reprice_chunk // 20)  # shards of a re-rating per transaction
        self.rerate_wake = asyncio.Event()  # set when a job is entered here: the runner starts it at once

    async def _current_catalog(self, conn: Conn) -> Catalog:
        """The catalog as committed; reloaded only when its version moved (the org assignments likewise, read
        with ``assignments`` after this). Call under the lock."""
        version, assigned = await repository.versions(conn)
        if version != self._catalog.version:
            self._catalog = Catalog(await repository.load_prices(conn), version)
            CATALOG_RELOADS.inc()
        if assigned != self._assignments.version:
            self._assignments = Assignments(await repository.load_assignments(conn), assigned)
        return self._catalog

    @property
    def assignments(self) -> Assignments:
        """The org assignments as of the last ``_current_catalog``."""
        return self._assignments

    # -- readings ---------------------------------------------------------------------------------

    async def handle_readings(
        self, batch: list[Received[Measurements]]
    ) -> list[tuple[Received[Measurements], str | BatchRejected]]:
        """Price a batch of ``usage.readings.v2`` messages; returns what it refuses (a message whose hour
        is not whole; an item whose charge would exceed the contract's integers or whose measurement is
        stored with other content, as a batch of its own)."""
        rejects: list[tuple[Received[Measurements], str | BatchRejected]] = []
        work: list[Received[Measurements]] = []
        for r in batch:
            why = _hour_problem(r.message.reading_hour, self._horizon)
            if why is None:
                work.append(r)
            else:
                rejects.append((r, why))
        refused = await self._ingest([r.message for r in work], origin="readings")
        for n, i, why in refused:
            m = work[n].message
            rejects.append((work[n], BatchRejected(why, (i,), encode_measurements(subset(m, [i])))))
        return rejects

    async def handle_readings_v1(self, batch: list[Received[Measurement]]) -> list[tuple[Received[Measurement], str]]:
        """Price a batch of ``usage.readings.v1`` messages (one measurement each), regrouped by shard."""
        rejects: list[tuple[Received[Measurement], str]] = []
        valid: list[Received[Measurement]] = []
        for r in batch:
            m = r.message
            why = _hour_problem(m.reading_hour, self._horizon)
            if why is None and measurement_id(m.reading_hour, m.meter, m.resource_id) != m.id:
                why = "id is not shared.ids.measurement_id(reading_hour, meter, resource_id)"
            if why is None:
                valid.append(r)
            else:
                rejects.append((r, why))
        groups = batches_of_v1([r.message for r in valid])
        refused = await self._ingest([b for b, _ in groups], origin="readings_v1")
        for n, i, why in refused:
            rejects.append((valid[groups[n][1][i]], why))
        return rejects

    async def _ingest(self, messages: Sequence[Measurements], origin: str) -> list[tuple[int, int, str]]:
        """Price and store ``messages`` in one transaction, then publish; returns the items refused, as
        (message position, item position, reason)."""
        if not messages:
            return []
        priced_at = utcnow()
        refused: list[tuple[int, int, str]] = []
        outgoing: list[Outgoing] = []
        rows: list[repository.BatchRow] = []
        unpriced_rows: list[tuple[ShardKey, str]] = []
        hours: list[tuple[UUID, datetime]] = []
        counts = {"priced": 0, "unpriced": 0, "republished": 0, "conflicts": 0}
        # a shard's first readings seed its frame (the names and ids its charges repeat)
        await self.frames.ensure_first(self._pool, messages, shard_scope, encode_measurements)
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await repository.lock_catalog_shared(conn)
                catalog = await self._current_catalog(conn)
                keys = {ShardKey(m.reading_hour, m.meter, m.shard) for m in messages}
                shards = {k: _stored(v) for k, v in (await repository.lock_shards(conn, self.frames, keys)).items()}
                for n, m in enumerate(messages):
                    key = ShardKey(m.reading_hour, m.meter, m.shard)
                    shard = shards.setdefault(key, _Shard())
                    positions: Sequence[int] | None = None
                    if shard.stored:
                        positions, again, conflicts = _against_stored(m, shard.stored)
                        refused.extend((n, i, why) for i, why in conflicts)
                        outgoing.extend(Outgoing(shard_key(key.shard), shard.stored_raw[b]) for b in sorted(again))
                        counts["republished"] += len(again)
                        counts["conflicts"] += len(conflicts)
                        if not positions:
                            continue
                    priced = price_items(m, positions, catalog, priced_at, assignments=self._assignments)
                    refused.extend((n, i, why) for i, why in priced.rejects)
                    if priced.message is None:
                        continue
                    raw = encode_charges(priced.message)
                    rows.append(_row(key, shard.next_seq, priced, raw, published=True))
                    unpriced_rows.extend((key, kind) for kind in priced.unpriced_kinds)
                    hours.extend((p, key.reading_hour) for p in priced.price_ids)
                    shard.stored.append(priced.message)
                    shard.stored_raw.append(raw)
                    shard.next_seq += 1
                    outgoing.append(Outgoing(shard_key(key.shard), raw))
                    counts["priced"] += priced.priced
                    counts["unpriced"] += priced.unpriced
                await repository.insert_batches(conn, self.frames, rows)
                await repository.add_unpriced(conn, unpriced_rows)
                await repository.add_priced_hours(conn, hours)
        await self._stream.publish(self._topic, outgoing)
        CHARGES_STORED.labels("priced", origin).inc(counts["priced"])
        CHARGES_STORED.labels("unpriced", origin).inc(counts["unpriced"])
        CHARGES_REPUBLISHED.inc(counts["republished"])
        CONFLICTS.inc(counts["conflicts"])
        UNPRICED.inc(counts["unpriced"])
        return refused

    # -- the catalog ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _catalog_change(self) -> AsyncIterator[Conn]:
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
        existing one returns that one (created False); any other overlap raises PriceOverlapError. A price
        with a ``scope`` (a tier or a customer) overlaps only prices of the same scope."""
        scope = ("global", "") if body.scope is None else body.scope.key()
        new = Price(
            id=uuid7(),
            meter=body.meter,
            resource_kind=body.resource_kind,
            unit_of_measure=body.unit_of_measure,
            microcredits_per_unit=body.microcredits_per_unit or 0,
            unit=body.unit,
            valid_from=body.valid_from,
            valid_until=body.valid_until,
            created_at=utcnow(),
            model=body.price_model(),
            scope_kind=scope[0],
            scope_id=scope[1],
        )
        async with self._catalog_change() as conn:
            try:
                async with conn.transaction():  # a savepoint, so that the overlap can be described
                    price = await repository.insert_price(conn, new)
            except asyncpg.ExclusionViolationError:
                conflicts = await repository.overlapping_prices(
                    conn, new.meter, new.resource_kind, new.valid_from, new.valid_until, scope=scope
                )
                if len(conflicts) == 1 and _same_terms(conflicts[0], new):
                    return conflicts[0], False, 0
                ids = ", ".join(str(c.id) for c in conflicts)
                whose = "" if scope[0] == "global" else f" for {scope[0]} {scope[1]}"
                raise PriceOverlapError(
                    f"{new.meter}/{new.resource_kind or '-'} already has a price{whose} in that range ({ids})",
                    [c.id for c in conflicts],
                ) from None
        repriced = await self.reprice(only=price)
        return price, True, repriced

    async def end_price(self, price_id: UUID, at: datetime) -> Price:
        async with self._catalog_change() as conn:
            price = await repository.get_price_for_update(conn, price_id)
            if price is None:
                raise PriceNotFoundError(f"no price {price_id}")
            if price.correction:
                raise PriceEndRefusedError("a price correction cannot be ended: its range is its re-rating's")
            if not price.flat and not is_month_boundary(at):
                raise PriceEndOffMonthError(
                    f"a {price.model.model} price ends only on a billing-month boundary (midnight America/New_York "
                    f"on the 1st); {at.isoformat()} is not one"
                )
            last = await repository.last_priced_hour(conn, price_id, at)
            if check_end(price, at, last):
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

    # -- corrections: re-rating jobs ----------------------------------------------------------------

    async def start_rerate(self, body: RerateIn) -> RerateJob:
        """Store the correction (a price that the catalog applies to the range in place of the prices) and its
        job, in one transaction under the catalog lock; the runner (``run_rerates``) re-prices in the
        background. PriceOverlapError when another correction of the meter and kind overlaps the range."""
        terms = body.price_in()
        new = Price(
            id=uuid7(),
            meter=body.meter,
            resource_kind=body.resource_kind,
            unit_of_measure=terms.unit_of_measure,
            microcredits_per_unit=terms.microcredits_per_unit or 0,
            unit=terms.unit,
            valid_from=body.start,
            valid_until=body.end,
            created_at=utcnow(),
            model=terms.price_model(),
            correction=True,
        )
        async with self._catalog_change() as conn:
            try:
                async with conn.transaction():  # a savepoint, so that the overlap can be described
                    price = await repository.insert_price(conn, new)
            except asyncpg.ExclusionViolationError:
                conflicts = await repository.overlapping_prices(
                    conn, new.meter, new.resource_kind, new.valid_from, new.valid_until, correction=True
                )
                ids = ", ".join(str(c.id) for c in conflicts)
                raise PriceOverlapError(
                    f"{new.meter}/{new.resource_kind or '-'} already has a price correction in that range ({ids})",
                    [c.id for c in conflicts],
                ) from None
            total = await repository.count_measurements(conn, new.meter, new.valid_from, body.end)
            job = await repository.insert_rerate(conn, uuid7(), price, body.reason, total)
        self.rerate_wake.set()
        return job

    async def get_rerate(self, job_id: UUID) -> RerateJob:
        async with self._pool.acquire() as conn:
            job = await repository.get_rerate(conn, job_id)
        if job is None:
            raise RerateNotFoundError(f"no re-rating job {job_id}")
        return job

    async def list_rerates(self, before: UUID | None, limit: int) -> list[RerateJob]:
        async with self._pool.acquire() as conn:
            return await repository.list_rerates(conn, before, limit)

    async def rerate_step(self, job_id: UUID) -> bool:
        """Re-price the next chunk of shards of a running job, in one transaction that also moves the job's
        position: each shard's new revisions (only items whose latest charge is not priced with the correction
        yet) stored as one unpublished batch carrying ``correction``, then published from the outbox. When
        no shard is left: publish what is unpublished, then mark the job done. Returns whether more is left."""
        priced_at = utcnow()
        more = False
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await repository.lock_catalog_shared(conn)
                job = await repository.lock_rerate(conn, job_id)
                if job is None or job.state != "running":
                    return False
                catalog = await self._current_catalog(conn)
                correction, ref = job.price, Correction(job.id, job.reason)
                assert correction.valid_until is not None
                found = await repository.rerate_shards(
                    conn, job.meter, correction.valid_from, correction.valid_until, job.after, self.rerate_shards
                )
                if found:
                    more = True
                    shards = {
                        k: _stored(v)
                        for k, v in (await repository.lock_shards(conn, self.frames, [k for k, _ in found])).items()
                    }
                    rows: list[repository.BatchRow] = []
                    cleared: list[tuple[ShardKey, str]] = []
                    looked = repriced = refused = 0
                    for key, n in found:
                        looked += n
                        shard = shards.get(key)
                        if shard is None:
                            continue
                        priced, newly_priced = rerate_items(shard.stored, catalog, priced_at, correction, ref)
                        if priced is None:
                            continue
                        refused += len(priced.rejects)
                        if priced.message is not None:
                            k = priced.priced
                            raw = encode_charges(priced.message)
                            rows.append((key, shard.next_seq, k, newly_priced, -newly_priced, k, False, raw))
                            shard.stored.append(priced.message)
                            shard.next_seq += 1
                            repriced += k
                        if newly_priced and job.resource_kind not in _unpriced_kinds(shard.stored):
                            cleared.append((key, job.resource_kind))
                    await repository.insert_batches(conn, self.frames, rows)
                    await repository.delete_unpriced(conn, cleared)
                    await repository.add_priced_hours(conn, sorted({(correction.id, k.reading_hour) for k, *_ in rows}))
                    await repository.advance_rerate(conn, job.id, found[-1][0], looked, repriced, refused)
                    if refused:
                        log.warning("re-rated charges refused: their amount exceeds 2**62 microcredits",
                                    extra={"job": str(job.id), "refused": refused})
        if more:
            await self.flush_outbox()
            return True
        # Nothing left: what this job stored is published before it says done.
        await self.flush_outbox()
        async with self._pool.acquire() as conn:
            await repository.finish_rerate(conn, job_id)
        return False

    async def run_rerates(self, interval: float) -> None:
        """The runner: the oldest running job, a chunk at a time, until none is left; then wait for a new one
        (entered here: at once; by another instance: within ``interval``). A transient error (database or
        broker away) is retried after a delay; any other failure marks the job failed with the reason."""
        attempt = 0
        while True:
            try:
                async with self._pool.acquire() as conn:
                    job_id = await repository.next_rerate(conn)
                if job_id is None:
                    self.rerate_wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.rerate_wake.wait(), interval)
                    continue
                log.info("re-rating", extra={"job": str(job_id)})
                try:
                    while await self.rerate_step(job_id):
                        attempt = 0
                except TRANSIENT:
                    raise
                except Exception as exc:  # a job that cannot go on says why, and the next one runs
                    log.exception("re-rating job failed", extra={"job": str(job_id)})
                    async with self._pool.acquire() as conn:
                        await repository.fail_rerate(conn, job_id, f"{type(exc).__name__}: {exc}")
                attempt = 0
            except TRANSIENT as exc:
                attempt += 1
                delay = retry_delay(attempt)
                log.warning(
                    "re-rating interrupted (transient); retrying", extra={"error": repr(exc), "retry_in_s": delay}
                )
                await asyncio.sleep(delay)

    # -- org assignments (rate cards) -------------------------------------------------------------

    async def handle_assignments(self, batch: list[Received[OrgAssigned]]) -> list[tuple[Received[OrgAssigned], str]]:
        """Store the org assignments of ``ledger.assignments.v1`` (a redelivery changes nothing), then re-price
        the charges of each assigned org that a tier or customer price now prices otherwise (``reassign``).
        Refused to the DLQ: an id that is not ``org_assignment_id(org, starts_at)``, or an assignment of an
        org and instant stored with other content (``conflict:``)."""
        rejects: list[tuple[Received[OrgAssigned], str]] = []
        valid: list[Received[OrgAssigned]] = []
        for r in batch:
            a = r.message
            if a.id != org_assignment_id(a.org_id, a.starts_at):
                rejects.append((r, "id is not shared.ids.org_assignment_id(org_id, starts_at)"))
            else:
                valid.append(r)
        if not valid:
            return rejects
        rows = [(r.message.id, r.message.org_id, r.message.starts_at, r.message.customer_id, r.message.tier,
                 r.message.assigned_at) for r in valid]
        # Under the catalog lock, exclusively: batches priced with the assignments before commit first, so
        # that the re-pricing below finds their charges; later ones read the new assignments.
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1::int4, $2::int4)", *repository.CATALOG_LOCK)
                held = await repository.insert_assignments(conn, rows)
        done: list[OrgAssigned] = []
        for r, have in zip(valid, held, strict=True):
            if have is None:
                done.append(r.message)
            else:
                rejects.append((r, f"{CONFLICT} org {r.message.org_id} has an assignment from "
                                   f"{r.message.starts_at.isoformat()} stored with other content (id {have[0]}, "
                                   f"customer {have[3]}, tier {have[4]}); the stored one is kept"))
        for a in done:
            await self.reassign(a.org_id, a.starts_at)
        return rejects

    async def reassign(self, org_id: str, since: datetime) -> int:
        """Re-price the latest charges of ``org_id`` from ``since`` until its next assignment whose price is
        no longer the one that applies (a tier or customer price of its new customer, or of its previous one),
        as revisions n+1 stored unpublished and then published (the outbox of charge_batches); returns how
        many. Nothing to look at when neither customer has a scoped price."""
        total = 0
        after: ShardKey | None = None
        while True:
            priced_at = utcnow()
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    await repository.lock_catalog_shared(conn)
                    catalog = await self._current_catalog(conn)
                    assignments = self._assignments
                    scope = assignments.at(org_id, since)
                    before, until = assignments.around(org_id, since)
                    scoped = [p for s in (scope, before) if s is not None for p in catalog.scoped_prices(s)]
                    scoped = [p for p in scoped if (p.valid_until is None or p.valid_until > since)
                              and (until is None or p.valid_from < until)]
                    if not scoped:
                        return total
                    start = max(since, min(p.valid_from for p in scoped))
                    ends = [p.valid_until for p in scoped]
                    end = None if any(e is None for e in ends) else max(e for e in ends if e is not None)
                    if until is not None:
                        end = until if end is None else min(end, until)
                    meters = sorted({p.meter for p in scoped})
                    keys = await repository.assignment_shards(conn, meters, start, end, after, self.rerate_shards)
                    if not keys:
                        break
                    shards = {k: _stored(v) for k, v in (await repository.lock_shards(conn, self.frames, keys)).items()}
                    rows: list[repository.BatchRow] = []
                    hours: list[tuple[UUID, datetime]] = []
                    cleared: list[tuple[ShardKey, str]] = []
                    for key, shard in shards.items():
                        priced, was_unpriced = reassign_items(shard.stored, catalog, priced_at, assignments, org_id,
                                                              start)
                        if priced is None or priced.message is None:
                            continue
                        n = len(priced.message.resource_id)
                        newly = sum(1 for k, p in zip(priced.message.kind, priced.message.price, strict=True)
                                    if p >= 0 and priced.message.kinds[k] in was_unpriced)
                        raw = encode_charges(priced.message)
                        rows.append((key, shard.next_seq, n, newly, -newly, n, False, raw))  # each +1 revision
                        hours.extend((p, key.reading_hour) for p in priced.price_ids)
                        shard.stored.append(priced.message)
                        shard.next_seq += 1
                        still = _unpriced_kinds(shard.stored)
                        cleared.extend((key, k) for k in was_unpriced if k not in still)
                        total += n
                    await repository.insert_batches(conn, self.frames, rows)
                    await repository.delete_unpriced(conn, cleared)
                    await repository.add_priced_hours(conn, hours)
                    after = keys[-1]
            await self.flush_outbox()
            if len(keys) < self.rerate_shards:
                break
        if total:
            CHARGES_STORED.labels("priced", "assignment").inc(total)
            log.info("re-priced an org's charges after its assignment",
                     extra={"org": org_id, "since": since.isoformat(), "repriced": total})
        return total

    # -- re-pricing and the outbox ----------------------------------------------------------------

    async def reprice(self, only: Price | None = None) -> int:
        """Re-price the unpriced charges that a price now covers (those of ``only``, or all), some shards
        per transaction, each shard's new revisions stored as one batch and then published; returns how
        many charges were re-priced."""
        total = 0
        after: repository.UnpricedKey | None = None
        while True:
            priced_at = utcnow()
            done = 0
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    await repository.lock_catalog_shared(conn)
                    catalog = await self._current_catalog(conn)
                    found = await repository.covered_unpriced(conn, after, self._chunk, only)
                    kinds: dict[ShardKey, set[str]] = {}
                    for key, kind in found:
                        kinds.setdefault(key, set()).add(kind)
                    shards = {
                        k: _stored(v) for k, v in (await repository.lock_shards(conn, self.frames, kinds)).items()
                    }
                    rows: list[repository.BatchRow] = []
                    hours: list[tuple[UUID, datetime]] = []
                    cleared: list[tuple[ShardKey, str]] = []
                    for key, want in kinds.items():
                        shard = shards.get(key)
                        if shard is None:
                            cleared.extend((key, k) for k in want)
                            continue
                        priced = reprice_items(shard.stored, catalog, priced_at, want, self._assignments)
                        if priced is not None and priced.rejects:
                            # Still unpriced, still listed as such (GET /internal/unpriced): said, not dropped.
                            log.warning(
                                "re-priced charges refused: their amount exceeds 2**62 microcredits",
                                extra={"shard": str(key), "refused": len(priced.rejects),
                                       "first": priced.rejects[0][1]},
                            )
                        if priced is not None and priced.message is not None:
                            n = priced.priced
                            raw = encode_charges(priced.message)
                            rows.append((key, shard.next_seq, n, n, -n, n, False, raw))
                            hours.extend((p, key.reading_hour) for p in priced.price_ids)
                            shard.stored.append(priced.message)
                            done += n
                        still = _unpriced_kinds(shard.stored)
                        cleared.extend((key, k) for k in want if k not in still)
                    await repository.insert_batches(conn, self.frames, rows)
                    await repository.delete_unpriced(conn, cleared)
                    await repository.add_priced_hours(conn, hours)
            if found:
                last_key, last_kind = found[-1]
                after = (last_key.reading_hour, last_key.meter, last_key.shard, last_kind)
            if done:
                total += done
                CHARGES_STORED.labels("priced", "repricing").inc(done)
                UNPRICED.dec(done)
                await self.flush_outbox()
            if len(found) < self._chunk:
                return total

    async def sweep_if_catalog_changed(self) -> int:
        """Re-price everything the catalog covers when its version moved since the last full sweep: the
        instance that added a price may have died before re-pricing."""
        async with self._pool.acquire() as conn:
            version = await repository.catalog_version(conn)
        if version == self._swept_version:
            return 0
        repriced = await self.reprice()
        self._swept_version = version
        return repriced

    async def flush_outbox(self, limit: int = 200) -> int:
        """Publish the stored batches not yet published (re-priced revisions), marking them once
        acknowledged; returns how many."""
        total = 0
        while True:
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    rows = await repository.take_unpublished(conn, self.frames, limit)
                    if rows:
                        await self._stream.publish(
                            self._topic, [Outgoing(shard_key(k.shard), raw) for k, _, raw in rows]
                        )
                        await repository.mark_published(conn, [(k, seq) for k, seq, _ in rows])
            total += len(rows)
            if len(rows) < limit:
                return total

    # -- queries ----------------------------------------------------------------------------------

    async def unpriced(self, after: tuple[datetime, str, int, str, str] | None, limit: int) -> UnpricedPage:
        """Unpriced charges (their latest revision), as per-charge documents, in (hour, meter, shard,
        kind, resource) order after the cursor ``after``."""
        items: list[dict[str, Any]] = []
        start = after[:4] if after is not None else None
        strict = False  # the cursor's own shard and kind may hold more of the list; the next fetches go past
        async with self._pool.acquire() as conn:
            while len(items) < limit:
                found = await repository.unpriced_after(conn, start, 50, strict=strict)
                if not found:
                    return UnpricedPage(items, None)
                shards = await repository.load_shards(conn, self.frames, {k for k, _ in found})
                for key, kind in found:
                    stored = [_decode_charges.decode(raw) for _, raw in shards.get(key, [])]
                    for doc in _unpriced_documents(stored, kind):
                        position = (key.reading_hour, key.meter, key.shard, kind, doc["resource_id"])
                        if after is not None and position <= after:
                            continue
                        items.append(doc)
                        if len(items) == limit:
                            return UnpricedPage(items, position)
                last, last_kind = found[-1]
                # Past the last (shard, kind): PostgreSQL text cannot hold the "\x00" that would follow it.
                start, strict = (last.reading_hour, last.meter, last.shard, last_kind), True
        return UnpricedPage(items, None)

    async def refresh_unpriced_gauge(self) -> None:
        async with self._pool.acquire() as conn:
            UNPRICED.set(await repository.count_unpriced(conn))


def _against_stored(m: Measurements, stored: Sequence[Charges]) -> tuple[list[int], set[int], list[tuple[int, str]]]:
    """The items of ``m`` compared with what its shard holds: the positions of the new ones, the stored
    batches holding the latest charges of the ones held with the same content (a redelivery: published
    again), and the ones held with other content, refused with a reason naming the stored copy (which is
    kept, and not published again for them)."""
    latest = latest_items(stored)
    positions: list[int] = []
    again: set[int] = set()
    conflicts: list[tuple[int, str]] = []
    for i, rid in enumerate(m.resource_id):
        at = latest.get(rid)
        if at is None:
            positions.append(i)
            continue
        have = stored[at.batch]
        mine, theirs = content(m, i), content(have, at.item)
        if mine == theirs:
            again.add(at.batch)
            continue
        mid = measurement_id(m.reading_hour, m.meter, rid)
        why = (
            f"{CONFLICT} measurement {mid} ({hour_text(m.reading_hour)}, {m.meter}, resource {rid}) is stored "
            f"with other content: {content_differences(mine, theirs)}; the stored copy is kept (charges batch "
            f"{have.id}, charge {charge_id(mid, at.revision)} at revision {at.revision})"
        )
        conflicts.append((i, why))
    return positions, again, conflicts


def _row(key: ShardKey, seq: int, priced: Priced, raw: bytes, published: bool) -> repository.BatchRow:
    n = priced.priced + priced.unpriced
    return (key, seq, n, priced.priced, priced.unpriced, priced.revisions, published, raw)


def _unpriced_kinds(stored: Sequence[Charges]) -> set[str]:
    out = set()
    for at in latest_items(stored).values():
        c = stored[at.batch]
        if c.price[at.item] < 0:
            out.add(c.kinds[c.kind[at.item]])
    return out


def _unpriced_documents(stored: Sequence[Charges], kind: str) -> list[dict[str, Any]]:
    """The latest charges of a shard that are unpriced and of ``kind``, one document each (the shape of
    ``shared.contracts.ChargeComputed``), by resource id."""
    docs = []
    for rid, at in sorted(latest_items(stored).items()):
        c = stored[at.batch]
        i = at.item
        if c.price[i] >= 0 or c.kinds[c.kind[i]] != kind:
            continue
        mid = measurement_id(c.reading_hour, c.meter, rid)
        org, space = c.orgs[c.org[i]], c.spaces[c.space[i]]
        docs.append(
            {
                "id": str(charge_id(mid, at.revision)),
                "schema_name": "usage.charge",
                "schema_version": 1,
                "measurement_id": str(mid),
                "revision": at.revision,
                "reading_hour": hour_text(c.reading_hour),
                "meter": c.meter,
                "resource_id": rid,
                "resource_kind": kind,
                "resource_name": c.resource_name[i],
                "org_id": org.id,
                "org_name": org.name,
                "space_id": space.id,
                "space_name": space.name,
                "value": c.value[i],
                "unit": c.unit,
                "estimated": c.estimated[i],
                "status": "unpriced",
                "price_id": None,
                "amount_numerator": 0,
                "amount_denominator": 1,
                "display_amount": display_credits(0),
                "priced_at": c.priced_at.isoformat().replace("+00:00", "Z"),
            }
        )
    return docs


def _hour_problem(hour: datetime, horizon: timedelta) -> str | None:
    """Why a reading hour cannot be priced (None: it can): not a whole hour, or outside the window of
    reading hours [2000-01-01, now + horizon] (README, "Bounds and limits")."""
    if hour.minute or hour.second or hour.microsecond:
        return "reading_hour must be a whole UTC hour (minute 0)"
    if hour < EARLIEST:
        return f"reading_hour {hour_text(hour)} is before {hour_text(EARLIEST)}"
    latest = utcnow() + horizon
    if hour > latest:
        return f"reading_hour {hour_text(hour)} is later than the pricer's clock plus {horizon} ({latest.isoformat()})"
    return None


def _terms(p: Price) -> tuple[Any, ...]:
    return (
        p.meter, p.resource_kind, p.unit_of_measure, p.microcredits_per_unit, p.unit, p.valid_from, p.valid_until,
        p.model, p.scope_kind, p.scope_id,
    )


def _same_terms(a: Price, b: Price) -> bool:
    return _terms(a) == _terms(b)
