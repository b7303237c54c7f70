"""The consumers' work: each batch changes the read model in ONE database transaction, deduplicated per
measurement by revision (charges, kept per shard: ``services/api/charges.py``) and by message id (ledger
messages), so a batch replayed after a crash changes nothing twice.

The charges consumer and the ledger consumer serialise per reading hour (``repository.lock_hours``): a
charge whose org's customer is not known yet changes only its shard's document; the ledger's usage line
that first names the org's customer for that hour adds the org's charges of the hour, read from the shard
documents, to the rollups. Nothing is stored twice: the documents are the one copy of the charges, and a
shard's document is read again only when a batch changes it or its hour's orgs get their customers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated
from uuid import UUID

import asyncpg
from pydantic import Field, RootModel

from services.api import repository as repo
from services.api.charges import ResourceDoc, Rollup, ShardDoc, contributions
from services.api.service import (
    TransactionRow,
    entries_mirror,
    reversal_candidates,
    statement_row,
    transaction_amount,
    transaction_row,
    usage_org_hours,
)
from shared.batches import Charges, ShardKey, encode_charges
from shared.blobs import Frames, shard_scope
from shared.contracts import StatementIssued, TransactionPosted
from shared.db import Conn

__all__ = ["LedgerMessage", "Names", "Projector"]

log = logging.getLogger(__name__)

# The per-resource documents (usage_resource_day) are rewritten whole as hours are attributed, each rewrite
# leaving the old copy's TOAST chunks dead. At a steady hourly load autovacuum frees them long before the next
# rewrite; a burst (a backfill, `make demo`'s month in two minutes, a re-rating) rewrites them faster than
# autovacuum's minute-long naptime comes round, and the dead copies pile up in the table's file for good (a
# vacuum afterwards marks the space free but gives none of it back): 30 MB of chunks for 1 MB of documents
# after the demo. So the projector vacuums that table itself once this many bytes of documents (their JSON,
# before compression) were rewritten: the freed chunks are then reused by the next rewrites and the table
# stays a few times its documents' size. A vacuum of it takes milliseconds and blocks no reader or writer.
VACUUM_AFTER_BYTES = 2 << 20


class LedgerMessage(RootModel[Annotated[TransactionPosted | StatementIssued, Field(discriminator="schema_name")]]):
    """A message of ``ledger.transactions.v1``: a transaction or a statement, told apart by ``schema_name``."""


class Names:
    """The display names written last, remembered per shard, so that a batch writes only the names that
    changed (a foundation's names rarely do, and every batch carries them)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], tuple[object, ...]] = {}

    @staticmethod
    def _signature(c: Charges) -> tuple[object, ...]:
        return (c.orgs, c.spaces, c.kinds, c.resource_id, c.resource_name, c.org, c.space, c.kind)

    def changed(
        self, batches: Sequence[Charges]
    ) -> tuple[dict[str, str], dict[str, tuple[str, str]], dict[str, tuple[str, str, str, str, str]]]:
        orgs: dict[str, str] = {}
        spaces: dict[str, tuple[str, str]] = {}
        resources: dict[str, tuple[str, str, str, str, str]] = {}
        for c in sorted(batches, key=lambda c: c.priced_at):  # the latest names win
            if self._seen.get((c.meter, c.shard)) == self._signature(c):
                continue  # the same resources with the same names as this shard's last batch
            for o in c.orgs:
                if o.id:
                    orgs[o.id] = o.name
            org_ids = [o.id for o in c.orgs]
            for i, rid in enumerate(c.resource_id):
                org_id, space = org_ids[c.org[i]], c.spaces[c.space[i]]
                if space.id:
                    spaces[space.id] = (space.name, org_id)
                resources[rid] = (c.resource_name[i], c.meter, c.kinds[c.kind[i]], space.id, org_id)
        return orgs, spaces, resources

    def written(self, batches: Sequence[Charges]) -> None:
        """Remember what a committed transaction wrote."""
        if len(self._seen) > 100_000:
            self._seen.clear()
        for c in batches:
            self._seen[(c.meter, c.shard)] = self._signature(c)


class Projector:
    """The read model's two consumers (and the names this process wrote, remembered between batches)."""

    def __init__(self, pool: asyncpg.Pool, vacuum_after_bytes: int = VACUUM_AFTER_BYTES) -> None:
        self.pool = pool
        self.vacuum_after_bytes = vacuum_after_bytes
        self._rewritten = 0  # bytes of per-resource documents rewritten since the last vacuum
        self._vacuuming: asyncio.Task[None] | None = None
        self.names = Names()
        self.frames = Frames()  # the shard documents' compression frames (shared/blobs.py), for this database
        # Called with the statements of a batch in its transaction (the api enqueues their webhook deliveries).
        self.on_statements: Callable[[Conn, Sequence[StatementIssued]], Awaitable[None]] | None = None

    async def apply_charges(
        self, batches: Sequence[Charges], conflicts: list[tuple[int, int, str]] | None = None
    ) -> int:
        """Store the newer revisions and move the rollups of the customers they are attributed to (the
        charges of orgs whose customer is not known yet wait in their documents); returns how many
        measurements changed. Items of a revision stored with other content change nothing and are added
        to ``conflicts`` as (batch position, item position, reason), for the DLQ."""
        if not batches:
            return 0
        changed = 0
        # a shard's first batch of a month seeds its frame
        await self.frames.ensure_first(self.pool, batches, shard_scope, encode_charges)
        async with self.pool.acquire() as conn, conn.transaction():
            await repo.lock_hours(conn, {c.reading_hour for c in batches})
            keys = {ShardKey(c.reading_hour, c.meter, c.shard) for c in batches}
            stored = await repo.lock_charge_shards(conn, self.frames, keys)
            docs: dict[ShardKey, ShardDoc] = {k: ShardDoc.load(raw) for k, raw in stored.items()}
            pairs = {(o.id, c.reading_hour) for c in batches for o in c.orgs}
            pairs |= {(o, k.reading_hour) for k, d in docs.items() for o in d.orgs}
            customer_of = await repo.customers_of(conn, pairs)
            rollup = Rollup()

            def add(key: ShardKey, doc: ShardDoc, positions: Sequence[int] | None, sign: int) -> None:
                for org, part in contributions(doc, positions, sign).items():
                    customer = customer_of.get((doc.orgs[org], key.reading_hour))
                    if customer is not None:
                        rollup.add_part(key, doc, customer, org, part)

            written: dict[ShardKey, ShardDoc] = {}
            refused: list[tuple[int, int, str]] = []
            for n, c in enumerate(batches):
                key = ShardKey(c.reading_hour, c.meter, c.shard)
                doc = docs.get(key)
                if doc is None:
                    doc = docs[key] = ShardDoc.of(c)
                    add(key, doc, None, +1)
                    changed += len(doc)
                else:
                    before = doc.copy()
                    found: list[tuple[int, str]] = []
                    replaced, positions = doc.merge(c, found)
                    refused.extend((n, i, why) for i, why in found)
                    if not positions:
                        continue
                    changed += len(positions)
                    add(key, before, replaced, -1)
                    add(key, doc, positions, +1)
                written[key] = doc
            await repo.remember_price_models(
                conn, {p.id: p.model for c in batches for p in c.prices if p.model != "flat"}
            )
            await repo.save_charge_shards(conn, self.frames, [(k, d.dump()) for k, d in written.items()])
            rewritten = await _write_rollups(conn, rollup)
            new_names = self.names.changed(batches)
            await repo.upsert_names(conn, *new_names)
        self.names.written(batches)
        if conflicts is not None:
            conflicts.extend(refused)
        self._rewrote(rewritten)
        return changed

    def _rewrote(self, nbytes: int) -> None:
        """Count rewritten document bytes (after the commit); when enough were, vacuum their table in the
        background (the consumer does not wait for it; one vacuum at a time)."""
        self._rewritten += nbytes
        if self._rewritten < self.vacuum_after_bytes or self._vacuuming is not None:
            return
        self._rewritten = 0
        self._vacuuming = asyncio.create_task(self._vacuum())

    async def _vacuum(self) -> None:
        try:
            async with self.pool.acquire() as conn:
                # SKIP_LOCKED: another instance vacuuming it now does the same work
                await conn.execute("VACUUM (SKIP_LOCKED) usage_resource_day")
        except Exception:  # the database away, the pool closing: the next rewrites try again
            log.warning("vacuuming the per-resource documents failed", exc_info=True)
        finally:
            self._vacuuming = None

    async def vacuumed(self) -> None:
        """Wait for the vacuum under way, if any (tests; a stopping api)."""
        task = self._vacuuming
        if task is not None:
            await task

    async def apply_ledger(self, messages: Sequence[TransactionPosted | StatementIssued]) -> int:
        """Store new transactions and statements, learn which customer each org belonged to in each hour
        from the usage lines, and attribute the charges waiting for that; returns transactions stored."""
        txns = [m for m in messages if isinstance(m, TransactionPosted)]
        statements = [m for m in messages if isinstance(m, StatementIssued)]
        rewritten = 0
        async with self.pool.acquire() as conn, conn.transaction():
            await repo.insert_customers(conn, [m.customer_id for m in messages])
            rows: list[TransactionRow] = []
            for t in txns:  # in partition order: a reversal comes after its original
                original = await _original(conn, t, rows) if t.type == "reversal" else None
                rows.append(transaction_row(t, original))
            stored = await repo.insert_transactions(conn, rows)
            facts = usage_org_hours(txns)
            if facts:
                await repo.lock_hours(conn, {f.hour for f in facts})
                new, conflicts = await repo.insert_org_hours(conn, facts)
                for f in conflicts[:20]:
                    log.warning(
                        "the ledger names a second customer for an org-hour; keeping the first",
                        extra={"org_id": f.org_id, "hour": f.hour.isoformat(), "customer_id": str(f.customer_id)},
                    )
                if new:
                    rewritten = await _attribute(conn, {(f.org_id, f.hour): f.customer_id for f in new})
            if statements:
                await repo.upsert_statements(conn, [statement_row(s) for s in statements])
                if self.on_statements is not None:
                    await self.on_statements(conn, statements)
        self._rewrote(rewritten)
        return len(stored)


async def _attribute(conn: Conn, customer_of: dict[tuple[str, datetime], UUID]) -> int:
    """Add to the rollups the charges of (org, hour) pairs whose customer was just learned: read from the
    shard documents of those hours (the charges consumer, which serialises with this per hour, added none
    of them while the customer was unknown); returns the bytes of per-resource documents rewritten."""
    rollup = Rollup()
    for key, raw in (await repo.charge_shards_at(conn, {hour for _, hour in customer_of})).items():
        doc = ShardDoc.load(raw)
        customers = [customer_of.get((org, key.reading_hour)) for org in doc.orgs]
        if not any(customers):
            continue
        positions = [i for i, o in enumerate(doc.o) if customers[o] is not None]
        for org, part in contributions(doc, positions).items():
            rollup.add_part(key, doc, customers[org], org, part)  # type: ignore[arg-type]
    return await _write_rollups(conn, rollup)


async def _write_rollups(conn: Conn, rollup: Rollup) -> int:
    """Apply ``rollup``; returns the bytes of per-resource documents rewritten."""
    if not rollup:
        return 0
    rewritten = 0
    await repo.apply_group_rollups(conn, rollup.groups())
    for period, changes in rollup.resource_changes().items():
        stored = await repo.lock_resource_docs(conn, period, changes)
        docs = []
        for key, entries in changes.items():
            raw = stored.get(key)
            doc = ResourceDoc.load(raw) if raw is not None else ResourceDoc()
            doc.add(entries)
            docs.append((key, doc.dump()))
            rewritten += len(docs[-1][1]) if raw is not None else 0
        await repo.save_resource_docs(conn, period, docs)
    return rewritten


async def _original(
    conn: Conn, t: TransactionPosted, earlier: list[TransactionRow]
) -> tuple[UUID, str, int] | None:
    """The transaction a reversal takes back: the one it names (by id), else the newest one of the same
    customer whose entries it mirrors and that nothing reversed yet."""
    in_batch = {r.transaction_id: r for r in earlier if r.customer_id == t.customer_id}
    named = reversal_candidates(t)
    for cid in named:
        if cid in in_batch:
            r = in_batch[cid]
            return r.transaction_id, r.bucket, r.signed_amount
    found = await repo.transactions_by_id(conn, t.customer_id, named)
    for cid in named:
        if cid in found:
            return found[cid]
    amount = transaction_amount(t.entries)
    reversed_now = {r.reverses for r in earlier if r.reverses is not None}
    for r in reversed(earlier):
        if (
            r.customer_id == t.customer_id
            and r.bucket != "none"
            and r.amount == amount
            and r.transaction_id not in reversed_now
            and entries_mirror(r.entries, t.entries)
        ):
            return r.transaction_id, r.bucket, r.signed_amount
    for rec in await repo.unreversed_with_amount(conn, t.customer_id, amount):
        if rec["transaction_id"] not in reversed_now and entries_mirror(repo.json_value(rec["entries"]), t.entries):
            return rec["transaction_id"], rec["bucket"], rec["signed_amount"]
    return None
