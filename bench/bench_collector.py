"""Benchmark: one reading of a large foundation — read from the simulator over HTTP, persist, publish.

Target (issue 3): under 10 s and under 300 MB peak for 50,000 resources on the 2-core machine.
Runs the simulator as a separate process (as in production, CF is another machine's work) and the
collector in this process, whose peak RSS is reported.

    .venv/bin/python -m bench.bench_collector [--apps 40000 --services 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx

from bench.common import KAFKA, ROOT, drop_database, dsn, emit, fresh_database, fresh_topics, peak_rss_mb
from services.collector.app import MIGRATIONS
from services.collector.cf_client import CFClient
from services.collector.service import Collector
from shared.db import create_pool, migrate
from shared.kafka import Publisher
from shared.topics import READINGS, delete_topics

HOUR = datetime(2026, 10, 2, 12, tzinfo=UTC)


async def main(apps: int, services: int, orgs: int, port: int) -> None:
    sim = subprocess.Popen(
        [str(ROOT / ".venv/bin/billing"), "sim", "--port", str(port), "--apps", str(apps), "--services", str(services),
         "--orgs", str(orgs), "--spaces-per-org", "5", "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )
    db = await fresh_database("bench_collector")
    prefix = await fresh_topics()
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(300):
                try:
                    if (await c.get(f"{url}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            expected = len(
                (await c.get(f"{url}/sim/expected", params={"hour": HOUR.isoformat()}, timeout=60)).json()[
                    "measurements"
                ]
            )
        pool = await create_pool(dsn(db, "collector"), "collector", max_size=4)
        async with pool.acquire() as conn:
            await migrate(conn, "collector", MIGRATIONS)
        publisher = Publisher(KAFKA, client_id="bench-collector")
        await publisher.start()
        cf = CFClient(url, url, "billing-collector", "sim-secret", per_page=5000, timeout=120)
        collector = Collector(pool, cf, publisher, prefix + READINGS, sim_time=True)
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        outcome = await collector.take_reading(HOUR)
        elapsed = time.perf_counter() - t0
        await cf.close()
        await publisher.stop()
        owed = await pool.fetchval("SELECT count(*) FROM reading_outbox")
        await pool.close()
        assert outcome.measurements == expected, (outcome.measurements, expected)
        assert outcome.published > 0 and owed == 0, (outcome.published, owed)  # every batch stored went out
        emit(
            {
                "resources_measured": outcome.measurements,
                "messages_published": outcome.published,
                "seconds": round(elapsed, 2),
                "phases_s": outcome.seconds,
                "measurements_per_s": round(outcome.measurements / elapsed),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "rss_before_reading_mb": round(rss_before, 1),
                "cf_requests": cf.requests,
                "target": {"seconds": 10, "peak_rss_mb": 300},
            },
            "collector",
        )
    finally:
        sim.terminate()
        sim.wait(10)
        await drop_database(db)
        await delete_topics(KAFKA, prefix=prefix)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--apps", type=int, default=52_000)
    p.add_argument("--services", type=int, default=15_000)
    p.add_argument("--orgs", type=int, default=60)
    p.add_argument("--port", type=int, default=8095)
    a = p.parse_args()
    asyncio.run(main(a.apps, a.services, a.orgs, a.port))
    sys.exit(0)
