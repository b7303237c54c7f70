"""What the benchmarks share: a fresh database and topic set on the local stack, machine facts, results."""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from cli.localstack import ADMIN_DSN, KAFKA, ROOT, drop_database, dsn, free_port, fresh_database  # noqa: F401  (re-exported)
from cli.localstack import fresh_topics as _fresh_topics
from shared.ids import NAMESPACE


def named_id(name: str) -> str:
    """The deterministic id of ``name`` (uuid5 in the project's namespace, as ``shared.ids`` derives them)."""
    return str(uuid.uuid5(NAMESPACE, name))


async def produce(topic: str, messages: Iterable[tuple[bytes, bytes]], chunk: int = 20_000) -> tuple[int, float]:
    """Publish (key, value) pairs as they are generated, ``chunk`` at a time (acknowledged by the broker
    before the next chunk); returns (messages, seconds)."""
    from shared.kafka import Outgoing, Publisher

    publisher = Publisher(KAFKA, client_id="bench-producer")
    await publisher.start()
    started = time.perf_counter()
    count = 0
    try:
        pending: list[Outgoing] = []
        for key, value in messages:
            pending.append(Outgoing(key, value))
            if len(pending) >= chunk:
                count += await publisher.publish(topic, pending)
                pending = []
        count += await publisher.publish(topic, pending)
    finally:
        await publisher.stop()
    return count, time.perf_counter() - started


async def fresh_topics() -> str:
    return await _fresh_topics("bench")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in bytes; empty once the process is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0]) * 1024
    except FileNotFoundError:
        pass
    return out


async def committed(admin: Any, group: str, topic: str) -> int:
    """Offsets ``group`` has committed on ``topic``, summed over its partitions."""
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def wait_ready(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 60) -> None:
    """Until the service ``name`` started as ``proc`` answers /readyz with 200 on ``port``."""
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = proc.stderr.read().decode()[-3000:] if proc.stderr else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}: {tail}")
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} not ready in time")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat, idle and iowait
    excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_gib, 1), "python": platform.python_version()}


def emit(result: dict[str, Any], name: str) -> None:
    """Print the result as one JSON line and keep it in bench/out/<name>.json."""
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps({"bench": name, "machine": machine(), **result})
    (out / f"{name}.json").write_bytes(data + b"\n")
    print(data.decode())
