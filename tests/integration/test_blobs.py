"""Stored documents compressed against frames (shared/blobs.py) on a real database: a document comes back
byte for byte however it was stored; a frame is written once per scope even when two processes race; a
document stored in a transaction that rolled back still leaves a frame that later documents can use; a
process that never saw a frame reads documents that use it; a scope without a frame still stores."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest

from shared.blobs import ALONE, FRAMED, FrameMissingError, Frames, scope_of
from tests.conftest import Database

pytestmark = pytest.mark.integration

DDL = """
CREATE TABLE blob_frames (id bigint PRIMARY KEY, scope text NOT NULL UNIQUE, frame bytea NOT NULL);
CREATE TABLE docs (k int PRIMARY KEY, body bytea NOT NULL);
"""


@pytest.fixture
async def pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database.admin_dsn, min_size=1, max_size=4)
    assert p is not None
    await p.execute(DDL)
    try:
        yield p
    finally:
        await p.close()


def shard_document(hour: int, n: int = 200, changed: int = 0) -> bytes:
    """A document like a shard's from one hour to the next: the same resources, a few values changed."""
    ids = [str(uuid.UUID(bytes=hashlib.md5(str(i).encode()).digest())) for i in range(n)]  # random-looking
    values = [(i * 37 + hour * (i < changed)) % 4096 for i in range(n)]
    return orjson.dumps({"hour": hour, "r": ids, "v": values, "names": [f"app-{i}" for i in range(n)]})


async def test_documents_come_back_byte_for_byte_and_shrink_against_their_frame(pool: asyncpg.Pool) -> None:
    frames = Frames()
    scope = scope_of("cfapps", 3, datetime(2026, 12, 1, tzinfo=UTC))
    first = shard_document(0)
    await frames.ensure(pool, {scope: first})
    stored = [frames.pack(scope, shard_document(h, changed=5)) for h in range(1, 25)]
    assert all(s[0] == FRAMED for s in stored)
    alone = Frames().pack("no-frame", shard_document(1, changed=5))
    assert alone[0] == ALONE
    # Against the frame, an hour costs a small part of the same document compressed alone.
    assert max(len(s) for s in stored) * 4 < len(alone)
    reader = Frames()  # another process: it has never seen the frame
    assert await reader.unpack_all(pool, stored) == [shard_document(h, changed=5) for h in range(1, 25)]
    assert await reader.unpack_all(pool, [alone]) == [shard_document(1, changed=5)]


async def test_the_first_writer_of_a_scope_wins_and_everyone_uses_its_frame(pool: asyncpg.Pool) -> None:
    scope = "cfapps/0/2026-12"
    a, b = Frames(), Frames()
    await asyncio.gather(a.ensure(pool, {scope: b"seed of a" * 50}), b.ensure(pool, {scope: b"seed of b" * 50}))
    assert await pool.fetchval("SELECT count(*) FROM blob_frames WHERE scope = $1", scope) == 1
    late = Frames()
    await late.ensure(pool, {scope: b"a third seed, never stored"})
    docs = [x.pack(scope, b"a document " * 40) for x in (a, b, late)]
    framed = [d for d in docs if d[0] == FRAMED]
    # Whoever lost the race may store alone until it asks again; nobody uses a frame that is not the stored one.
    assert {d[1:9] for d in framed} <= {(await pool.fetchval("SELECT id FROM blob_frames")).to_bytes(8, "big")}
    assert late.pack(scope, b"x")[0] == FRAMED
    assert await Frames().unpack_all(pool, docs) == [b"a document " * 40] * 3


async def test_a_frame_outlives_the_transaction_that_first_needed_it(pool: asyncpg.Pool) -> None:
    frames = Frames()
    scope = "services/7/2026-11"
    async with pool.acquire() as conn:
        await frames.ensure(pool, {scope: shard_document(0)})  # before the transaction, on its own
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO docs VALUES (1, $1)", frames.pack(scope, shard_document(1)))
        await tx.rollback()
        await conn.execute("INSERT INTO docs VALUES (2, $1)", frames.pack(scope, shard_document(2)))
    [body] = [r["body"] for r in await pool.fetch("SELECT body FROM docs")]
    assert await Frames().unpack_all(pool, [body]) == [shard_document(2)]


async def test_a_document_whose_frame_is_gone_is_an_error_not_garbage(pool: asyncpg.Pool) -> None:
    frames = Frames()
    await frames.ensure(pool, {"m/1/2026-10": shard_document(0)})
    stored = frames.pack("m/1/2026-10", shard_document(3))
    await pool.execute("DELETE FROM blob_frames")
    with pytest.raises(FrameMissingError):
        await Frames().unpack_all(pool, [stored])
    with pytest.raises(ValueError, match="version byte"):
        Frames().unpack(b"{not stored}")
