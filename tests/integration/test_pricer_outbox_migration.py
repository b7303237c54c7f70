"""Migration 007 of the pricer moves the outbox of charge batches out of the batch rows: a database that has
batches stored unpublished before it keeps them to publish (their keys in ``unpublished_batches``), and the
published ones stay published. After it, storing a re-priced batch never rewrites the batch row: it is
written once, and publishing deletes only its key."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.pricer import repository
from services.pricer.app import MIGRATIONS
from shared.batches import ShardKey
from shared.blobs import Frames
from shared.db import create_pool, migrate

HOUR = datetime(2026, 3, 2, 5, tzinfo=UTC)


async def test_batches_stored_unpublished_before_the_migration_are_still_published_after_it(
    database: Any, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for f in sorted(MIGRATIONS.glob("*.sql")):
        if f.name < "007":
            shutil.copy(f, before / f.name)
    pool = await create_pool(database.dsn("pricer"), "pricer")
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "pricer", before)
            await conn.executemany(
                """INSERT INTO charge_batches (reading_hour, meter, shard, seq, items, d_priced, d_unpriced,
                                               d_revisions, published, message)
                   VALUES ($1, 'cfapps', $2, $3, 1, 1, 0, 1, $4, $5)""",
                [(HOUR, 0, 1, True, Frames().pack("old", b'{"old":1}')),
                 (HOUR, 0, 2, False, Frames().pack("old", b'{"old":2}')),
                 (HOUR + timedelta(hours=1), 3, 1, True, Frames().pack("old", b'{"old":3}'))],
            )
            assert await migrate(conn, "pricer", MIGRATIONS) == ["007_unpublished_batches"]
            columns = {r["attname"] for r in await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'charge_batches'::regclass AND NOT attisdropped"
            )}
            outbox = [tuple(r) for r in await conn.fetch(
                "SELECT reading_hour, meter, shard, seq FROM unpublished_batches"
            )]
            assert "published" not in columns
            assert outbox == [(HOUR, "cfapps", 0, 2)]

            # A batch stored unpublished now: its key joins the outbox; marking it published deletes the
            # key and leaves the batch row as it was written (no new row version).
            frames = Frames(table="blob_frames")
            key = ShardKey(HOUR, "cfapps", 5)
            await repository.insert_batches(conn, frames, [(key, 1, 1, 1, 0, 1, False, b'{"x":1}')])
            written = await conn.fetchval(
                "SELECT xmin::text FROM charge_batches WHERE (reading_hour, meter, shard, seq) = ($1, 'cfapps', 5, 1)",
                HOUR,
            )
            async with conn.transaction():
                taken = await repository.take_unpublished(conn, frames, limit=10)
                assert [(k, seq) for k, seq, _ in taken] == [(ShardKey(HOUR, "cfapps", 0), 2), (key, 1)]
                assert [m for _, _, m in taken] == [b'{"old":2}', b'{"x":1}']
                await repository.mark_published(conn, [(k, seq) for k, seq, _ in taken])
            assert await conn.fetchval("SELECT count(*) FROM unpublished_batches") == 0
            assert await conn.fetchval("SELECT count(*) FROM charge_batches") == 4
            assert written == await conn.fetchval(
                "SELECT xmin::text FROM charge_batches WHERE (reading_hour, meter, shard, seq) = ($1, 'cfapps', 5, 1)",
                HOUR,
            )
    finally:
        await pool.close()
