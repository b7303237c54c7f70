"""Benchmark of the ledger alone on the real Kafka and PostgreSQL (not a test).

Sets up a fresh database (``--customers`` customers, each with an agreement, ``--orgs`` orgs assigned to
them round-robin, so every customer's orgs spread over the topic's partitions), produces ``--count``
charges to a fresh, prefixed ``usage.charges.v2`` in batches (``--resources`` resources per hour; a share of
re-priced revisions and of duplicates), then starts the ledger as a subprocess (``billing ledger``, as in
production) and measures:

- sustained charges/s: from the first to the last offset the ledger committed (it commits a batch's
  offsets only after its usage transactions are committed in PostgreSQL and published to Kafka),
- peak RSS of the ledger process (VmHWM from /proc) and its RSS over the run (flat or growing),
- the end-to-end time from start to the last commit (includes start-up and migrations),
- a check of the result: the microcredits posted equal floor(exact sum) per (customer, month, price).

Prints one JSON line (and keeps it in bench/out/ledger.json). Needs KAFKA_BOOTSTRAP_SERVERS and
BILLING_PG_ADMIN_DSN (``source deploy/local/env.sh``). Example:
``.venv/bin/python bench/bench_ledger.py --count 300000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    ADMIN_DSN,
    KAFKA,
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
from shared.batches import Charges, Ref, charges_id, encode_charges, shard_key, shard_of  # noqa: E402
from shared.batches import Price as PriceRef  # noqa: E402
from shared.settings import ServiceSettings  # noqa: E402
from shared.topics import ALL_TOPICS, CHARGES  # noqa: E402
from tests.support.processes import stop_all  # noqa: E402

# What the service runs with unless told otherwise (a batch of messages per transaction).
BATCH_DEFAULT: int = ServiceSettings.model_fields["batch_max_records"].default

START = datetime(2026, 3, 1, 5, tzinfo=UTC)  # March 1, 00:00 in New York
KINDS = ["plan-small", "plan-medium", "plan-large"]
APPS_PRICE = str(uuid.UUID(int=0xA))
KIND_PRICES = [str(uuid.UUID(int=0xB0 + i)) for i in range(len(KINDS))]
NEW_YORK = ZoneInfo("America/New_York")



def bench_orgs(n: int) -> list[str]:
    """The benchmark's ``n`` org ids (the same in every run)."""
    return [str(uuid.UUID(int=(i + 1) << 32)) for i in range(n)]


def charges(
    count: int,
    resources: int,
    orgs: list[str],
    revisions: float,
    duplicates: float,
    sums: dict[tuple[str, str, str], Fraction],
    tally: dict[str, int],
    seed: int = 7,
) -> Iterator[tuple[bytes, bytes]]:
    """About ``count`` valid charges as usage.charges.v2 batches (one per hour, meter and shard, as the
    pricer publishes them), generated as they are sent (constant memory, so a run can last ten minutes);
    a share of the charges re-priced an hour later (revision 2 at 110%, in batches of their own) and a
    share of the batches sent twice. Adds to ``sums`` the exact sum of the latest revisions per (org, New
    York month, price) for the check, and counts messages and charges in ``tally``. 80% app charges
    (MB-hours at 1 credit per 730 GB-hours), 20% service instances of three plans (per 730 instance-hours)."""
    rng = random.Random(seed)
    produced = 0
    hours = -(-count // resources)
    per_resource = [_resource(r, orgs) for r in range(resources)]
    by_shard: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r, res in enumerate(per_resource):
        by_shard[(res[0], shard_of(res[1]))].append(r)
    tally_amounts: dict[tuple[str, str, str, Fraction], int] = defaultdict(int)
    pending: list[tuple[int, datetime]] = []
    for h in range(hours + 1):
        hour = START + timedelta(hours=h)
        local = hour.astimezone(NEW_YORK)
        month = f"{local.year:04d}-{local.month:02d}"
        # Re-priced revisions of the previous hour's charges arrive now (a price corrected), at 110%.
        if pending:
            groups: dict[tuple[str, int, datetime], list[int]] = defaultdict(list)
            for r, at in pending:
                groups[(per_resource[r][0], shard_of(per_resource[r][1]), at)].append(r)
            for (meter, shard, at), rs in sorted(groups.items()):
                at_local = at.astimezone(NEW_YORK)
                at_month = f"{at_local.year:04d}-{at_local.month:02d}"
                for r in rs:
                    _, _, org, price, amount = per_resource[r]
                    tally_amounts[(org, at_month, price, amount * Fraction(11, 10))] += 1
                    tally_amounts[(org, at_month, price, amount)] -= 1
                raw = _batch(at, meter, shard, rs, per_resource, revision=2, factor=Fraction(11, 10))
                tally["messages"] += 1
                tally["charges"] += len(rs)
                yield shard_key(shard), raw
            pending = []
        if produced >= count:
            break
        for (meter, shard), rs in sorted(by_shard.items()):
            if produced >= count:
                break
            rs = rs[: count - produced]
            raw = _batch(hour, meter, shard, rs, per_resource)
            produced += len(rs)
            tally["messages"] += 1
            tally["charges"] += len(rs)
            yield shard_key(shard), raw
            if rng.random() < duplicates:
                tally["messages"] += 1
                tally["charges"] += len(rs)
                yield shard_key(shard), raw
            for r in rs:
                _, _, org, price, amount = per_resource[r]
                tally_amounts[(org, month, price, amount)] += 1
                if rng.random() < revisions:
                    pending.append((r, hour))
    for (org, month, price, amount), n in tally_amounts.items():
        sums[(org, month, price)] += amount * n


def _batch(
    hour: datetime, meter: str, shard: int, rs: list[int], per_resource: list[tuple[str, str, str, str, Fraction]],
    revision: int = 1, factor: Fraction = Fraction(1),
) -> bytes:
    """The charges of resources ``rs`` (one meter and shard) as one usage.charges.v2 message."""
    orgs = sorted({per_resource[r][2] for r in rs})
    org_at = {o: i for i, o in enumerate(orgs)}
    prices = sorted({per_resource[r][3] for r in rs})
    price_at = {p: i for i, p in enumerate(prices)}
    kinds = [""] if meter == "cfapps" else KINDS
    amounts = [per_resource[r][4] * factor for r in rs]
    rids = [per_resource[r][1] for r in rs]
    return encode_charges(
        Charges(
            id=charges_id(hour, meter, shard, rids, [revision] * len(rs)),
            reading_hour=hour,
            meter=meter,
            unit="MB" if meter == "cfapps" else "instance",
            shard=shard,
            priced_at=hour,
            orgs=[Ref(o, f"org {o}") for o in orgs],
            spaces=[Ref("space", "space")],
            kinds=kinds,
            prices=[PriceRef(uuid.UUID(p), 1, 1) for p in prices],
            resource_id=rids,
            resource_name=[f"resource-{r}" for r in rs],
            org=[org_at[per_resource[r][2]] for r in rs],
            space=[0] * len(rs),
            kind=[0 if meter == "cfapps" else r % 3 for r in rs],
            value=[1] * len(rs),
            estimated=[False] * len(rs),
            revision=[revision] * len(rs),
            price=[price_at[per_resource[r][3]] for r in rs],
            amount_numerator=[a.numerator for a in amounts],
            amount_denominator=[a.denominator for a in amounts],
        )
    )


def _resource(r: int, orgs: list[str]) -> tuple[str, str, str, str, Fraction]:
    """Resource ``r``'s meter, id, org, price and charge per hour."""
    app = r % 5 != 0
    meter = "cfapps" if app else "cfservices"
    resource = str(uuid.UUID(int=(r + 1) << 64))
    org = orgs[r % len(orgs)]
    value = (r % 64 + 1) * 128 if app else 1
    if app:
        return meter, resource, org, APPS_PRICE, Fraction(value * 1_000_000, 730 * 1024)
    return meter, resource, org, KIND_PRICES[r % 3], Fraction((r % 3 + 1) * 5_000_000, 730)


async def prepare(ledger_dsn: str, customers: int, orgs: list[str]) -> dict[str, str]:
    """Migrate, create the customers with an agreement each, assign the orgs; returns org -> customer."""
    from services.ledger.app import MIGRATIONS
    from services.ledger.service import LedgerService
    from services.ledger.settings import LedgerSettings
    from shared.db import create_pool, migrate

    pool = await create_pool(ledger_dsn, "ledger")
    try:
        async with pool.acquire() as conn:
            await migrate(conn, "ledger", MIGRATIONS)
        service = LedgerService(pool, LedgerSettings(database_url=ledger_dsn, port=1))
        await service.create_tier("bench", 10**12)
        ids = [(await service.create_customer(f"customer {i}", "bench")).body["id"] for i in range(customers)]
        for cid in ids:
            await service.create_agreement(cid, START - timedelta(days=1), START + timedelta(days=365), None)
        owner = {}
        for i, org in enumerate(orgs):
            cid = ids[i % customers]
            await service.assign_org(org, cid, START - timedelta(days=30))
            owner[org] = str(cid)
        return owner
    finally:
        await pool.close()


async def check(
    ledger_admin_dsn: str, owner: dict[str, str], sums: dict[tuple[str, str, str], Fraction]
) -> dict[str, Any]:
    expected: dict[tuple[str, str, str], Fraction] = defaultdict(Fraction)
    for (org, month, price), amount in sums.items():
        expected[(owner[org], month, price)] += amount
    want = {k: v.numerator // v.denominator for k, v in expected.items()}
    conn = await asyncpg.connect(ledger_admin_dsn)
    try:
        rows = await conn.fetch(
            """SELECT t.customer_id::text AS c, to_char(u.month, 'YYYY-MM') AS m, u.price_id::text AS p,
                      sum(u.microcredits)::bigint AS mc
                 FROM ledger.usage_lines u JOIN ledger.transactions t ON t.id = u.transaction_id GROUP BY 1, 2, 3"""
        )
        got = {(r["c"], r["m"], r["p"]): r["mc"] for r in rows}
        transactions = await conn.fetchval(
            "SELECT count(*) FROM ledger.transactions WHERE type IN ('usage', 'late_usage')"
        )
        equation = await conn.fetchval("SELECT sum(balance) FROM ledger.accounts")
    finally:
        await conn.close()
    return {
        "posting_rule_holds": got == want,
        "groups": len(want),
        "usage_transactions": transactions,
        "sum_of_signed_balances": int(equation),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = await fresh_topics()
    db = await fresh_database("billing_bench_ledger")
    topic = prefix + CHARGES
    result: dict[str, Any] = {
        "count": args.count,
        "customers": args.customers,
        "orgs": args.orgs,
        "resources_per_hour": args.resources,
        "batch_max_records": args.batch,
        "instances": args.instances,
    }
    procs: list[subprocess.Popen[bytes]] = []
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        orgs = bench_orgs(args.orgs)
        sums: dict[tuple[str, str, str], Fraction] = defaultdict(Fraction)
        tally = {"messages": 0, "charges": 0}
        total, seconds = await produce(
            topic, charges(args.count, args.resources, orgs, args.revisions, args.duplicates, sums, tally), chunk=200
        )
        result.update(tally)
        per_message = tally["charges"] / tally["messages"]
        result["generate_and_produce_s"] = round(seconds, 1)

        ledger_dsn = dsn(db, "ledger")
        owner = await prepare(ledger_dsn, args.customers, orgs)
        billing = str(ROOT / ".venv" / "bin" / "billing")
        ports = [free_port() for _ in range(args.instances)]
        started = time.perf_counter()
        for port in ports:
            env = {
                **os.environ,
                "LEDGER_DATABASE_URL": ledger_dsn,
                "KAFKA_BOOTSTRAP_SERVERS": KAFKA,
                "KAFKA_TOPIC_PREFIX": prefix,
                "LEDGER_PORT": str(port),
                "LEDGER_BATCH_MAX_RECORDS": str(args.batch),
                "LEDGER_LOG_LEVEL": "WARNING",
                "LEDGER_PERIODIC_INTERVAL_SECONDS": "0",
            }
            procs.append(
                subprocess.Popen(
                    [billing, "ledger"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            )
        for port, proc in zip(ports, procs, strict=True):
            await wait_ready(port, proc, "ledger")

        first_t: float | None = None
        first_n = last_n = 0
        last_t = started
        rss: list[int] = []
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"ledger exited with {proc.returncode}")
            n = await committed(admin, prefix + "ledger", topic)
            now = time.perf_counter()
            if n > 0 and first_t is None:
                first_t, first_n = now, n
            if n != last_n:
                last_n, last_t = n, now
            rss.append(sum(proc_status(p.pid).get("VmRSS", 0) for p in procs))
            if n >= total:
                break
            if now - started > args.timeout:
                raise RuntimeError(f"timed out with {n} of {total} committed")
            await asyncio.sleep(0.25)
        peak = [proc_status(p.pid).get("VmHWM", 0) for p in procs]
        assert first_t is not None
        window = last_t - first_t
        quarter, tenth = max(1, len(rss) // 4), max(1, -(-len(rss) // 10))
        result.update(
            # Offsets count messages: charges committed = messages times the mean batch size.
            sustained_charges_per_s=round((last_n - first_n) * per_message / window) if window > 0 else None,
            measured_window_s=round(window, 2),
            end_to_end_s=round(last_t - started, 2),
            peak_rss_mb=[round(p / 2**20, 1) for p in peak],
            rss_mb_first_quarter_max=round(max(rss[:quarter]) / 2**20, 1),
            rss_mb_last_quarter_max=round(max(rss[-quarter:]) / 2**20, 1),
            rss_mb_by_tenth=[round(max(rss[i : i + tenth]) / 2**20) for i in range(0, len(rss), tenth)][:10],
        )
        result["check"] = await check(ADMIN_DSN.rsplit("/", 1)[0] + f"/{db}", owner, sums)
        return result
    finally:
        stop_all(procs, grace=60)
        await admin.close()
        if not args.keep:
            await drop_database(db)
            cleanup = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
            await cleanup.start()
            try:
                await cleanup.delete_topics([prefix + t for t in ALL_TOPICS])
            finally:
                await cleanup.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000, help="charges (first revisions) to post")
    parser.add_argument("--resources", type=int, default=50_000, help="resources (charges) per hour")
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--revisions", type=float, default=0.01, help="share of charges re-priced once")
    parser.add_argument("--duplicates", type=float, default=0.01, help="share of charges sent twice")
    parser.add_argument("--instances", type=int, default=1, help="ledger processes in the group")
    parser.add_argument("--batch", type=int, default=BATCH_DEFAULT,
                        help=f"LEDGER_BATCH_MAX_RECORDS (messages; default: the service's, {BATCH_DEFAULT})")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", action="store_true", help="keep the database and topics")
    args = parser.parse_args()
    emit(asyncio.run(run(args)), "ledger")


if __name__ == "__main__":
    main()
