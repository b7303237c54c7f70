"""The floor under the pricer and the ledger on the batched topics: how fast Python with the project's
Kafka client moves batches of measurements when it does nothing else (not a test). All rates are in
measurements (charges) per second; a message carries a shard's measurements of one hour (~200 here).

Produces ``--count`` measurements as usage.readings.v2 batches (the pricer benchmark's) to a fresh topic,
then reads them four times, each time in a new consumer group, ``--batch`` messages at a time as the
pricer does:

- ``consume``: aiokafka ``getmany`` only, nothing done with the records;
- ``decode``: and each value decoded by the consumers' path (``shared.batches.decode_measurements``,
  item checks included);
- ``forward``: and each value published unchanged to a second topic, keyed as it came, every batch
  acknowledged by the broker before the next (the least work of any stage: one message in, one out);
- ``price``: and, instead of the value, the pricer's own charges batch published (``services.pricer.
  pricing.price_items`` with the benchmark's prices in memory, ``encode_charges``): our pricer without its
  database, to compare with ``forward``.

and then the database's part, a row per batch:

- ``copy``: the pricer's ``charge_batches`` table (its migrations, a fresh database), one row per batch
  with the charges batch as published, compressed as the pricer stores it, COPYed ``--batch`` rows at a
  time, a transaction each (the pricer's path for a shard seen for the first time). Nothing else runs meanwhile.

The ledger's floor (under ``ledger``), on the ledger benchmark's charge batches:

- ``consume`` and ``decode``: as above, with ``decode_charges``;
- ``state``: the ledger's ``shard_state`` table, one row per batch with its applied-charges document
  (compressed).

For each: measurements/s, the CPU of this process per measurement, the CPU of the whole machine per
measurement (this process, the broker, PostgreSQL: from /proc/stat, so the machine must be otherwise
quiet), and the ratio against issue 15's 300,000/s per stage. The machine's cores divided by the machine
CPU per measurement of the passes a stage cannot do without bound it however many instances run:
``pricer_bound_per_s`` (``forward`` + ``copy``), ``read_bound_per_s`` (``decode``), and the ledger's
``ledger_bound_per_s`` (its ``decode`` + ``state``).

    .venv/bin/python -m bench.bench_floor [--count 2000000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from bench.bench_ledger import bench_orgs, charges
from bench.bench_pricer import bench_prices, measurements
from bench.common import (
    KAFKA,
    drop_database,
    dsn,
    emit,
    fresh_database,
    fresh_topics,
    machine_busy_seconds,
    produce,
)
from services.ledger.app import MIGRATIONS as LEDGER_MIGRATIONS
from services.pricer.app import MIGRATIONS as PRICER_MIGRATIONS
from services.pricer.pricing import Catalog, price_items
from shared.batches import Charges, Measurements, decode_charges, decode_measurements, encode_charges
from shared.blobs import Frames
from shared.clock import utcnow
from shared.db import create_pool, migrate
from shared.kafka import Outgoing, Publisher
from shared.topics import CHARGES, READINGS, delete_topics

TARGET = 300_000
PASSES = ("consume", "decode", "forward", "price")
CORES = os.cpu_count() or 1
_BATCH_COLUMNS = ("reading_hour", "meter", "shard", "seq", "items", "d_priced", "d_unpriced", "d_revisions", "message")
_STATE_COLUMNS = ("reading_hour", "meter", "shard", "posted", "revisions", "items")


async def read_all(
    topic: str, out_topic: str, messages: int, batch: int, mode: str, charges_topic: bool = False
) -> dict[str, Any]:
    """Read ``messages`` batches of ``topic`` in a new group, doing what ``mode`` says with each; rates in
    the measurements they carry."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA,
        group_id=f"{topic}-floor-{mode}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=1024 * 1024,  # as shared.kafka's subscribers
        fetch_max_bytes=64 * 1024 * 1024,
    )
    publisher = Publisher(KAFKA, client_id="bench-floor") if mode in ("forward", "price") else None
    decode = decode_charges if charges_topic else decode_measurements
    catalog = Catalog(bench_prices())
    await consumer.start()
    if publisher is not None:
        await publisher.start()
    got = 0
    started = cpu_started = busy_started = 0.0
    try:
        while got < messages:
            records = await consumer.getmany(timeout_ms=500, max_records=batch)
            if not records:
                continue
            if not got:  # the clock starts with the first batch: group join and first fetch are not the floor
                started, cpu_started, busy_started = time.perf_counter(), time.process_time(), machine_busy_seconds()
            batch_records = [r for recs in records.values() for r in recs]
            got += len(batch_records)
            if mode == "consume":
                continue
            decoded = [decode(r.value).message for r in batch_records]
            if any(d is None for d in decoded):
                raise RuntimeError(f"{mode}: a batch did not decode")
            if mode == "price":
                out = []
                for r, m in zip(batch_records, decoded, strict=True):
                    assert isinstance(m, Measurements)
                    priced = price_items(m, None, catalog, utcnow())
                    if priced.rejects or priced.unpriced or priced.message is None:
                        raise RuntimeError(f"price: {len(priced.rejects)} rejected, {priced.unpriced} unpriced")
                    out.append(Outgoing(r.key, encode_charges(priced.message)))
                await publisher.publish(out_topic, out)  # type: ignore[union-attr]
            elif publisher is not None:
                await publisher.publish(out_topic, [Outgoing(r.key, r.value) for r in batch_records])
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        busy = machine_busy_seconds() - busy_started
    finally:
        await consumer.stop()
        if publisher is not None:
            await publisher.stop()
    return {"messages": got, "seconds": round(seconds, 2), "cpu_s": cpu, "busy_s": busy}


def _rates(r: dict[str, Any], measurements: int) -> dict[str, Any]:
    """Per-measurement figures of a pass over all ``measurements``."""
    rate = measurements / r["seconds"]
    out = {k: v for k, v in r.items() if k not in ("cpu_s", "busy_s")}
    out.update(
        measurements_per_s=round(rate),
        cpu_us_per_measurement=round(r.get("cpu_s", 0) / measurements * 1e6, 3),
        machine_cpu_us_per_measurement=round(r["busy_s"] / measurements * 1e6, 3),
        ratio_to_target=round(rate / TARGET, 2),
    )
    return out


async def copy_rows(
    rows: list[tuple[Any, ...]], batch: int, service: str, migrations: Path, table: str, columns: tuple[str, ...]
) -> dict[str, Any]:
    """COPY ``rows`` into ``service``'s ``table`` (its migrations, in a fresh database), ``batch`` per
    transaction, the clocks running over the COPYs only."""
    db = await fresh_database("bench_floor")
    try:
        pool = await create_pool(dsn(db, service), service)
        try:
            async with pool.acquire() as conn:
                await migrate(conn, service, migrations)
                started, busy_started = time.perf_counter(), machine_busy_seconds()
                for at in range(0, len(rows), batch):
                    async with conn.transaction():
                        await conn.copy_records_to_table(table, records=rows[at:at + batch], columns=columns)
                seconds, busy = time.perf_counter() - started, machine_busy_seconds() - busy_started
                stored = await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await pool.close()
    finally:
        await drop_database(db)
    if stored != len(rows):
        raise RuntimeError(f"copy into {service}.{table}: {stored} rows stored of {len(rows)}")
    return {"rows": len(rows), "seconds": round(seconds, 2), "busy_s": busy}


async def main(count: int, batch: int) -> None:
    prefix, ledger_prefix = await fresh_topics(), await fresh_topics()
    catalog = Catalog(bench_prices())
    tally = {"messages": 0, "measurements": 0}
    state_rows: list[tuple[Any, ...]] = []
    try:
        _, produce_s = await produce(prefix + READINGS, measurements(count, 10_000, tally), chunk=200)
        n = tally["measurements"]
        result: dict[str, Any] = {"count": n, "messages": tally["messages"], "batch": batch, "target": TARGET,
                                  "produce_measurements_per_s": round(n / produce_s)}
        for mode in PASSES:
            result[mode] = _rates(
                await read_all(prefix + READINGS, prefix + CHARGES, tally["messages"], batch, mode), n
            )
            print(f"{mode}: {result[mode]}", flush=True)
        # The ledger's input: the ledger benchmark's charge batches.
        sums: dict[tuple[str, str, str], Fraction] = defaultdict(Fraction)
        ledger_tally = {"messages": 0, "charges": 0}
        await produce(ledger_prefix + CHARGES, charges(count, 50_000, bench_orgs(1000), 0.01, 0.01, sums, ledger_tally),
                      chunk=200)
        ledger: dict[str, Any] = {"count": ledger_tally["charges"], "messages": ledger_tally["messages"]}
        for mode in ("consume", "decode"):
            ledger[mode] = _rates(await read_all(ledger_prefix + CHARGES, "", ledger_tally["messages"], batch, mode,
                                                 charges_topic=True), ledger_tally["charges"])
            print(f"ledger {mode}: {ledger[mode]}", flush=True)
    finally:
        await delete_topics(KAFKA, prefix=prefix)
        await delete_topics(KAFKA, prefix=ledger_prefix)
    # Stored as the services store them: compressed (zstd, here without a frame: about the same work).
    frames = Frames()
    rows = [(k[0], k[1], k[2], 1, len(c.resource_id), len(c.resource_id), 0, len(c.resource_id),
             frames.pack("", raw)) for k, c, raw in _priced(count, catalog)]
    result["copy"] = _rates(
        await copy_rows(rows, batch, "pricer", PRICER_MIGRATIONS, "charge_batches", _BATCH_COLUMNS), n
    )
    print(f"copy: {result['copy']}", flush=True)
    for k, c, _ in _priced(ledger["count"], catalog, ledger=True):
        state_rows.append((k[0], k[1], k[2], len(c.resource_id), len(c.resource_id), frames.pack("", orjson.dumps(
            {"r": c.resource_id, "v": c.revision, "g": [1] * len(c.resource_id), "n": c.amount_numerator,
             "d": c.amount_denominator}))))
    ledger["state"] = _rates(
        await copy_rows(state_rows, batch, "ledger", LEDGER_MIGRATIONS, "shard_state", _STATE_COLUMNS), ledger["count"]
    )
    print(f"ledger state: {ledger['state']}", flush=True)
    machine = lambda r, *passes: sum(r[p]["machine_cpu_us_per_measurement"] for p in passes)  # noqa: E731
    result["cores"] = CORES
    result["pricer_bound_per_s"] = round(CORES * 1e6 / machine(result, "forward", "copy"))
    result["read_bound_per_s"] = round(CORES * 1e6 / machine(result, "decode"))
    ledger["read_bound_per_s"] = round(CORES * 1e6 / machine(ledger, "decode"))
    ledger["ledger_bound_per_s"] = round(CORES * 1e6 / machine(ledger, "decode", "state"))
    result["ledger"] = ledger
    emit(result, "floor")


def _priced(count: int, catalog: Catalog, ledger: bool = False) -> list[tuple[tuple[Any, str, int], Charges, bytes]]:
    """The benchmark's measurements priced into charge batches, with their shard keys."""
    out = []
    tally = {"messages": 0, "measurements": 0}
    resources = 50_000 if ledger else 10_000
    for _, raw in measurements(count, resources, tally):
        m = decode_measurements(raw).message
        assert m is not None
        priced = price_items(m, None, catalog, utcnow())
        assert priced.message is not None
        c = priced.message
        out.append(((c.reading_hour, c.meter, c.shard), c, encode_charges(c)))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2_000_000, help="measurements (default 2,000,000)")
    parser.add_argument("--batch", type=int, default=1000, help="messages per getmany, as the services (default 1000)")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.batch))
