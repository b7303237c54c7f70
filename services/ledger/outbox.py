"""Publishing what the ledger committed: every message is stored in the outbox table in the same database
transaction as its fact, published after the commit, then deleted. A crash in between leaves the row,
which the start-up flush and the periodic sweep publish again (readers deduplicate by message id)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import timedelta

import asyncpg

from services.ledger import repository as repo
from shared.clock import utcnow
from shared.kafka import Outgoing, Publisher
from shared.settings import ServiceSettings

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

SWEEP_BATCH = 2000


class Outbox:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, settings: ServiceSettings) -> None:
        self._pool = pool
        self._publisher = publisher
        self._settings = settings
        # Rows this process committed and has not seen acknowledged yet (a failed publish is retried with
        # the next flush; a crash leaves them to the sweep).
        self._pending: set[int] = set()
        self._lock = asyncio.Lock()  # one flush at a time: each publishes all that is pending, in id order
        self._behind: asyncio.Task[None] | None = None

    async def flush(self, ids: Iterable[int] = ()) -> int:
        """Publish the outbox rows ``ids`` (and any this process failed to publish before), then delete them.
        Raises when the broker does not acknowledge; the rows stay for the next attempt."""
        self._pending.update(ids)
        async with self._lock:
            if not self._pending:
                return 0
            wanted = sorted(self._pending)
            async with self._pool.acquire() as conn:
                rows = await repo.outbox_by_ids(conn, wanted)
                await self._publish(rows)
                await repo.delete_outbox(conn, wanted)
            self._pending.difference_update(wanted)
            return len(rows)

    async def flush_behind(self, ids: Iterable[int]) -> None:
        """Publish ``ids`` while the caller goes on: the consumer posts its next batch while the previous
        one's transactions are published (the rows are committed already, so nothing waits on Kafka's
        acknowledgement but their delivery). At most one such flush is under way: this first waits for the
        previous one. A failed flush is logged and its rows stay pending, for the next flush or the sweep."""
        await self.drain()
        self._pending.update(ids)
        self._behind = asyncio.create_task(self._flush_logged(), name="ledger-outbox-flush")

    async def drain(self) -> None:
        """Wait for the flush ``flush_behind`` started, if any (on stopping, or before the next)."""
        if self._behind is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._behind
            self._behind = None

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.warning("publishing committed messages failed; they stay in the outbox", exc_info=True)

    async def sweep(self, older_than_seconds: float) -> int:
        """Publish rows older than ``older_than_seconds`` (0: all), whoever committed them."""
        sent = 0
        while True:
            cutoff = utcnow() - timedelta(seconds=older_than_seconds)
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await repo.lock_stale_outbox(conn, cutoff, SWEEP_BATCH)
                if not rows:
                    return sent
                await self._publish(rows)
                await repo.delete_outbox(conn, [r["id"] for r in rows])
            self._pending.difference_update(r["id"] for r in rows)
            sent += len(rows)
            log.info("outbox swept", extra={"messages": len(rows)})

    async def _publish(self, rows: list[asyncpg.Record]) -> None:
        # One publish per topic, in commit order within it (keys keep each customer's order).
        by_topic: dict[str, list[Outgoing]] = {}
        for r in rows:
            by_topic.setdefault(r["topic"], []).append(Outgoing(key=r["key"], value=bytes(r["payload"])))
        for topic, messages in by_topic.items():
            await self._publisher.publish(self._settings.topic(topic), messages)
