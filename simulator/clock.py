"""The simulated clock: the hour the CF world is observed at, per server and per request."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from simulator.foundation import to_hour

__all__ = ["SIM_TIME_HEADER", "SimClock", "format_time", "parse_time"]

SIM_TIME_HEADER = "x-sim-time"


def parse_time(value: str) -> datetime:
    """Parse ISO-8601 (``Z`` or an offset; a naive value is taken as UTC) and truncate to the hour."""
    text = value.strip()
    if not text:
        raise ValueError("empty time")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return to_hour(parsed)


def format_time(t: datetime) -> str:
    """``2026-10-01T05:00:00Z`` (second precision, UTC), as the CF API writes timestamps."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SimClock:
    """The server's current simulated hour, settable at runtime."""

    def __init__(self, start: datetime) -> None:
        self._now = to_hour(start)

    @property
    def now(self) -> datetime:
        return self._now

    def set(self, t: datetime) -> datetime:
        self._now = to_hour(t)
        return self._now

    def advance(self, hours: int) -> datetime:
        self._now += timedelta(hours=hours)
        return self._now

    def hour_for(self, headers: Mapping[str, str]) -> datetime:
        """The hour a request observes: its ``X-Sim-Time`` header if present, else ``now``.

        Raises ValueError for an unparseable header.
        """
        value = headers.get(SIM_TIME_HEADER)
        return self._now if value is None else parse_time(value)
