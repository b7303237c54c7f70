"""Load test of the api (issue 8, "Load"): ``--clients`` concurrent clients for ``--seconds`` seconds on
the usage and balance routes, with valid JWTs, against a read model of realistic size.

The read model is filled as ``bench/bench_api.py`` fills it (one customer, ``--resources`` resources × a
month of hourly charges, the daily and monthly rollups computed from them by SQL), plus the ledger
transactions the balance reads: the agreement's funding and one usage posting per customer-hour. The
api runs as in production (``billing api``: uvicorn, its default query cache, a local OIDC issuer).

Each client is an ``httpx.AsyncClient`` with one keep-alive connection, sending back to back a random
request of the mix: ``GET /v1/customers/{id}/usage`` with granularity hour, day or month, every group_by,
ranges from one hour to the whole month, page sizes 50 to 500; ``GET /v1/customers/{id}/balance`` with
and without ``as_of``. The clients are spread over ``--processes`` processes (one Python process
running 50 httpx clients is itself the bottleneck on a small machine: see the README).

Every non-2xx answer and every transport error or timeout counts as an error; the run exits 1 when there
is any. Prints one JSON line, keeps it in bench/out/load_api.json and in bench/results.json under
``load.api`` (the other keys are kept).

    .venv/bin/python -m bench.load_api --resources 10000 --clients 50 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import orjson

from bench.bench_api import CUSTOMER, MIGRATIONS, Issuer, fill, subprocess_server
from bench.common import (
    KAFKA,
    ROOT,
    drop_database,
    dsn,
    emit,
    free_port,
    fresh_database,
    fresh_topics,
    machine,
    proc_status,
)
from shared.clock import month_bounds, parse_month
from shared.db import migrate
from shared.topics import delete_topics
from tests.sim_server import serve_app

NY = ZoneInfo("America/New_York")
GROUP_BYS = ("org", "space", "resource", "meter", "kind")


# ------------------------------------------------------------------------------------------ data


async def fill_ledger(conn: asyncpg.Connection, month: str, hourly_microcredits: int) -> int:
    """The agreement's funding at the month's start and one usage posting per hour, as the projector
    stores ledger.transactions.v1 (what the balance route sums)."""
    start, end = month_bounds(parse_month(month))
    hours = int((end - start).total_seconds() // 3600)
    await conn.execute(
        """
        INSERT INTO ledger_transaction (transaction_id, customer_id, type, occurred_at, posted_at, reading_hour,
                                        description, idempotency_key, amount, bucket, signed_amount, reverses,
                                        entries, usage)
        SELECT md5('t|' || h)::uuid, $1,
               CASE WHEN h < 0 THEN 'funding' ELSE 'usage' END,
               $2::timestamptz + greatest(h, 0) * interval '1 hour',
               $2::timestamptz + greatest(h, 0) * interval '1 hour' + interval '5 minutes',
               CASE WHEN h < 0 THEN NULL ELSE $2::timestamptz + h * interval '1 hour' END,
               'load test', 'load|' || h,
               CASE WHEN h < 0 THEN $4::bigint ELSE $3::bigint END,
               CASE WHEN h < 0 THEN 'funded' ELSE 'used' END,
               CASE WHEN h < 0 THEN $4::bigint ELSE -$3::bigint END,
               NULL, '[]'::jsonb, '[]'::jsonb
        FROM generate_series(-1, $5 - 1) AS h
        """,
        CUSTOMER,
        start,
        hourly_microcredits,
        hourly_microcredits * hours * 2,
        hours,
    )
    await conn.execute("ANALYZE ledger_transaction")
    return hours + 1


# ------------------------------------------------------------------------------------------ requests


def _z(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def request_mix(month: str, seed: int) -> list[tuple[str, str, dict[str, str]]]:
    """(route label, path, query) of 2,000 requests drawn from the mix, for one process to cycle through."""
    rnd = random.Random(seed)
    first = parse_month(month)
    start, end = month_bounds(first)
    hours = int((end - start).total_seconds() // 3600)
    days = (end.astimezone(NY).date() - first).days
    base = f"/v1/customers/{CUSTOMER}"
    out: list[tuple[str, str, dict[str, str]]] = []
    for _ in range(2000):
        r = rnd.random()
        group_by = rnd.choice(GROUP_BYS)
        limit = str(rnd.choice((50, 100, 500)))
        if r < 0.20:
            q = {"from": _z(start), "to": _z(end), "granularity": "month", "group_by": group_by, "limit": limit}
            out.append(("usage month", f"{base}/usage", q))
        elif r < 0.40:
            d0 = rnd.randrange(days)
            d1 = rnd.randint(d0 + 1, min(days, d0 + 31))
            lo = datetime.combine(first + timedelta(days=d0), datetime.min.time(), NY)
            hi = datetime.combine(first + timedelta(days=d1), datetime.min.time(), NY)
            q = {"from": _z(lo), "to": _z(hi), "granularity": "day", "group_by": group_by, "limit": limit}
            out.append(("usage day", f"{base}/usage", q))
        elif r < 0.60:
            h0 = rnd.randrange(hours)
            h1 = rnd.randint(h0 + 1, min(hours, h0 + 48))
            q = {"from": _z(start + timedelta(hours=h0)), "to": _z(start + timedelta(hours=h1)), "granularity": "hour",
                 "group_by": group_by, "limit": limit}
            out.append(("usage hour", f"{base}/usage", q))
        elif r < 0.80:
            out.append(("balance", f"{base}/balance", {}))
        else:
            as_of = start + timedelta(seconds=rnd.randrange(int((end - start).total_seconds())))
            out.append(("balance as_of", f"{base}/balance", {"as_of": _z(as_of)}))
    return out


async def _clients(url: str, token: str, clients: int, seconds: float, month: str, seed: int) -> dict[str, Any]:
    mix = request_mix(month, seed)
    latencies: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds

    async def client(k: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        headers = {"Authorization": f"Bearer {token}"}
        i = k * 37
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as http:
            while loop.time() < stop_at:
                label, path, query = mix[i % len(mix)]
                i += 1
                t = time.perf_counter()
                try:
                    resp = await http.get(path, params=query)
                    await resp.aread()
                    ok = 200 <= resp.status_code < 300
                    why = f"{label}: HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    ok, why = False, f"{label}: {type(exc).__name__}"
                took = time.perf_counter() - t
                if ok:
                    latencies.setdefault(label, []).append(took)
                else:
                    errors[why] = errors.get(why, 0) + 1

    await asyncio.gather(*(client(k) for k in range(clients)))
    return {"latencies": latencies, "errors": errors}


def client_process(url: str, token: str, clients: int, seconds: float, month: str, seed: int) -> dict[str, Any]:
    """One load-generating process (run in a process pool)."""
    t0 = time.process_time()
    out = asyncio.run(_clients(url, token, clients, seconds, month, seed))
    out["cpu_seconds"] = time.process_time() - t0
    return out


def _pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))] * 1000, 2)


def summarize(parts: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    by_route: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for part in parts:
        for label, values in part["latencies"].items():
            by_route.setdefault(label, []).extend(values)
        for why, n in part["errors"].items():
            errors[why] = errors.get(why, 0) + n
    every = sorted(v for values in by_route.values() for v in values)
    n_errors = sum(errors.values())
    return {
        "requests": len(every) + n_errors,
        "ok": len(every),
        "errors": n_errors,
        "error_kinds": errors,
        "rps": round((len(every) + n_errors) / seconds, 1),
        "p50_ms": _pct(every, 0.50),
        "p95_ms": _pct(every, 0.95),
        "p99_ms": _pct(every, 0.99),
        "max_ms": round(every[-1] * 1000, 2) if every else None,
        "routes": {
            label: {"requests": len(v), "p50_ms": _pct(sorted(v), 0.5), "p99_ms": _pct(sorted(v), 0.99)}
            for label, v in sorted(by_route.items())
        },
        "client_cpu_seconds": [round(p["cpu_seconds"], 1) for p in parts],
    }


# ------------------------------------------------------------------------------------------ results


def record_load(name: str, summary: dict[str, Any]) -> None:
    """Keep ``summary`` in bench/results.json under ``load.<name>``, leaving every other key as it is."""
    path = ROOT / "bench" / "results.json"
    data: dict[str, Any] = orjson.loads(path.read_bytes()) if path.exists() else {}
    load = data.setdefault("load", {})
    load[name] = {**summary, "machine": machine(), "measured_at": datetime.now(UTC).strftime("%Y-%m-%d")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ main


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    database = await fresh_database("load_api")
    prefix = await fresh_topics()
    try:
        conn = await asyncpg.connect(
            dsn(database, "api"), server_settings={"search_path": "api", "timezone": "UTC"}, command_timeout=None
        )
        try:
            await migrate(conn, "api", MIGRATIONS)
            filled = await fill(conn, dsn(database, "api"), opts.resources, opts.orgs, opts.spaces, opts.month)
            filled["ledger_transactions"] = await fill_ledger(conn, opts.month, 5_000_000)
        finally:
            await conn.close()
        print(f"read model filled: {orjson.dumps(filled).decode()}", file=sys.stderr, flush=True)
        issuer = Issuer()
        async with serve_app(issuer.app()) as issuer_url:
            issuer.url = issuer_url
            port = free_port()
            env = {
                **os.environ,
                "API_DATABASE_URL": dsn(database, "api"),
                "API_PORT": str(port),
                "API_OIDC_ISSUER": issuer_url,
                "API_LOG_LEVEL": "WARNING",
                "KAFKA_BOOTSTRAP_SERVERS": KAFKA,
                "KAFKA_TOPIC_PREFIX": prefix,
            }
            url = f"http://127.0.0.1:{port}"
            token = issuer.token()
            api_cmd = [sys.executable, "-c", "from services.api.app import main; main()"]
            async with subprocess_server(api_cmd, env, f"{url}/readyz") as proc:
                # Every request of the mix answers 200 once before the clock starts (and warms the api).
                async with httpx.AsyncClient(
                    base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
                ) as c:
                    for label, path, query in request_mix(opts.month, 0)[:60]:
                        resp = await c.get(path, params=query)
                        if resp.status_code != 200:
                            raise RuntimeError(f"{label} {path} {query}: {resp.status_code} {resp.text[:300]}")
                per = [
                    opts.clients // opts.processes + (1 if k < opts.clients % opts.processes else 0)
                    for k in range(opts.processes)
                ]
                loop = asyncio.get_running_loop()
                with concurrent.futures.ProcessPoolExecutor(max_workers=opts.processes) as pool:
                    futures = [
                        loop.run_in_executor(pool, client_process, url, token, n, opts.seconds, opts.month, 1000 + k)
                        for k, n in enumerate(per)
                    ]
                    t0 = time.perf_counter()
                    parts = await asyncio.gather(*futures)
                    elapsed = time.perf_counter() - t0
                server_rss_mb = round(proc_status(proc.pid).get("VmRSS", 0) / 2**20, 1)
        summary = summarize(parts, opts.seconds)
        return {
            "clients": opts.clients,
            "processes": opts.processes,
            "seconds": opts.seconds,
            "elapsed_seconds": round(elapsed, 1),
            "resources": opts.resources,
            "month": opts.month,
            **filled,
            **summary,
            "api_rss_mb": server_rss_mb,
            "passed": summary["errors"] == 0 and summary["ok"] > 0,
        }
    finally:
        await drop_database(database)
        await delete_topics(KAFKA, prefix=prefix)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resources", type=int, default=10_000)
    p.add_argument("--orgs", type=int, default=20)
    p.add_argument("--spaces", type=int, default=200)
    p.add_argument("--month", default="2026-10")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--processes", type=int, default=2, help="load-generating processes the clients are spread over")
    p.add_argument("--no-record", action="store_true", help="do not write bench/results.json")
    opts = p.parse_args()
    if not 1 <= opts.processes <= opts.clients:
        p.error("--processes must be between 1 and --clients")
    result = asyncio.run(run(opts))
    result["started_at"] = datetime.now(UTC).isoformat()
    emit(result, "load_api")
    if not opts.no_record:
        record_load("api", {k: v for k, v in result.items() if k not in ("rows",)})
    if not result["passed"]:
        print(
            f"FAIL: {result['errors']} errors of {result['requests']} requests: {result['error_kinds']}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(f"PASS: {result['requests']} requests, 0 errors, {result['rps']} req/s, "
          f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms", file=sys.stderr)


if __name__ == "__main__":
    main()
