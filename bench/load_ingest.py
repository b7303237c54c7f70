"""Load test of the ingest path (issue 8, "Load"): collector publish -> pricer -> ledger -> api read model
at twice the end-to-end benchmark's steady hourly load, for ``--minutes`` minutes (default 10), with
flat memory and no growing consumer lag.

The load. ``bench/bench_e2e.py`` measures its steady state by publishing one simulated hour of 10,000
resources (its ``World``), waiting until every customer's balance in the api reflects it, and publishing
the next: one hour every ~4 s (publish -> balance p50 3.5 s, p99 4.3 s on the 2-core machine, README),
i.e. ~2,500 measurements/s. Twice that here: ``--resources 20000`` per simulated hour, one hour every
``--hour-seconds 4`` on a fixed schedule (not waiting for the pipeline) = 5,000 measurements/s, published
as the collector's relay publishes (usage.readings.v2 batches, keyed by shard).

The pricer, the ledger and the api run as their own processes (``tests.stack.Stack``) on a fresh
database and topic set. Every ``--sample-seconds`` the RSS of each service and the lag of each consumer
group (end offsets minus committed offsets, summed over partitions) are sampled.

Pass criteria (printed; the run exits 1 when one fails), over the samples after a warm-up of the first
sixth of the run (at most 90 s):
  - offered load: at least 95% of the target measurements/s were published (else the generator, not the
    pipeline, was the limit);
  - memory flat: for each service, the mean RSS of the last third of the samples is at most
    max(10%, 30 MB) above the mean of the first third;
  - lag not growing: for each consumer group, the mean lag of the last third is at most the mean lag of
    the first third plus one simulated hour's messages on its topic, and the lag never exceeds five
    hours' messages (bounded);
  - drained and exact: after the last hour, every lag reaches 0 within ``--drain-seconds`` and every
    customer's balance in the api equals the exact expected figure (floor per customer, month, price).

Writes bench/out/load_ingest.json (with every sample) and a summary into bench/results.json under
``load.ingest`` (other keys kept). The topics and the database are deleted at the end, also on failure,
Ctrl-C or SIGTERM.

    .venv/bin/python -m bench.load_ingest --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.bench_e2e import HOUR, START, World, set_up
from bench.common import KAFKA, ROOT, drop_database, dsn, emit, fresh_database, fresh_topics
from bench.load_api import record_load
from shared.kafka import Publisher
from shared.topics import CHARGES, READINGS, TRANSACTIONS, delete_topics
from simulator.oidc import mint_token
from tests.stack import Stack

SERVICES = ("pricer", "ledger", "api")
# consumer (label) -> (service's group, topic it consumes)
GROUPS = {
    "pricer": ("pricer", READINGS),
    "ledger": ("ledger", CHARGES),
    "api_charges": ("api", CHARGES),
    "api_transactions": ("api", TRANSACTIONS),
}
MB = 2**20


class LagProbe:
    """Consumer-group lags and topic end offsets, over one admin client and one consumer for the run."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
        self.probe = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
        self.partitions: dict[str, list[TopicPartition]] = {}
        self.group_ids: dict[str, str] = {}

    async def start(self) -> None:
        await self.admin.start()
        await self.probe.start()
        topics = {self.prefix + t for _, t in GROUPS.values()}
        for meta in await self.admin.describe_topics(sorted(topics)):
            self.partitions[meta["topic"]] = [TopicPartition(meta["topic"], p["partition"]) for p in meta["partitions"]]
        # The services name their groups after themselves, prefixed like the topics in newer versions of
        # shared/runtime.py: use whichever of the two the running consumers joined.
        groups = {g[0] for g in await self.admin.list_consumer_groups()}
        for label, (group, _) in GROUPS.items():
            self.group_ids[label] = self.prefix + group if self.prefix + group in groups else group

    async def stop(self) -> None:
        await self.probe.stop()
        await self.admin.close()

    async def ends(self) -> dict[str, int]:
        out = {}
        for topic, tps in self.partitions.items():
            out[topic] = sum((await self.probe.end_offsets(tps)).values())
        return out

    async def lags(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for label, (_, topic) in GROUPS.items():
            tps = self.partitions[self.prefix + topic]
            ends = await self.probe.end_offsets(tps)
            committed = await self.admin.list_consumer_group_offsets(self.group_ids[label], partitions=tps)
            lag = 0
            for tp, end in ends.items():
                meta = committed.get(tp)
                lag += max(0, end - (meta.offset if meta is not None and meta.offset >= 0 else 0))
            out[label] = lag
        return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def judge(samples: list[dict[str, Any]], warmup_s: float, per_hour: dict[str, float]) -> dict[str, Any]:
    """The memory and lag verdicts over the samples after the warm-up (see the module doc)."""
    steady = [s for s in samples if s["t"] >= warmup_s]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    memory: dict[str, Any] = {}
    for svc in SERVICES:
        a, b = _mean([s["rss_mb"][svc] for s in first]), _mean([s["rss_mb"][svc] for s in last])
        allowed = max(0.10 * a, 30.0)
        memory[svc] = {
            "start_mb": round(samples[0]["rss_mb"][svc], 1),
            "first_third_mb": round(a, 1),
            "last_third_mb": round(b, 1),
            "end_mb": round(samples[-1]["rss_mb"][svc], 1),
            "peak_mb": round(max(s["rss_mb"][svc] for s in samples), 1),
            "allowed_growth_mb": round(allowed, 1),
            "flat": b - a <= allowed,
        }
    lag: dict[str, Any] = {}
    for label in GROUPS:
        a, b = _mean([s["lag"][label] for s in first]), _mean([s["lag"][label] for s in last])
        peak = max(s["lag"][label] for s in steady)
        hour = per_hour[label]
        lag[label] = {
            "after_warmup": steady[0]["lag"][label],
            "first_third_mean": round(a),
            "last_third_mean": round(b),
            "end": steady[-1]["lag"][label],
            "peak": peak,
            "one_hour_messages": round(hour),
            "not_growing": b <= a + hour,
            "bounded": peak <= 5 * hour,
        }
    return {"memory": memory, "lag": lag, "steady_samples": len(steady)}


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    world = World(opts.resources)
    duration = opts.minutes * 60
    hours_total = int(duration // opts.hour_seconds)
    target_rate = opts.resources / opts.hour_seconds
    db = await fresh_database("load_ingest")
    prefix = await fresh_topics()
    stack = Stack(lambda role: dsn(db, role), prefix, ROOT / "bench" / "out" / "logs-load-ingest")
    probe = LagProbe(prefix)
    publisher = Publisher(KAFKA, client_id="load-collector")
    samples: list[dict[str, Any]] = []
    try:
        await stack.start("sim", *SERVICES)
        customers = await set_up(stack, world)
        await publisher.start()
        await probe.start()
        ends0 = await probe.ends()
        topic = prefix + READINGS
        published_hours: list[datetime] = []
        t0 = time.perf_counter()
        late = 0

        async def sample_loop() -> None:
            while True:
                samples.append({
                    "t": round(time.perf_counter() - t0, 1),
                    "hours": len(published_hours),
                    "rss_mb": {svc: stack.rss_mb(svc) for svc in SERVICES},
                    "lag": await probe.lags(),
                })
                for svc in SERVICES:
                    if stack.procs[svc].poll() is not None:
                        raise RuntimeError(f"{svc} exited with {stack.procs[svc].returncode}")
                await asyncio.sleep(opts.sample_seconds)

        sampler = asyncio.create_task(sample_loop())
        try:
            for k in range(hours_total):
                due = t0 + k * opts.hour_seconds
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                else:
                    late += 1
                h = START + HOUR * k
                await publisher.publish(topic, world.messages(h))
                published_hours.append(h)
                if sampler.done():
                    sampler.result()
            if (wait := t0 + duration - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            publish_seconds = time.perf_counter() - t0
        finally:
            sampler.cancel()
            try:
                await sampler
            except asyncio.CancelledError:
                pass
        # Drain: every lag to 0, then every balance exact.
        td = time.perf_counter()
        drained_after: float | None = None
        while time.perf_counter() - td < opts.drain_seconds:
            current = await probe.lags()
            if not any(current.values()):
                drained_after = time.perf_counter() - td
                break
            await asyncio.sleep(1)
        # One simulated hour's messages on each topic, counted once the pipeline has caught up.
        ends1 = await probe.ends()
        per_hour = {
            label: (ends1[prefix + t] - ends0[prefix + t]) / max(1, len(published_hours))
            for label, (_, t) in GROUPS.items()
        }
        want = world.expected_used(published_hours)
        token = mint_token(["usage.admin", "usage.read"], issuer=stack.url("sim"))
        wrong: list[str] = []
        async with httpx.AsyncClient(
            base_url=stack.url("api"), headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as api:
            for i, cid in enumerate(customers):
                resp = await api.get(f"/v1/customers/{cid}/balance")
                if resp.status_code != 200 or int(resp.json()["used"]) != want.get(i, 0):
                    wrong.append(f"customer {i}: {resp.status_code} {resp.text[:200]} (expected used {want.get(i, 0)})")

        warmup = min(90.0, duration / 6)
        verdict = judge(samples, warmup, per_hour)
        measurements = len(published_hours) * opts.resources
        offered = measurements / publish_seconds
        checks = {
            "offered_load": offered >= 0.95 * target_rate,
            "memory_flat": all(v["flat"] for v in verdict["memory"].values()),
            "lag_not_growing": all(v["not_growing"] for v in verdict["lag"].values()),
            "lag_bounded": all(v["bounded"] for v in verdict["lag"].values()),
            "drained": drained_after is not None,
            "balances_exact": not wrong,
        }
        return {
            "resources_per_hour": opts.resources,
            "hour_seconds": opts.hour_seconds,
            "target_measurements_per_s": round(target_rate),
            "offered_measurements_per_s": round(offered),
            "baseline": "bench_e2e steady phase: 10,000 resources per hour, one hour every ~4 s (~2,500/s)",
            "minutes": opts.minutes,
            "hours_published": len(published_hours),
            "hours_late": late,
            "measurements": measurements,
            "warmup_seconds": warmup,
            "sample_seconds": opts.sample_seconds,
            **verdict,
            "drain_seconds": round(drained_after, 1) if drained_after is not None else None,
            "balance_mismatches": wrong,
            "checks": checks,
            "passed": all(checks.values()),
            "samples": samples,
        }
    finally:
        for close in (publisher.stop, probe.stop):
            with contextlib.suppress(Exception):  # tidying up (perhaps of what never started) must go on
                await close()
        stack.stop()
        try:
            await drop_database(db)
        finally:
            await delete_topics(KAFKA, prefix=prefix)


def _print_summary(r: dict[str, Any]) -> None:
    print(f"offered {r['offered_measurements_per_s']}/s (target {r['target_measurements_per_s']}/s) for "
          f"{r['minutes']} min: {r['hours_published']} hours, {r['measurements']} measurements", file=sys.stderr)
    for svc, m in r["memory"].items():
        print(f"  RSS {svc:6} start {m['start_mb']} MB, first third {m['first_third_mb']}, last third "
              f"{m['last_third_mb']}, end {m['end_mb']}, peak {m['peak_mb']} (allowed +{m['allowed_growth_mb']}): "
              f"{'flat' if m['flat'] else 'GROWING'}", file=sys.stderr)
    for g, lag in r["lag"].items():
        print(
            f"  lag {g:16} after warm-up {lag['after_warmup']}, first third {lag['first_third_mean']}, last third "
            f"{lag['last_third_mean']}, end {lag['end']}, peak {lag['peak']} (one hour = {lag['one_hour_messages']}): "
            f"{'ok' if lag['not_growing'] and lag['bounded'] else 'GROWING/UNBOUNDED'}",
            file=sys.stderr,
        )
    print(f"  drained in {r['drain_seconds']} s; balances exact: {not r['balance_mismatches']}", file=sys.stderr)
    for name, ok in r["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--resources", type=int, default=20_000, help="resources per simulated hour (2x bench_e2e's 10,000)")
    p.add_argument(
        "--hour-seconds", type=float, default=4.0, help="one simulated hour published every this many seconds"
    )
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--drain-seconds", type=float, default=300.0)
    p.add_argument("--no-record", action="store_true", help="do not write bench/results.json")
    opts = p.parse_args()

    async def guarded() -> dict[str, Any]:
        # SIGTERM cancels the run like Ctrl-C does, so that the finally blocks delete the topics.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(opts)

    try:
        result = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the run's topics and database were deleted", file=sys.stderr)
        raise SystemExit(130) from None
    result["started_at"] = datetime.now(UTC).isoformat()
    emit(result, "load_ingest")
    if not opts.no_record:
        record_load("ingest", {k: v for k, v in result.items() if k != "samples"})
    _print_summary(result)
    if not result["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
