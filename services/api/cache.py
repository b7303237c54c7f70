"""A small in-process cache with a time to live, for the hot read path.

The read model is already eventually consistent (it trails the topics by the consumers' lag), so an
answer up to ``API_QUERY_CACHE_SECONDS`` (default 1 s) older than the read model is within what callers
can rely on anyway. Two things are cached per api process: who may see which customer (so a revoked
entitlement stops working within that time) and the bytes of usage answers (shared by every caller
allowed to see the customer; the access check always runs first). ``0`` turns it off.

The cache fills only when the first answer is ready, so identical queries that arrive together would each
compute it; ``SingleFlight`` makes them share the one computation that is under way.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight", "TtlCache"]

V = TypeVar("V")


class TtlCache(Generic[V]):
    def __init__(self, seconds: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._max = max_entries
        self._clock = clock
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        if self.seconds <= 0:
            return None
        hit = self._data.get(key)
        if hit is None:
            return None
        if self._clock() >= hit[0]:
            del self._data[key]
            return None
        return hit[1]

    def put(self, key: Hashable, value: V) -> None:
        if self.seconds <= 0:
            return
        self._data[key] = (self._clock() + self.seconds, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


class SingleFlight(Generic[V]):
    """Concurrent calls under the same key share one computation: the first starts it, the others await
    its result (or its exception). A caller that goes away (a client disconnecting) does not cancel it for
    the others; once it is done, the next call starts a new one."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._running)

    async def run(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(compute())
            self._running[key] = running
            running.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(running)

    def _finished(self, key: Hashable, done: asyncio.Future[V]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have gone away
