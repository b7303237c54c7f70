"""SQL of the command journal (``shared/commands.py``): the ``audit_log`` and ``idempotency_keys`` tables
that each owning service (collector, pricer, ledger) has in its own schema (migrations ``*_commands.sql``).
Unqualified names: a service's connections work in its schema (``shared.db.create_pool``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from shared.db import Conn

__all__ = [
    "AuditRow",
    "KeyRow",
    "complete_key",
    "delete_expired_keys",
    "insert_audit",
    "list_audit",
    "reserve_key",
]


@dataclass(frozen=True, slots=True)
class AuditRow:
    """What one command request did (``audit_log``); ``body`` is the JSON text of the body, or None."""

    recorded_at: datetime
    actor: str
    kind: str
    method: str
    path: str
    body_digest: str | None
    body: str | None
    status: int
    problem_type: str | None
    problem_title: str | None
    idempotency_key: str | None
    replay: bool


@dataclass(frozen=True, slots=True)
class KeyRow:
    """An Idempotency-Key in use; ``status`` None while its first request runs."""

    request_digest: str
    kind: str
    created_at: datetime
    status: int | None
    content_type: str | None
    location: str | None
    body: bytes | None


async def delete_expired_keys(conn: Conn, cutoff: datetime) -> int:
    """Forget the keys created before ``cutoff``; returns how many."""
    done: str = await conn.execute("DELETE FROM idempotency_keys WHERE created_at < $1", cutoff)
    return int(done.split()[-1])


async def reserve_key(
    conn: Conn, actor: str, key: str, digest: str, kind: str, now: datetime, cutoff: datetime
) -> KeyRow | None:
    """Insert ``(actor, key)`` as running and return None; or, if the key is in use (and not older than
    ``cutoff``), return its row and insert nothing. Commit before running the command: a concurrent
    request with the same key waits on the insert, then finds the row."""
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE actor = $1 AND key = $2 AND created_at < $3", actor, key, cutoff
    )
    inserted = await conn.fetchval(
        """INSERT INTO idempotency_keys (actor, key, request_digest, kind, created_at)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (actor, key) DO NOTHING RETURNING true""",
        actor, key, digest, kind, now,
    )
    if inserted:
        return None
    row = await conn.fetchrow(
        """SELECT request_digest, kind, created_at, status, content_type, location, body
           FROM idempotency_keys WHERE actor = $1 AND key = $2""",
        actor, key,
    )
    if row is None:  # deleted between the two statements (a cleanup): reserve it again
        return await reserve_key(conn, actor, key, digest, kind, now, cutoff)
    return KeyRow(
        row["request_digest"], row["kind"], row["created_at"], row["status"], row["content_type"], row["location"],
        None if row["body"] is None else bytes(row["body"]),
    )


async def complete_key(
    conn: Conn,
    actor: str,
    key: str,
    now: datetime,
    status: int,
    content_type: str | None,
    location: str | None,
    body: bytes,
) -> None:
    """Store the answer of the key's first request (its replay from now on)."""
    await conn.execute(
        """UPDATE idempotency_keys SET completed_at = $3, status = $4, content_type = $5, location = $6, body = $7
           WHERE actor = $1 AND key = $2""",
        actor, key, now, status, content_type, location, body,
    )


async def insert_audit(conn: Conn, row: AuditRow) -> int:
    """Append one entry; returns its id."""
    new_id: int = await conn.fetchval(
        """INSERT INTO audit_log (recorded_at, actor, kind, method, path, body_digest, body, status, problem_type,
                                  problem_title, idempotency_key, replay)
           VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12) RETURNING id""",
        row.recorded_at, row.actor, row.kind, row.method, row.path, row.body_digest, row.body, row.status,
        row.problem_type, row.problem_title, row.idempotency_key, row.replay,
    )
    return new_id


async def list_audit(
    conn: Conn,
    *,
    actor: str | None,
    kind: str | None,
    since: datetime | None,
    until: datetime | None,
    before: tuple[datetime, int] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Entries newest first ((recorded_at, id) descending), filtered; ``before`` is the position of the
    last entry of the previous page. ``since`` inclusive, ``until`` exclusive."""
    rows = await conn.fetch(
        """SELECT id, recorded_at, actor, kind, method, path, body_digest, body::text AS body, status,
                  problem_type, problem_title, idempotency_key, replay
           FROM audit_log
           WHERE ($1::text IS NULL OR actor = $1)
             AND ($2::text IS NULL OR kind = $2)
             AND ($3::timestamptz IS NULL OR recorded_at >= $3)
             AND ($4::timestamptz IS NULL OR recorded_at < $4)
             AND ($5::timestamptz IS NULL OR (recorded_at, id) < ($5, $6::bigint))
           ORDER BY recorded_at DESC, id DESC
           LIMIT $7""",
        actor, kind, since, until, before[0] if before else None, before[1] if before else None, limit,
    )
    out = []
    for r in rows:
        item = dict(r)
        item["body"] = None if r["body"] is None else orjson.loads(r["body"])
        out.append(item)
    return out
