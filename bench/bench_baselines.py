"""The limits and the alternative, on the same rows and the same machine:

- Kafka's own producer performance tool (``org.apache.kafka.tools.ProducerPerformance``), records of the
  size of our readings batches (usage.readings.v2), acks=all and idempotence as our producer: the
  broker's limit, in messages and in the measurements they carry;
- PostgreSQL ``COPY`` of the same measurement rows into a table with a uuid primary key: the database's;
- one set-based SQL statement that prices and posts the whole month (the reference system's approach):
  floor(sum(value × price / unit)) per customer, month and price, from a measurements table.

    .venv/bin/python -m bench.bench_baselines --resources 10000 --hours 744
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import time
from datetime import timedelta

import asyncpg

from bench.bench_e2e import APP_PRICE, HOUR, PLAN_PRICES, START, World
from bench.common import KAFKA, ROOT, drop_database, dsn, emit, fresh_database, fresh_topics
from shared.topics import READINGS, delete_topics


def producer_perf(topic: str, records: int, size: int) -> float:
    libs = ROOT / ".local" / "kafka" / "libs"
    out = subprocess.run(
        [
            "java",
            "-Xmx1g",
            "-cp",
            f"{libs}/*",
            f"-Dlog4j2.configurationFile={ROOT / '.local/kafka/log4j2.properties'}",
            "org.apache.kafka.tools.ProducerPerformance",
            "--topic",
            topic,
            "--num-records",
            str(records),
            "--record-size",
            str(size),
            "--throughput",
            "-1",
            "--producer-props",
            f"bootstrap.servers={KAFKA}",
            "acks=all",
            "enable.idempotence=true",
            "linger.ms=5",
            "batch.size=524288",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    ).stdout
    m = re.findall(r"([\d.]+) records/sec", out)
    if not m:
        raise RuntimeError(f"ProducerPerformance printed no rate: {out[-500:]}")
    return float(m[-1])


async def main(n_resources: int, n_hours: int) -> None:
    world = World(n_resources)
    total = n_resources * n_hours
    prefix = await fresh_topics()
    batches = world.messages(START)
    size = round(sum(len(m.value) for m in batches) / len(batches))
    per_message = n_resources / len(batches)
    messages = round(total / per_message)
    try:
        kafka_rate = producer_perf(prefix + READINGS, messages, size)
    finally:
        await delete_topics(KAFKA, prefix=prefix)

    db = await fresh_database("bench_baselines")
    try:
        conn = await asyncpg.connect(dsn(db, "pricer"))
        await conn.execute("""
            CREATE TABLE measurements (id uuid PRIMARY KEY, hour timestamptz NOT NULL, meter text NOT NULL,
              resource_id text NOT NULL, resource_kind text NOT NULL, org_id text NOT NULL, value bigint NOT NULL);
            CREATE TABLE prices (meter text, resource_kind text, microcredits_per_unit bigint, unit bigint,
              valid_during tstzrange);
            CREATE TABLE assignments (org_id text, customer int, starts_at timestamptz);
            CREATE TABLE posted (customer int, month date, meter text, resource_kind text, microcredits bigint);""")
        copy_s = 0.0
        for k in range(n_hours):
            h = START + HOUR * k
            rows = [
                (r["id"], h, r["meter"], r["resource_id"], r["resource_kind"], r["org_id"], r["value"])
                for r in world.rows(h)
            ]
            t = time.perf_counter()
            await conn.copy_records_to_table("measurements", records=rows)
            copy_s += time.perf_counter() - t
        await conn.executemany("INSERT INTO prices VALUES ($1, $2, $3, $4, tstzrange($5, NULL))",
                               [("cfapps", "", *APP_PRICE, START - timedelta(days=1))]
                               + [("cfservices", p, *PLAN_PRICES[p], START - timedelta(days=1)) for p in PLAN_PRICES])
        await conn.executemany(
            "INSERT INTO assignments VALUES ($1, $2, $3)", [(o, c, START) for o, c in world.customer_of_org.items()]
        )
        await conn.execute("ANALYZE")
        t = time.perf_counter()
        await conn.execute("""
            INSERT INTO posted
            SELECT a.customer, date_trunc('month', m.hour AT TIME ZONE 'America/New_York')::date, m.meter,
                   m.resource_kind,
                   floor(sum(m.value::numeric * p.microcredits_per_unit) / p.unit)::bigint
            FROM measurements m
            JOIN prices p ON p.meter = m.meter AND p.resource_kind = m.resource_kind AND p.valid_during @> m.hour
            JOIN assignments a ON a.org_id = m.org_id AND a.starts_at <= m.hour
            GROUP BY 1, 2, 3, 4, p.unit""")
        sql_s = time.perf_counter() - t
        posted = await conn.fetchval("SELECT sum(microcredits) FROM posted")
        await conn.close()
    finally:
        await drop_database(db)
    want = sum(world.expected_used([START + HOUR * k for k in range(n_hours)]).values())
    assert posted == want, (posted, want)
    emit({
        "measurements": total, "record_size": size, "measurements_per_record": round(per_message, 1),
        "kafka_producer_perf_records_per_s": round(kafka_rate),
        "kafka_producer_perf_measurements_per_s": round(kafka_rate * per_message),
        "postgres_copy_rows_per_s": round(total / copy_s),
        "set_based_sql_seconds": round(sql_s, 1),
        "set_based_sql_measurements_per_s": round(total / sql_s),
    }, "baselines")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", type=int, default=10_000)
    ap.add_argument("--hours", type=int, default=744)
    a = ap.parse_args()
    asyncio.run(main(a.resources, a.hours))
