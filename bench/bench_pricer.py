"""Benchmark of the pricer alone on the real Kafka and PostgreSQL (not a test).

Produces ``--count`` measurements to a fresh, prefixed set of topics, then starts the pricer as a
subprocess (``billing pricer``, as in production) on a fresh database, and measures:

- sustained measurements/s: from the first to the last offset the pricer committed (it commits a
  batch's offsets only after the charges are committed in PostgreSQL and acknowledged by Kafka),
- peak RSS of the pricer process (VmHWM from /proc) and its RSS over the run (flat or growing),
- the end-to-end time from start to the last commit (includes start-up and migrations).

Prints one JSON line and keeps it in bench/out/pricer.json. Needs the local stack (``make infra-up``;
``source deploy/local/env.sh`` for KAFKA_BOOTSTRAP_SERVERS and BILLING_PG_ADMIN_DSN). Target (issue 15):
300,000 measurements/s and under 500 MB, flat over a 10-minute run.

    .venv/bin/python -m bench.bench_pricer [--count 1000000] [--instances 1] [--batch 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ADMIN_DSN,
    KAFKA,
    ROOT,
    committed,
    drop_database,
    dsn,
    emit,
    free_port,
    fresh_database,
    fresh_topics,
    proc_status,
    produce,
    wait_ready,
)
from services.pricer import repository
from services.pricer.app import MIGRATIONS
from services.pricer.pricing import Price
from shared.batches import Item, encode_measurements, measurement_batches, shard_key
from shared.db import create_pool, migrate
from shared.ids import reading_id, uuid7
from shared.settings import ServiceSettings
from shared.topics import CHARGES, READINGS, delete_topics
from tests.support.processes import stop_all

# What the service runs with unless told otherwise (a batch of messages per transaction).
BATCH_DEFAULT: int = ServiceSettings.model_fields["batch_max_records"].default

START = datetime(2026, 3, 1, tzinfo=UTC)
KINDS = ["plan-small", "plan-medium", "plan-large"]



def measurements(count: int, resources: int, tally: dict[str, int]) -> Iterator[tuple[bytes, bytes]]:
    """``count`` valid measurements as usage.readings.v2 batches (one per hour, meter and shard, as the
    collector publishes them): ``resources`` resources over count/resources hours; 80% apps (MB), 20%
    service instances of three plans. Yields (key, value) pairs; counts messages and measurements in
    ``tally``."""
    produced = 0
    orgs = [str(uuid.UUID(int=i + 1)) for i in range(200)]
    hours = -(-count // resources)
    for h in range(hours):
        hour = START + timedelta(hours=h)
        n = min(resources, count - produced)
        by_meter: dict[tuple[str, str], list[Item]] = {}
        for r in range(n):
            app = r % 5 != 0
            meter, unit = ("cfapps", "MB") if app else ("cfservices", "instance")
            org = r % len(orgs)
            by_meter.setdefault((meter, unit), []).append(
                Item(str(uuid.UUID(int=(r + 1) << 64)), f"resource-{r}", orgs[org], f"org-{org}",
                     str(uuid.UUID(int=(r % 1000) + 7)), f"space-{r % 1000}", "" if app else KINDS[r % 3],
                     (r % 64 + 1) * 128 if app else 1)
            )
        produced += n
        rid = reading_id(hour)
        for (meter, unit), items in by_meter.items():
            for b in measurement_batches(
                hour, meter, unit, items, reading_id=rid, taken_at=hour + timedelta(seconds=90)
            ):
                tally["messages"] += 1
                tally["measurements"] += len(b.resource_id)
                yield shard_key(b.shard), encode_measurements(b)


def bench_prices() -> list[Price]:
    """The prices of the benchmark's meters and kinds, valid from 2026-01-01 on."""
    since, now = datetime(2026, 1, 1, tzinfo=UTC), datetime.now(UTC)
    prices = [Price(uuid7(), "cfapps", "", "MB-hour", 1_000_000, 730 * 1024, since, None, now)]
    prices += [
        Price(uuid7(), "cfservices", k, "instance-hour", (i + 1) * 5_000_000, 730, since, None, now)
        for i, k in enumerate(KINDS)
    ]
    return prices


async def prepare_database(dsn: str) -> None:
    """Migrate the pricer's schema and add the prices before the pricer starts, so that every
    measurement is priced on first sight (no re-pricing in the measured window)."""
    pool = await create_pool(dsn, "pricer")
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "pricer", MIGRATIONS)
            for p in bench_prices():
                await repository.insert_price(conn, p)
    finally:
        await pool.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kafka = KAFKA
    prefix = await fresh_topics()
    db = await fresh_database("bench_pricer")
    readings = prefix + READINGS
    result: dict[str, Any] = {"count": args.count, "instances": args.instances, "batch_max_records": args.batch}
    procs: list[subprocess.Popen[bytes]] = []
    log_files: list[Any] = []
    logs = Path(tempfile.mkdtemp(prefix="bench-pricer-"))
    result["logs"] = str(logs)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        tally = {"messages": 0, "measurements": 0}
        _, seconds = await produce(readings, measurements(args.count, args.resources, tally), chunk=200)
        result["generate_and_produce_s"] = round(seconds, 1)
        result.update(tally)
        per_message = tally["measurements"] / tally["messages"]

        pricer_dsn = dsn(db, "pricer")
        await prepare_database(pricer_dsn)
        ports = [free_port() for _ in range(args.instances)]
        billing = shutil.which("billing", path=str(ROOT / ".venv" / "bin")) or str(ROOT / ".venv" / "bin" / "billing")
        started = time.perf_counter()
        for port in ports:
            env = {
                **os.environ,
                "PRICER_DATABASE_URL": pricer_dsn,
                "KAFKA_BOOTSTRAP_SERVERS": kafka,
                "KAFKA_TOPIC_PREFIX": prefix,
                "PRICER_PORT": str(port),
                "PRICER_BATCH_MAX_RECORDS": str(args.batch),
                "PRICER_LOG_LEVEL": "WARNING",
            }
            # Logs to a file: an unread pipe would fill up and stall the pricer.
            log_file = open(logs / f"pricer-{port}.log", "wb")  # noqa: SIM115 - closed with the process
            log_files.append(log_file)
            procs.append(
                subprocess.Popen([billing, "pricer"], env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
            )
        for port, proc in zip(ports, procs, strict=True):
            await wait_ready(port, proc, "pricer")

        first_t: float | None = None
        first_n = last_n = 0
        last_t = started
        rss_samples: list[int] = []
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"pricer exited with {proc.returncode}; see {logs}")
            n = await committed(admin, prefix + "pricer", readings)
            now = time.perf_counter()
            if n > 0 and first_t is None:
                first_t, first_n = now, n
            if n != last_n:
                last_n, last_t = n, now
            rss_samples.append(sum(proc_status(p.pid).get("VmRSS", 0) for p in procs))
            if n >= tally["messages"]:
                break
            if now - started > args.timeout:
                raise RuntimeError(f"timed out with {n} of {tally['messages']} messages committed")
            await asyncio.sleep(0.25)
        peak = [proc_status(p.pid).get("VmHWM", 0) for p in procs]
        if first_t is None:
            first_t = started
        elapsed = last_t - first_t
        tenth = max(1, len(rss_samples) // 10)
        result.update(
            # Offsets count messages; the batches are of one size but for the last of each hour, so the
            # measurements committed are the messages times the mean batch size.
            sustained_measurements_per_s=round((last_n - first_n) * per_message / elapsed) if elapsed > 0 else None,
            measured_window_s=round(elapsed, 2),
            end_to_end_s=round(last_t - started, 2),
            peak_rss_mb=[round(p / 2**20, 1) for p in peak],
            # Total RSS of the pricer processes, the largest sample in each tenth of the run: flat or growing.
            rss_mb_by_tenth=[round(max(rss_samples[i : i + tenth]) / 2**20) for i in range(0, len(rss_samples), tenth)][
                :10
            ],
        )
        conn = await asyncpg.connect(ADMIN_DSN.rsplit("/", 1)[0] + f"/{db}")
        try:
            result["charges_stored"] = await conn.fetchval("SELECT sum(items) FROM pricer.charge_batches")
            result["charge_batches_stored"] = await conn.fetchval("SELECT count(*) FROM pricer.charge_batches")
        finally:
            await conn.close()
        end_offsets = await _end_offsets(kafka, prefix + CHARGES)
        result["charge_batches_published"] = end_offsets
        return result
    finally:
        stop_all(procs, grace=60)
        for f in log_files:
            f.close()
        if all(f.stat().st_size == 0 for f in logs.iterdir()):
            shutil.rmtree(logs, ignore_errors=True)
            result.pop("logs", None)
        await admin.close()
        if not args.keep:
            await drop_database(db)
            await delete_topics(kafka, prefix=prefix)


async def _end_offsets(kafka: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=None)
    await consumer.start()
    try:
        parts = [
            TopicPartition(topic, p)
            for p in (consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))
        ]
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, topic: str) -> set[int]:
    await consumer.topics()
    return set(consumer.partitions_for_topic(topic) or range(12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000, help="measurements to price")
    parser.add_argument("--resources", type=int, default=10_000, help="resources per hour")
    parser.add_argument("--instances", type=int, default=1, help="pricer processes in the group")
    parser.add_argument(
        "--batch",
        type=int,
        default=BATCH_DEFAULT,
        help=f"PRICER_BATCH_MAX_RECORDS (messages of ~200 measurements; default: the service's, {BATCH_DEFAULT})",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the database and topics")
    args = parser.parse_args()
    emit(asyncio.run(run(args)), "pricer")


if __name__ == "__main__":
    main()
