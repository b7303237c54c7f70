"""Load test of the slow-client limits (issue 19, item 5): ``--slow`` clients that try to hold connections by
sending one byte every ``--byte-every`` seconds, and ``--normal`` ordinary clients, against one service
running as in production (``billing pricer``: uvicorn with ``shared.server``'s deadlines and connection cap,
its default settings) on a fresh database and topic set of the local stack.

- Half the slow clients trickle a request head (``GET /internal/prices ...``), the other half send a whole
  head (with a valid admin token) and trickle the body of a ``POST /internal/prices``. When the server cuts
  one off, it connects and starts again at once, so that ``--slow`` connections are held (or attempted)
  for the whole run.
- Each normal client has one keep-alive connection (httpx) and sends, back to back with ``--think`` seconds
  between, ``GET /healthz`` and ``GET /internal/prices?limit=10`` (a token verified, a database read) in
  turn.

The tokens come from a local OIDC issuer (``bench.bench_api.Issuer``) the pricer is pointed at.

The run passes when every normal request is answered 2xx with p99 under ``--p99-ms`` (200), and every slow
connection is cut off after its deadline (head: ``PRICER_HTTP_HEADER_TIMEOUT_SECONDS``, body:
``PRICER_HTTP_BODY_TIMEOUT_SECONDS``) and no later than ``--slack`` seconds after it. Prints one JSON line
(kept in bench/out/load_slow_clients.json); exits 1 when the run fails. Not part of ``make bench``:

    .venv/bin/python -m bench.load_slow_clients [--seconds 60] [--slow 100] [--normal 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from jose import jwt

from bench.bench_api import Issuer, subprocess_server
from bench.common import KAFKA, drop_database, dsn, emit, free_port, fresh_database, fresh_topics, proc_status
from services.pricer.settings import PricerSettings
from shared.topics import delete_topics
from tests.sim_server import serve_app

PRICE = (
    b'{"meter":"cfapps","resource_kind":"","unit_of_measure":"MB-hour","microcredits_per_unit":1000000,'
    b'"unit":747520,"valid_from":"2026-01-01T00:00:00Z"}'
)


def admin_token(issuer: Issuer) -> str:
    """A token of ``issuer`` with the scope the pricer's routes want, valid for an hour."""
    pem = issuer.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    now = int(time.time())
    claims = {"iss": issuer.url, "sub": "bench-admin", "aud": "billing-api", "iat": now, "nbf": now,
              "exp": now + 3600, "scope": "usage.admin"}
    return str(jwt.encode(claims, pem.decode(), algorithm="RS256", headers={"kid": "bench-1"}))


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 1)


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    for i in range(len(data)):
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except (ConnectionError, RuntimeError):
            return
        await asyncio.sleep(every)


async def slow_client(
    port: int, token: str, kind: str, every: float, stop_at: float, cuts: list[dict[str, Any]], held: list[float]
) -> None:
    """Trickle a head (``kind`` "head") or a body ("body") one byte every ``every`` seconds; record when and
    how the server cut the connection off; start again until ``stop_at``."""
    loop = asyncio.get_running_loop()
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n"
    head = b"GET /internal/prices?limit=10 HTTP/1.1\r\nHost: bench\r\n" + auth + b"\r\n"
    post = (
        b"POST /internal/prices HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" + auth
        + b"Content-Length: " + str(len(PRICE)).encode() + b"\r\n\r\n"
    )
    while loop.time() < stop_at:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened = loop.time()
        if kind == "body":
            writer.write(post)
        sender = asyncio.create_task(_trickle(writer, head if kind == "head" else PRICE, every))
        answer, status = b"", ""
        try:
            async with asyncio.timeout(120):  # far beyond any deadline: a connection still open then is held
                while chunk := await reader.read(65536):
                    answer += chunk
        except TimeoutError:
            status = "held"
        except ConnectionError:  # closed with our unread bytes in its buffer: a reset, maybe before the answer
            status = "reset"
        sender.cancel()
        writer.close()
        elapsed = loop.time() - opened
        if status == "held":
            held.append(elapsed)
            return
        if answer.startswith(b"HTTP/1.1 "):
            status = answer.split(b" ", 2)[1].decode()
        cuts.append({"kind": kind, "seconds": elapsed, "status": status or "closed", "opened": opened})


async def normal_client(
    url: str, token: str, think: float, stop_at: float, latencies: list[float], statuses: Counter[str]
) -> None:
    loop = asyncio.get_running_loop()
    paths = ["/healthz", "/internal/prices?limit=10"]
    n = 0
    headers = {"authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers=headers) as http:
        while loop.time() < stop_at:
            started = time.perf_counter()
            try:
                resp = await http.get(paths[n % 2])
                statuses[str(resp.status_code)] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            latencies.append((time.perf_counter() - started) * 1000)
            n += 1
            await asyncio.sleep(think)


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    defaults = PricerSettings()
    head_timeout, body_timeout = defaults.http_header_timeout_seconds, defaults.http_body_timeout_seconds
    db = await fresh_database("load_slow")
    prefix = await fresh_topics()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    issuer = Issuer()
    try:
        async with serve_app(issuer.app()) as issuer_url, contextlib.AsyncExitStack() as stack:
            issuer.url = issuer_url
            token = admin_token(issuer)
            env = {
                **os.environ,
                "PRICER_DATABASE_URL": dsn(db, "pricer"),
                "KAFKA_BOOTSTRAP_SERVERS": KAFKA,
                "KAFKA_TOPIC_PREFIX": prefix,
                "PRICER_PORT": str(port),
                "PRICER_LOG_LEVEL": "WARNING",
                "PRICER_OIDC_ISSUER": issuer_url,
            }
            server = [sys.executable, "-m", "cli.main", "pricer"]
            proc = await stack.enter_async_context(subprocess_server(server, env, f"{url}/readyz"))
            async with httpx.AsyncClient(base_url=url) as http:  # one price, so that the reads return a row
                created = await http.post(
                    "/internal/prices", content=PRICE,
                    headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
                )
                assert created.status_code == 201, created.text
            loop = asyncio.get_running_loop()
            started = loop.time()
            stop_at = started + opts.seconds
            cuts: list[dict[str, Any]] = []
            held: list[float] = []
            latencies: list[float] = []
            statuses: Counter[str] = Counter()
            slow = [
                asyncio.create_task(
                    slow_client(port, token, "head" if i % 2 == 0 else "body", opts.byte_every, stop_at, cuts, held)
                )
                for i in range(opts.slow)
            ]
            await asyncio.sleep(1.0)  # the slow ones hold their connections before the others come
            normal = [
                asyncio.create_task(normal_client(url, token, opts.think, stop_at, latencies, statuses))
                for _ in range(opts.normal)
            ]
            await asyncio.gather(*normal)
            # The slow clients' last connections: wait until they are cut off too (or time out).
            await asyncio.wait_for(asyncio.gather(*slow), timeout=body_timeout + 30)
            rss = proc_status(proc.pid)
    finally:
        await delete_topics(KAFKA, prefix)
        await drop_database(db)

    limits = {"head": head_timeout, "body": body_timeout}
    by_kind: dict[str, Any] = {}
    late = 0
    for kind, limit in limits.items():
        times = [c["seconds"] for c in cuts if c["kind"] == kind]
        early = sum(1 for t in times if t < limit - 0.05)
        too_late = sum(1 for t in times if t > limit + (1.0 if kind == "body" else 0) + opts.slack)
        late += too_late + early
        by_kind[kind] = {
            "timeout_s": limit,
            "connections_cut": len(times),
            "statuses": dict(Counter(c["status"] for c in cuts if c["kind"] == kind)),
            "cut_after_s": {"min": _pct(times, 0), "p50": _pct(times, 50), "max": _pct(times, 100)},
            "cut_early": early,
            "cut_late": too_late,
        }
    ok_requests = sum(n for s, n in statuses.items() if s.startswith("2"))
    p99 = _pct(latencies, 99)
    passed = (
        ok_requests == len(latencies) > 0 and p99 is not None and p99 < opts.p99_ms and late == 0 and not held
        and all(by_kind[k]["connections_cut"] > 0 for k in limits)
    )
    return {
        "passed": passed,
        "seconds": opts.seconds,
        "server": {
            "service": "pricer",
            "http_max_connections": defaults.http_max_connections,
            "http_keep_alive_seconds": defaults.http_keep_alive_seconds,
            "peak_rss_mb": round(rss.get("VmHWM", 0) / 2**20),
        },
        "normal": {
            "clients": opts.normal,
            "think_s": opts.think,
            "requests": len(latencies),
            "statuses": dict(statuses),
            "latency_ms": {"p50": _pct(latencies, 50), "p95": _pct(latencies, 95), "p99": p99,
                           "max": _pct(latencies, 100)},
            "p99_limit_ms": opts.p99_ms,
        },
        "slow": {"clients": opts.slow, "byte_every_s": opts.byte_every, "never_cut": len(held), **by_kind},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the normal clients run")
    parser.add_argument("--slow", type=int, default=100, help="slow clients (half trickle heads, half bodies)")
    parser.add_argument("--normal", type=int, default=20, help="normal clients")
    parser.add_argument("--byte-every", type=float, default=5.0, help="a slow client's pace (seconds per byte)")
    parser.add_argument("--think", type=float, default=0.05, help="a normal client's pause between requests")
    parser.add_argument("--p99-ms", type=float, default=200.0, help="the normal requests' p99 must stay under this")
    parser.add_argument("--slack", type=float, default=2.0, help="how late after its deadline a cut may come")
    opts = parser.parse_args()
    result = asyncio.run(run(opts))
    emit(result, "load_slow_clients")
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
