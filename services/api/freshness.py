"""How fresh the api's read model is: when each of its consumers last applied a batch.

The api answers from its read model, and keeps answering while Kafka is away; a client (and ``/readyz``)
then needs to know how old the answers may be. Each consumer records the time it committed a batch;
``Read-Model-Age`` on read responses is the whole seconds since the latest one. An idle pipeline looks the
same as a stalled one here (nothing to apply): the consumer lag metric tells them apart while Kafka answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

__all__ = ["HEADER", "Freshness"]

HEADER = "Read-Model-Age"


class Freshness:
    """The wall-clock time each read-model consumer (``source``) last applied a batch, in this process."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}

    def applied(self, source: str) -> None:
        self._last[source] = self._clock()

    def age_seconds(self) -> float | None:
        """Seconds since the latest batch of any consumer; None before the first one."""
        return self._clock() - max(self._last.values()) if self._last else None

    def header(self) -> dict[str, str]:
        age = self.age_seconds()
        return {} if age is None else {HEADER: str(int(age))}

    def details(self) -> dict[str, Any]:
        """The ``read_model`` field of ``/readyz``."""
        now = self._clock()

        def when(t: float | None) -> dict[str, Any]:
            if t is None:
                return {"last_batch_at": None, "age_seconds": None}
            at = datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
            return {"last_batch_at": at, "age_seconds": round(now - t, 3)}

        latest = max(self._last.values()) if self._last else None
        return {"read_model": {**when(latest), "consumers": {s: when(t) for s, t in sorted(self._last.items())}}}
