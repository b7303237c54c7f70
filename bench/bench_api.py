"""Benchmark of the api's monthly usage query (not a test).

Fills the api's read model, on a fresh database, for one customer with ``--resources`` resources × a
month of hourly charges (through the read model's projector, as its consumer applies them), starts the
api as a subprocess (``billing
api``, uvicorn, as in production) with a local OIDC issuer, and hammers

    GET /v1/customers/{id}/usage?from=<month start>&to=<month end>&granularity=month&group_by=org

with ``--concurrency`` concurrent clients (one keep-alive connection each; ``--client httpx`` for
httpx.AsyncClients, which saturate the load generator's core long before the servers) for ``--seconds``
seconds, after a warm-up, once with the api's query cache as configured and once without it. A bare
Starlette endpoint on uvicorn, in its own subprocess, is measured the same way. Prints one JSON line:
requests/s, p50 and p99 latency of both, and their ratio; targets: p99 < 50 ms and at least half the bare
endpoint's requests/s.

Needs KAFKA_BOOTSTRAP_SERVERS and BILLING_PG_ADMIN_DSN (``source deploy/local/env.sh``).
Example: ``.venv/bin/python bench/bench_api.py --resources 10000 --concurrency 32 --seconds 15``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import KAFKA, drop_database, dsn, emit, fresh_database, fresh_topics  # noqa: E402
from services.api.projector import Projector  # noqa: E402
from shared.batches import Charges, Item, Price, charges_id, measurement_batches  # noqa: E402
from shared.clock import month_bounds, parse_month  # noqa: E402
from shared.db import create_pool, migrate  # noqa: E402
from tests.sim_server import serve_app  # noqa: E402
from tests.support.processes import stop_all  # noqa: E402

CUSTOMER = uuid.UUID("0190b000-0000-7000-8000-0000000000be")
MIGRATIONS = ROOT / "services" / "api" / "migrations"


# ------------------------------------------------------------------------------------------ fill


async def fill(
    conn: asyncpg.Connection, api_dsn: str, resources: int, orgs: int, spaces: int, month: str
) -> dict[str, Any]:
    """Hourly charges for every resource and hour of the month, through the read model's own projector
    (as its consumer applies them, without Kafka), after the org-hour facts the ledger's usage lines would
    bring, so that every charge is attributed as it is applied."""
    start, end = month_bounds(parse_month(month))
    hours = int((end - start).total_seconds() // 3600)
    t0 = time.perf_counter()
    await conn.execute("INSERT INTO customer (customer_id) VALUES ($1)", CUSTOMER)
    await conn.execute(
        """
        INSERT INTO org_customer_hour (org_id, hour, customer_id)
        SELECT 'org-' || o, $1::timestamptz + h * interval '1 hour', $2
        FROM generate_series(0, $3 - 1) AS o, generate_series(0, $4 - 1) AS h
        """,
        start,
        CUSTOMER,
        orgs,
        hours,
    )
    # 512..2048 MB per app, priced at 1,000,000 microcredits per GB per 730 hours: exact, never rounded.
    template = measurement_batches(
        start, "cfapps", "MB",
        [Item(f"app-{r}", f"App {r}", f"org-{r % orgs}", f"Org {r % orgs}", f"space-{r % spaces}",
              f"Space {r % spaces}", "", 512 * (1 + r % 4)) for r in range(resources)],
        reading_id=uuid.uuid4(), taken_at=start,
    )
    price = Price(uuid.UUID(int=1), 1_000_000, 1024 * 730)
    pool = await create_pool(api_dsn, "api", max_size=2)
    projector = Projector(pool)
    try:
        batches: list[Charges] = []
        for h in range(hours):
            hour = start + timedelta(hours=h)
            for m in template:
                n = len(m.resource_id)
                batches.append(
                    Charges(
                        id=charges_id(hour, m.meter, m.shard, m.resource_id, [1] * n),
                        reading_hour=hour,
                        meter=m.meter,
                        unit=m.unit,
                        shard=m.shard,
                        priced_at=hour,
                        orgs=m.orgs,
                        spaces=m.spaces,
                        kinds=m.kinds,
                        prices=[price],
                        resource_id=m.resource_id,
                        resource_name=m.resource_name,
                        org=m.org,
                        space=m.space,
                        kind=m.kind,
                        value=m.value,
                        estimated=m.estimated,
                        revision=[1] * n,
                        price=[0] * n,
                        amount_numerator=[v * 1_000_000 for v in m.value],
                        amount_denominator=[1024 * 730] * n,
                    )
                )
            if h % 24 == 23 or h == hours - 1:  # a day at a time, as the consumer takes a batch
                await projector.apply_charges(batches)
                batches = []
    finally:
        await pool.close()
    counts = {
        t: await conn.fetchval(f"SELECT count(*) FROM {t}")
        for t in ("charge_shard", "usage_resource_day", "usage_month", "usage_day_group",
                  "usage_hour_group", "org_customer_hour")
    }
    await conn.execute("ANALYZE")
    return {"hours": hours, "rows": counts, "fill_seconds": round(time.perf_counter() - t0, 1)}


def answer_is_exact(body: dict[str, Any], resources: int, orgs: int, hours: int) -> bool:
    """Each org's microcredits_exact equals the sum, computed here with Fractions, of its resources'
    hourly charges (the same price as the fill: value MB x 1,000,000 / (1024 MB x 730 h))."""
    expected: dict[str, Fraction] = {}
    for r in range(resources):
        org = f"org-{r % orgs}"
        expected[org] = expected.get(org, Fraction(0)) + Fraction(512 * (1 + r % 4) * 1_000_000 * hours, 1024 * 730)
    got = {it["group"]["org_id"]: Fraction(*map(int, it["microcredits_exact"].split("/"))) for it in body["items"]}
    return got == expected


# ------------------------------------------------------------------------------------------ issuer


class Issuer:
    """A minimal OIDC issuer (discovery and JWKS) and a token for the benchmark's reader."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.url = ""

    def jwk(self) -> dict[str, str]:
        n = self.key.public_key().public_numbers()

        def b64(i: int) -> str:
            return base64.urlsafe_b64encode(i.to_bytes((i.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

        return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bench-1", "n": b64(n.n), "e": b64(n.e)}

    def token(self) -> str:
        from jose import jwt

        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": "bench-reader",
            "aud": "billing-api",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "scope": "usage.read",
            "customers": [str(CUSTOMER)],
        }
        return jwt.encode(claims, pem.decode(), algorithm="RS256", headers={"kid": "bench-1"})

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def discovery(request: Any) -> JSONResponse:
            return JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/.well-known/jwks.json"})

        async def jwks(request: Any) -> JSONResponse:
            return JSONResponse({"keys": [self.jwk()]})

        return Starlette(
            routes=[Route("/.well-known/openid-configuration", discovery), Route("/.well-known/jwks.json", jwks)]
        )


# ------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BARE_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
import uvicorn, sys

async def hello(request):
    return JSONResponse({"hello": "world"})

app = Starlette(routes=[Route("/bare", hello)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False, lifespan="off")
"""


@contextlib.asynccontextmanager
async def subprocess_server(
    args: list[str], env: dict[str, str], ready_url: str
) -> AsyncIterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server must never block on a full pipe
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(600):
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
                try:
                    if (await client.get(ready_url)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"{ready_url} never answered 200")
        yield proc
    finally:
        stop_all([proc], grace=30)
        log.close()


# ------------------------------------------------------------------------------------------ load


async def hammer(
    url: str, headers: dict[str, str], concurrency: int, seconds: float, warmup: float, client: str = "httpx"
) -> dict[str, Any]:
    """``concurrency`` clients, one connection each, requesting ``url`` back to back."""
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup
    stop_at = measure_from + seconds

    async def raw_worker() -> None:
        # A minimal HTTP/1.1 keep-alive client: a fixed request, responses read by Content-Length.
        nonlocal errors
        u = httpx.URL(url)
        target = u.raw_path.decode()
        lines = [f"GET {target} HTTP/1.1", f"host: {u.host}:{u.port}"] + [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection(u.host, u.port)
        try:
            while (now := loop.time()) < stop_at:
                t = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                took = time.perf_counter() - t
                if now >= measure_from:
                    if head.startswith(b"HTTP/1.1 200"):
                        latencies.append(took)
                    else:
                        errors += 1
        finally:
            writer.close()
            await writer.wait_closed()

    async def worker() -> None:
        nonlocal errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
            while (now := loop.time()) < stop_at:
                t = time.perf_counter()
                resp = await client.get(url)
                took = time.perf_counter() - t
                if now >= measure_from:
                    if resp.status_code == 200:
                        latencies.append(took)
                    else:
                        errors += 1

    await asyncio.gather(*((raw_worker if client == "raw" else worker)() for _ in range(concurrency)))
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2) if latencies else float("nan")
        )

    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


# ------------------------------------------------------------------------------------------ main


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    database = await fresh_database("bench_api")
    prefix = await fresh_topics()
    try:
        # One connection without a statement timeout: filling millions of rows takes minutes.
        conn = await asyncpg.connect(
            dsn(database, "api"), server_settings={"search_path": "api", "timezone": "UTC"}, command_timeout=None
        )
        try:
            await migrate(conn, "api", MIGRATIONS)
            filled = await fill(conn, dsn(database, "api"), opts.resources, opts.orgs, opts.spaces, opts.month)
        finally:
            await conn.close()
        start, end = month_bounds(parse_month(opts.month))
        query = httpx.QueryParams(
            {
                "from": start.isoformat().replace("+00:00", "Z"),
                "to": end.isoformat().replace("+00:00", "Z"),
                "granularity": "month",
                "group_by": "org",
            }
        )
        issuer = Issuer()
        async with serve_app(issuer.app()) as issuer_url:
            issuer.url = issuer_url
            api_port, bare_port = free_port(), free_port()
            env = {
                **os.environ,
                "API_DATABASE_URL": dsn(database, "api"),
                "API_PORT": str(api_port),
                "API_OIDC_ISSUER": issuer_url,
                "API_LOG_LEVEL": "WARNING",
                "API_DB_POOL_SIZE": str(opts.pool),
                "KAFKA_BOOTSTRAP_SERVERS": KAFKA,
                "KAFKA_TOPIC_PREFIX": prefix,
            }
            headers = {"authorization": f"Bearer {issuer.token()}"}
            usage_url = f"http://127.0.0.1:{api_port}/v1/customers/{CUSTOMER}/usage?{query}"
            api_cmd = [sys.executable, "-c", "from services.api.app import main; main()"]
            runs: dict[str, dict[str, Any]] = {}
            for label, cache_seconds in (("api", opts.cache_seconds), ("api_uncached", 0.0)):
                env["API_QUERY_CACHE_SECONDS"] = str(cache_seconds)
                async with subprocess_server(api_cmd, env, f"http://127.0.0.1:{api_port}/readyz"):
                    async with httpx.AsyncClient() as client:
                        sample = await client.get(usage_url, headers=headers)
                    if sample.status_code != 200:
                        raise RuntimeError(f"the usage query failed: {sample.status_code} {sample.text[:500]}")
                    body = sample.json()
                    runs[label] = await hammer(
                        usage_url, headers, opts.concurrency, opts.seconds, opts.warmup, opts.client
                    )
                    runs[label]["query_cache_seconds"] = cache_seconds
            api = runs["api"]
            async with subprocess_server([sys.executable, "-c", BARE_APP, str(bare_port)], dict(os.environ), f"http://127.0.0.1:{bare_port}/bare"):
                bare = await hammer(
                    f"http://127.0.0.1:{bare_port}/bare", {}, opts.concurrency, opts.seconds, opts.warmup, opts.client
                )
        ratio = round(api["rps"] / bare["rps"], 3) if bare["rps"] else None
        return {
            "query": "GET /v1/customers/{id}/usage granularity=month group_by=org",
            "resources": opts.resources,
            "orgs": opts.orgs,
            "spaces": opts.spaces,
            "month": opts.month,
            **filled,
            "answer_items": len(body["items"]),
            "answer_microcredits": sum(it["microcredits"] for it in body["items"]),
            "answer_matches_oracle": answer_is_exact(body, opts.resources, opts.orgs, filled["hours"]),
            "concurrency": opts.concurrency,
            "client": opts.client,
            "seconds": opts.seconds,
            "api": api,
            "api_uncached": runs["api_uncached"],
            "bare_starlette": bare,
            "rps_ratio": ratio,
            "targets": {"p99_ms_below": 50, "rps_ratio_at_least": 0.5},
            "met": bool(api["p99_ms"] < 50 and ratio is not None and ratio >= 0.5 and api["errors"] == 0),
            "note": "the load generator and the servers share the machine's cores",
        }
    finally:
        if not opts.keep:
            await drop_database(database)
            await _delete_topics(prefix)


async def _delete_topics(prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from shared.topics import ALL_TOPICS

    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        await admin.delete_topics([prefix + t for t in ALL_TOPICS])
    except Exception as exc:  # noqa: BLE001 - tidying up must not hide the result
        print(f"could not delete the bench topics: {exc!r}", file=sys.stderr)
    finally:
        await admin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resources", type=int, default=10_000)
    p.add_argument("--orgs", type=int, default=20)
    p.add_argument("--spaces", type=int, default=200)
    p.add_argument("--month", default="2026-10")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--pool", type=int, default=8, help="the api's database pool size")
    p.add_argument("--cache-seconds", type=float, default=1.0, help="the api's query cache (API_QUERY_CACHE_SECONDS)")
    p.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="raw",
        help="load generator: a minimal asyncio HTTP/1.1 keep-alive client per worker (default), or an "
        "httpx.AsyncClient per worker (httpx itself then saturates a core at a few hundred requests/s)",
    )
    p.add_argument("--keep", action="store_true", help="keep the database and topics afterwards")
    opts = p.parse_args()
    result = asyncio.run(run(opts))
    result["started_at"] = datetime.now(UTC).isoformat()
    emit(result, "api")


if __name__ == "__main__":
    main()
