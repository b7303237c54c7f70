"""The floor under the pricer and the ledger: how fast Python with the project's Kafka client moves one
message per measurement when it does nothing else (not a test).

Produces ``--count`` measurement messages (the pricer benchmark's, the same size) to a fresh topic, then
reads them four times, each time in a new consumer group, in batches of ``--batch`` as the pricer does:

- ``consume``: aiokafka ``getmany`` only, nothing done with the records;
- ``decode``: and each value decoded by the consumers' fast path (``shared.wire``'s msgspec mirror);
- ``forward``: and each value published unchanged to a second topic, keyed as it came, every batch
  acknowledged by the broker before the next (the least work of any stage: one message in, one out);
- ``price``: and, instead of the value, the pricer's own charge published (``services.pricer.service.
  price_batch`` with the benchmark's prices in memory, keyed by org): our pricer without its database,
  to compare with ``forward`` (what pricing and building the charge cost on top of moving a message).

and then the database's part of a row per charge:

- ``copy``: the pricer's own ``charges`` table (its migration, in a fresh database), ``count`` rows in its
  shape COPYed ``--batch`` at a time, a transaction each, as the pricer writes a batch that has no
  redelivered measurement (its cheapest path). Nothing else runs meanwhile.

The ledger's floor (under ``ledger`` in the result), on the ledger benchmark's charges (larger documents
than measurements), ``--ledger-batch`` at a time as the ledger reads them:

- ``consume`` and ``decode``: as above, with the ``usage.charge`` fast path;
- ``state``: the ledger's ``charge_state`` table (its migrations, a fresh database), one row per charge
  COPYed; ``state_if_absent``: COPYed into a temporary table and inserted from there in key order unless
  present (``ON CONFLICT DO NOTHING``), the least that makes a redelivered charge change nothing; the
  ledger's revisions need each applied charge's revision and amount kept, one row each here.

For each: messages (rows)/s, the CPU of this process per message, the CPU of the whole machine per
message (this process, the broker, PostgreSQL: from /proc/stat, so the machine must be otherwise quiet),
and the ratio against the issues' 150,000/s per stage. Every real stage does more than its floor, so a
floor under the target bounds what any stage can reach on this machine with one message (and one stored
row) per measurement; and the machine's cores divided by the machine CPU per message of the passes a
stage cannot do without bound it however many instances run:

- ``pricer_bound_per_s``: ``forward`` + ``copy`` (each measurement read, decoded, answered by a message,
  and stored as a row: the least any pricer does, before it prices anything);
- ``read_bound_per_s``: ``decode`` alone (what any consumer of the topic must at least do);
- ``ledger.ledger_bound_per_s``: the ledger's ``decode`` + ``state_if_absent`` (each charge read, decoded
  and recorded once: the least any ledger with a row per charge does, before it resolves a customer,
  aggregates, posts or publishes anything); ``ledger.read_bound_per_s``: its ``decode`` alone.

    .venv/bin/python -m bench.bench_floor [--count 2000000] [--batch 5000] [--ledger-batch 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel

from bench.bench_ledger import bench_orgs, charges
from bench.bench_pricer import START, bench_prices, measurements
from bench.common import KAFKA, drop_database, dsn, emit, fresh_database, fresh_topics, named_id, produce
from services.ledger.app import MIGRATIONS as LEDGER_MIGRATIONS
from services.pricer.app import MIGRATIONS as PRICER_MIGRATIONS
from services.pricer.repository import _CHARGE_COLUMNS
from services.pricer.service import Catalog, price_batch
from shared.clock import utcnow
from shared.db import create_pool, migrate
from shared.contracts import ChargeComputed, MeasurementTaken
from shared.kafka import Outgoing, Publisher
from shared.topics import CHARGES, READINGS, delete_topics
from shared.wire import decoder_for

TARGET = 150_000
PASSES = ("consume", "decode", "forward", "price")
CORES = os.cpu_count() or 1
_BENCH_PRICE = uuid.UUID(named_id("price|cfapps"))
_STATE_COLUMNS = ("reading_hour", "measurement_id", "revision", "group_id", "num", "den", "meter")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat, idle and iowait
    excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def read_all(
    topic: str, out_topic: str, count: int, batch: int, mode: str, model: type[BaseModel] = MeasurementTaken
) -> dict[str, Any]:
    """Read ``count`` messages of ``topic`` (documents of ``model``) in a new group, doing what ``mode``
    says with each."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA,
        group_id=f"{topic}-floor-{mode}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,  # as shared.kafka.BatchConsumer
        fetch_max_bytes=64 * 1024 * 1024,
    )
    publisher = Publisher(KAFKA, client_id="bench-floor") if mode in ("forward", "price") else None
    decode = decoder_for(model)
    catalog = Catalog(bench_prices())
    await consumer.start()
    if publisher is not None:
        await publisher.start()
    got, decoded = 0, 0
    started = cpu_started = busy_started = 0.0
    try:
        while got < count:
            records = await consumer.getmany(timeout_ms=500, max_records=batch)
            if not records:
                continue
            if not got:  # the clock starts with the first batch: group join and first fetch are not the floor
                started, cpu_started, busy_started = time.perf_counter(), time.process_time(), machine_busy_seconds()
            batch_records = [r for recs in records.values() for r in recs]
            got += len(batch_records)
            if mode == "price":
                priced = price_batch([decode(r.value) for r in batch_records], catalog, utcnow())
                if priced.rejects or priced.unpriced:
                    raise RuntimeError(f"price: {len(priced.rejects)} rejected, {len(priced.unpriced)} unpriced")
                decoded += len(priced.payloads)
                await publisher.publish(  # type: ignore[union-attr]
                    out_topic, [Outgoing(m.org_id.encode(), p) for m, p in zip(priced.measurements, priced.payloads, strict=True)]
                )
                continue
            if mode != "consume":
                decoded += len([decode(r.value) for r in batch_records])
            if publisher is not None:
                await publisher.publish(out_topic, [Outgoing(r.key, r.value) for r in batch_records])
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        busy = machine_busy_seconds() - busy_started
    finally:
        await consumer.stop()
        if publisher is not None:
            await publisher.stop()
    if mode != "consume" and decoded != got:
        raise RuntimeError(f"{mode}: decoded {decoded} of {got}")
    rate = got / seconds
    return {
        "messages": got,
        "seconds": round(seconds, 2),
        "messages_per_s": round(rate),
        "cpu_us_per_message": round(cpu / got * 1e6, 2),
        "machine_cpu_us_per_message": round(busy / got * 1e6, 2),
        "ratio_to_target": round(rate / TARGET, 2),
    }


def pricer_row(i: int) -> tuple[Any, ...]:
    """Row ``i`` in the shape of the pricer's ``charges`` (10,000 measurements an hour)."""
    hour = START + timedelta(hours=i // 10_000)
    return (hour, uuid.UUID(named_id(f"measurement|{i}")), 1, "cfapps", "", 1024,
            _BENCH_PRICE, 1024 * 1_000_000, 730 * 1024, hour)


def ledger_state_row(i: int) -> tuple[Any, ...]:
    """Row ``i`` in the shape of the ledger's ``charge_state``: the applied revision of one charge."""
    hour = START + timedelta(hours=i // 10_000)
    return (hour, uuid.UUID(named_id(f"measurement|{i}")), 1, 1 + i % 150, (i % 64 + 1) * 128_000_000, 747_520, "cfapps")


async def copy_rows(
    count: int, batch: int, service: str, migrations: Path, table: str, columns: tuple[str, ...],
    row: Callable[[int], tuple[Any, ...]], if_absent: bool = False,
) -> dict[str, Any]:
    """COPY ``count`` rows made by ``row`` into ``service``'s ``table`` (its migrations, in a fresh
    database), ``batch`` per transaction; the rows are built a chunk at a time before the clocks run over
    the chunk's COPYs. ``if_absent``: COPY into a temporary table and insert from there in key order those
    not yet present (``ON CONFLICT DO NOTHING``), the least that lets a redelivered row change nothing."""
    db = await fresh_database("bench_floor")
    chunk = max(batch, 100_000 // batch * batch)
    try:
        pool = await create_pool(dsn(db, service), service)
        try:
            async with pool.acquire() as conn:
                await migrate(conn, service, migrations)
                if if_absent:
                    await conn.execute(f"CREATE TEMP TABLE staged (LIKE {table}) ON COMMIT DELETE ROWS")
                seconds = busy = 0.0
                for first in range(0, count, chunk):
                    rows = [row(i) for i in range(first, min(count, first + chunk))]
                    started, busy_started = time.perf_counter(), machine_busy_seconds()
                    for at in range(0, len(rows), batch):
                        async with conn.transaction():
                            if not if_absent:
                                await conn.copy_records_to_table(table, records=rows[at:at + batch], columns=columns)
                                continue
                            await conn.copy_records_to_table("staged", records=rows[at:at + batch], columns=columns)
                            await conn.execute(
                                f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM staged"
                                f" ORDER BY {columns[0]}, {columns[1]} ON CONFLICT DO NOTHING"
                            )
                    seconds += time.perf_counter() - started
                    busy += machine_busy_seconds() - busy_started
                stored = await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await pool.close()
    finally:
        await drop_database(db)
    if stored != count:
        raise RuntimeError(f"copy into {service}.{table}: {stored} rows stored of {count}")
    return {"rows": count, "seconds": round(seconds, 2), "rows_per_s": round(count / seconds),
            "machine_cpu_us_per_message": round(busy / count * 1e6, 2),
            "ratio_to_target": round(count / seconds / TARGET, 2)}


async def main(count: int, batch: int, ledger_batch: int) -> None:
    prefix, ledger_prefix = await fresh_topics(), await fresh_topics()
    try:
        produced, produce_s = await produce(prefix + READINGS, measurements(count, 10_000))
        result: dict[str, Any] = {"count": produced, "batch": batch, "produce_per_s": round(produced / produce_s)}
        for mode in PASSES:
            result[mode] = await read_all(prefix + READINGS, prefix + CHARGES, produced, batch, mode)
            print(f"{mode}: {result[mode]}", flush=True)
        # The ledger's input: the ledger benchmark's charges (larger documents than measurements).
        sums: dict[tuple[str, str, str], Fraction] = defaultdict(Fraction)
        sent, _ = await produce(ledger_prefix + CHARGES, charges(count, 50_000, bench_orgs(1000), 0.01, 0.01, sums))
        ledger: dict[str, Any] = {"count": sent, "batch": ledger_batch}
        for mode in ("consume", "decode"):
            ledger[mode] = await read_all(ledger_prefix + CHARGES, "", sent, ledger_batch, mode, ChargeComputed)
            print(f"ledger {mode}: {ledger[mode]}", flush=True)
    finally:
        await delete_topics(KAFKA, prefix=prefix)
        await delete_topics(KAFKA, prefix=ledger_prefix)
    result["copy"] = await copy_rows(produced, batch, "pricer", PRICER_MIGRATIONS, "charges", _CHARGE_COLUMNS, pricer_row)
    print(f"copy: {result['copy']}", flush=True)
    for mode in ("state", "state_if_absent"):
        ledger[mode] = await copy_rows(sent, ledger_batch, "ledger", LEDGER_MIGRATIONS, "charge_state", _STATE_COLUMNS,
                                       ledger_state_row, if_absent=mode == "state_if_absent")
        print(f"ledger {mode}: {ledger[mode]}", flush=True)
    machine = lambda r, *passes: sum(r[p]["machine_cpu_us_per_message"] for p in passes)  # noqa: E731
    result["cores"] = CORES
    result["pricer_bound_per_s"] = round(CORES * 1e6 / machine(result, "forward", "copy"))
    result["read_bound_per_s"] = round(CORES * 1e6 / machine(result, "decode"))
    ledger["read_bound_per_s"] = round(CORES * 1e6 / machine(ledger, "decode"))
    ledger["ledger_bound_per_s"] = round(CORES * 1e6 / machine(ledger, "decode", "state_if_absent"))
    result["ledger"] = ledger
    emit(result, "floor")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2_000_000, help="measurement messages (default 2,000,000)")
    parser.add_argument("--batch", type=int, default=5000, help="records per getmany, as the pricer (default 5000)")
    parser.add_argument("--ledger-batch", type=int, default=20_000, help="records per getmany of charges, as the ledger (default 20000)")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.batch, args.ledger_batch))
