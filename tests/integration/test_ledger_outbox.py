"""The ledger's outbox published behind the consumer (``Outbox.flush_behind``): committed rows are
published in id order, one flush at a time, and a flush that fails leaves its rows for the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from services.ledger import repository as repo
from services.ledger.outbox import Outbox
from shared.kafka import Outgoing
from tests.support.ledger import LedgerDB, ledger_db  # noqa: F401  (fixture)


class _Recorder:
    """Records what it is asked to publish; refuses while ``down`` (the broker away). Slow on purpose, so
    two flushes would overlap if the outbox let them."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.down = False
        self.running = 0
        self.overlapped = False

    async def publish(self, topic: str, messages: Iterable[Outgoing]) -> int:
        self.running += 1
        self.overlapped |= self.running > 1
        try:
            await asyncio.sleep(0.01)
            if self.down:
                raise ConnectionError("broker away")
            batch = [m.value for m in messages]
            self.sent += batch
            return len(batch)
        finally:
            self.running -= 1


async def _commit(db: LedgerDB, *payloads: bytes) -> list[int]:
    async with db.pool.acquire() as conn, conn.transaction():
        return await repo.insert_outbox(conn, [("ledger.transactions.v1", b"k", p) for p in payloads])


async def test_flushes_behind_publish_in_order_and_a_failed_one_is_retried(ledger_db: LedgerDB) -> None:
    publisher = _Recorder()
    outbox = Outbox(ledger_db.pool, publisher, ledger_db.settings)  # type: ignore[arg-type]
    await outbox.flush_behind(await _commit(ledger_db, b"1", b"2"))
    await outbox.flush_behind(await _commit(ledger_db, b"3"))  # waits for the first
    await outbox.drain()
    publisher.down = True
    await outbox.flush_behind(await _commit(ledger_db, b"4"))
    await outbox.drain()
    assert publisher.sent == [b"1", b"2", b"3"]
    assert await ledger_db.fetchval("SELECT count(*) FROM outbox") == 1  # "4" kept, not lost
    publisher.down = False
    await asyncio.gather(outbox.flush_behind(await _commit(ledger_db, b"5")), outbox.flush())
    await outbox.drain()
    assert publisher.sent == [b"1", b"2", b"3", b"4", b"5"]
    assert not publisher.overlapped
    assert await ledger_db.fetchval("SELECT count(*) FROM outbox") == 0
