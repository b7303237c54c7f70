"""The consumers' work: each batch changes the read model in ONE database transaction, deduplicated by
measurement id and revision (charges) and by message id (ledger messages), so a batch replayed after a
crash changes nothing twice."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated
from uuid import UUID

import asyncpg
from pydantic import Field, RootModel

from services.api import repository as repo
from services.api.service import (
    TransactionRow,
    charge_rollups,
    entries_mirror,
    latest_changes,
    reversal_candidates,
    statement_row,
    transaction_amount,
    transaction_row,
    usage_org_hours,
)
from shared.contracts import ChargeComputed, StatementIssued, TransactionPosted

__all__ = ["LedgerMessage", "apply_charges", "apply_ledger"]

log = logging.getLogger(__name__)


class LedgerMessage(RootModel[Annotated[TransactionPosted | StatementIssued, Field(discriminator="schema_name")]]):
    """A message of ``ledger.transactions.v1``: a transaction or a statement, told apart by ``schema_name``."""


async def apply_charges(pool: asyncpg.Pool, charges: Sequence[ChargeComputed]) -> int:
    """Store the newer revisions and move the rollups of the customers they are attributed to; returns
    how many measurements changed."""
    if not charges:
        return 0
    async with pool.acquire() as conn, conn.transaction():
        orgs = {c.org_id for c in charges}
        await repo.lock_orgs(conn, orgs)
        stored = await repo.stored_charges(conn, sorted({c.measurement_id for c in charges}))
        moved = {s.org_id for s in stored.values()} - orgs
        if moved:
            # A revision that changed the org (rare): lock the old org too. Out of the global order, so a
            # deadlock is possible; PostgreSQL detects it and the consumer retries the batch.
            await repo.lock_orgs(conn, moved)
        changes = latest_changes(charges, stored)
        if not changes:
            return 0
        await repo.upsert_charges(conn, [new for _, new in changes])
        pairs = {(new.org_id, new.hour) for _, new in changes} | {(old.org_id, old.hour) for old, _ in changes if old}
        customer_of = await repo.customers_of(conn, pairs)
        await repo.apply_rollups(conn, charge_rollups(changes, customer_of))
        await repo.upsert_names(conn, *_names(charges))
        return len(changes)


def _names(
    charges: Sequence[ChargeComputed],
) -> tuple[dict[str, str], dict[str, tuple[str, str]], dict[str, tuple[str, str, str, str, str]]]:
    orgs: dict[str, str] = {}
    spaces: dict[str, tuple[str, str]] = {}
    resources: dict[str, tuple[str, str, str, str, str]] = {}
    for c in sorted(charges, key=lambda c: (c.priced_at, c.revision)):  # the latest names win
        if c.org_id:
            orgs[c.org_id] = c.org_name
        if c.space_id:
            spaces[c.space_id] = (c.space_name, c.org_id)
        resources[c.resource_id] = (c.resource_name, c.meter, c.resource_kind, c.space_id, c.org_id)
    return orgs, spaces, resources


async def apply_ledger(pool: asyncpg.Pool, messages: Sequence[TransactionPosted | StatementIssued]) -> int:
    """Store new transactions and statements, learn which customer each org belonged to in each hour
    from the usage lines, and attribute the charges waiting for that; returns transactions stored."""
    txns = [m for m in messages if isinstance(m, TransactionPosted)]
    statements = [m for m in messages if isinstance(m, StatementIssued)]
    async with pool.acquire() as conn, conn.transaction():
        await repo.insert_customers(conn, [m.customer_id for m in messages])
        rows: list[TransactionRow] = []
        for t in txns:  # in partition order: a reversal comes after its original
            original = await _original(conn, t, rows) if t.type == "reversal" else None
            rows.append(transaction_row(t, original))
        stored = await repo.insert_transactions(conn, rows)
        facts = usage_org_hours(txns)
        if facts:
            await repo.lock_orgs(conn, {f.org_id for f in facts})
            new, conflicts = await repo.insert_org_hours(conn, facts)
            for f in conflicts[:20]:
                log.warning(
                    "the ledger names a second customer for an org-hour; keeping the first",
                    extra={"org_id": f.org_id, "hour": f.hour.isoformat(), "customer_id": str(f.customer_id)},
                )
            if new:
                waiting = await repo.charges_at(conn, [(f.org_id, f.hour) for f in new])
                customer_of = {(f.org_id, f.hour): f.customer_id for f in new}
                await repo.apply_rollups(conn, charge_rollups(((None, c) for c in waiting), customer_of))
        if statements:
            await repo.upsert_statements(conn, [statement_row(s) for s in statements])
        return len(stored)


async def _original(
    conn: asyncpg.Connection, t: TransactionPosted, earlier: list[TransactionRow]
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
