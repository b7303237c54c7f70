"""``GET /internal/completeness?from=&to=``: what the collector holds per reading hour and meter, for the
api's completeness report (contract: ``shared.completeness``; rules: ``services/api/completeness.py``).

Per (hour, meter): measurements read and estimated, how many of them belong to readings the outbox marks
published, and whether the meter's run in that hour's reading succeeded. With them, the meters the
collector runs, the hour from which each must be read (``COLLECTOR_EXPECTED_SINCE``, or the meter's first
successful reading), and the current hour: hours before it have ended and are due.
"""

from __future__ import annotations

from datetime import datetime

from services.collector.service import Collector
from shared.clock import hour_floor, utcnow
from shared.completeness import CollectorCompleteness, CollectorCount

__all__ = ["facts"]


async def facts(
    collector: Collector, expected_since: datetime | None, since: datetime, until: datetime
) -> CollectorCompleteness:
    repo = collector.repo
    async with collector.pool.acquire() as conn:
        counts = await repo.completeness_counts(conn, since, until)
        runs = await repo.meter_runs_between(conn, since, until)
        first_ok = await repo.first_ok_hours(conn)
    items: dict[tuple[datetime, str], dict[str, object]] = {}
    for r in counts:
        items[(r["hour"], r["meter"])] = {"read": r["read"], "estimated": r["estimated"], "published": r["published"]}
    for r in runs:
        items.setdefault((r["hour"], r["meter"]), {})["meter_run"] = "ok" if r["ok"] else "failed"
    meters = [m.name for m in collector.meters]
    return CollectorCompleteness(
        meters=meters,
        expected_since={m: expected_since or first_ok.get(m) for m in meters},
        due_before=hour_floor(utcnow()),
        items=[CollectorCount(hour=h, meter=m, **v) for (h, m), v in sorted(items.items())],  # type: ignore[arg-type]
    )

