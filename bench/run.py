"""``make bench``: every benchmark in one run on one machine, then ``bench/results.json``,
``bench/results.md`` and ``bench/chart.png``.

``BENCH_SCALE=small`` (a few minutes, for development) or ``full`` (the sizes the issues name).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.common import ADMIN_DSN, machine, machine_busy_seconds

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")

SCALES: dict[str, dict[str, list[str]]] = {
    "small": {
        "collector": ["-m", "bench.bench_collector", "--apps", "6000", "--services", "2000", "--orgs", "10"],
        "pricer": ["bench/bench_pricer.py", "--count", "100000", "--resources", "1000"],
        "ledger": [
            "bench/bench_ledger.py",
            "--count",
            "100000",
            "--resources",
            "1000",
            "--orgs",
            "100",
            "--customers",
            "10",
        ],
        "api": ["bench/bench_api.py", "--resources", "1000", "--seconds", "5", "--warmup", "1"],
        "e2e": ["-m", "bench.bench_e2e", "--resources", "1000", "--hours", "72", "--latency-hours", "3"],
        "baselines": ["-m", "bench.bench_baselines", "--resources", "1000", "--hours", "72"],
        "floor": ["-m", "bench.bench_floor", "--count", "200000"],
    },
    "full": {
        "collector": ["-m", "bench.bench_collector"],
        # 8 M: at ~480,000/s, 2 M was a one-second window between the 0.25 s samples (two instances: none)
        "pricer": ["bench/bench_pricer.py", "--count", "8000000"],
        "pricer_x2": ["bench/bench_pricer.py", "--count", "8000000", "--instances", "2"],
        "ledger": ["bench/bench_ledger.py", "--count", "2000000"],
        "ledger_x2": ["bench/bench_ledger.py", "--count", "2000000", "--instances", "2"],
        "api": ["bench/bench_api.py"],
        "e2e": ["-m", "bench.bench_e2e", "--resources", "10000", "--hours", "744"],
        "baselines": ["-m", "bench.bench_baselines", "--resources", "10000", "--hours", "744"],
        "floor": ["-m", "bench.bench_floor", "--count", "2000000"],
    },
    # Ten minutes (and more) of the pricer and of the ledger alone at full speed, one instance each: is
    # memory flat? Kept under the "soak" key of results.json until this scale runs again.
    "soak": {
        "pricer": ["bench/bench_pricer.py", "--count", "22000000"],
        "ledger": ["bench/bench_ledger.py", "--count", "32000000"],
    },
}


def _busy_share(seconds: float) -> float:
    """The share of the machine's CPU time spent busy over the next ``seconds`` (all cores)."""
    busy = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - busy) / (seconds * (os.cpu_count() or 1))


async def _checkpoint() -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def settle(quiet: float = 0.15, limit_s: float = 60) -> None:
    """Start each benchmark on a quiet machine: the previous one's dirty pages written out now (a
    checkpoint; otherwise the next timed checkpoint lands in the middle of a measured window), then wait
    until the machine is idle (below ``quiet`` busy over a second: the previous benchmark's databases
    dropped, Kafka's log deletion done), at most ``limit_s``."""
    asyncio.run(_checkpoint())
    deadline = time.monotonic() + limit_s
    while _busy_share(1.0) > quiet and time.monotonic() < deadline:
        pass


def run_one(name: str, args: list[str]) -> dict[str, Any]:
    settle()
    print(f"== {name}: {' '.join(args)}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "seconds": round(time.perf_counter() - t, 1)}
    result = orjson.loads(lines[-1])
    result.pop("machine", None)
    print(f"   {orjson.dumps(result).decode()[:400]}", flush=True)
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def ratio_value(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# The figures of the last full run of the first design (one message and one row per measurement,
# usage.*.v1), kept to show beside the new ones (issue 15).
BEFORE = ROOT / "bench" / "results_v1.json"


def _peak(d: dict[str, Any]) -> Any:
    v = d.get("peak_rss_mb")
    return max(v or [0]) if isinstance(v, list) else v


def _caught_up(e2e: dict[str, Any]) -> int | None:
    """Measurements/s from the first publish until the ledger and the api's read model have both caught up."""
    total, spans = e2e.get("measurements"), [e2e.get("e2e_seconds"), e2e.get("api_read_model_done_s")]
    if not total or not all(spans):
        return None
    return round(total / max(spans))  # type: ignore[type-var]


def _figures(r: dict[str, Any]) -> dict[str, Any]:
    """The compared figures of one run's results (either design)."""
    e2e, base, floor = r.get("e2e", {}), r.get("baselines", {}), r.get("floor", {})
    pri, led, pri2, led2 = r.get("pricer", {}), r.get("ledger", {}), r.get("pricer_x2", {}), r.get("ledger_x2", {})
    col, api_all = r.get("collector", {}), r.get("api", {})
    api = api_all.get("api", {})
    per = lambda d, k: (d.get(k) or {}).get("measurements_per_s") or (d.get(k) or {}).get("messages_per_s")  # noqa: E731
    lf = floor.get("ledger", {})
    return {
        "e2e": e2e.get("e2e_measurements_per_s"),
        "caught_up": _caught_up(e2e),
        "p50": e2e.get("publish_to_balance_p50_s"),
        "p99": e2e.get("publish_to_balance_p99_s"),
        "publish": e2e.get("collector_publish_per_s"),
        "api_updates": e2e.get("api_read_model_updates_per_s"),
        "pricer": pri.get("sustained_measurements_per_s"),
        "pricer_rss": _peak(pri),
        "ledger": led.get("sustained_charges_per_s"),
        "ledger_rss": _peak(led),
        "pricer2": pri2.get("sustained_measurements_per_s"),
        "ledger2": led2.get("sustained_charges_per_s"),
        "rss_max": max([v["peak"] for v in (e2e.get("rss_mb") or {}).values()] or [0]) or None,
        "collector_s": col.get("seconds"),
        "collector_rss": col.get("peak_rss_mb"),
        "api_p99": api.get("p99_ms"),
        "api_rps": api.get("rps"),
        "sql": base.get("set_based_sql_measurements_per_s"),
        "copy_rows": base.get("postgres_copy_rows_per_s"),
        "kafka_records": base.get("kafka_producer_perf_records_per_s"),
        "floor_consume": per(floor, "consume"),
        "floor_decode": per(floor, "decode"),
        "floor_forward": per(floor, "forward"),
        "floor_price": per(floor, "price"),
        "floor_copy": (floor.get("copy") or {}).get("measurements_per_s")
        or (floor.get("copy") or {}).get("rows_per_s"),
        "pricer_bound": floor.get("pricer_bound_per_s"),
        "ledger_decode": per(lf, "decode"),
        "ledger_bound": lf.get("ledger_bound_per_s"),
    }


def markdown(results: dict[str, Any], scale: str) -> str:
    m = results["machine"]
    now = _figures(results["results"])
    before_run = orjson.loads(BEFORE.read_bytes()) if BEFORE.exists() else {"results": {}}
    was = _figures(before_run["results"])
    pair = lambda k, j=" / ", k2=None: (  # noqa: E731
        f"{was[k]}{j}{was[k2]}" if k2 else was[k], f"{now[k]}{j}{now[k2]}" if k2 else now[k])
    rows: list[tuple[str, Any, Any, str, str]] = [
        ("end to end: collector publish → ledger committed (measurements/s)", *pair("e2e"), "≥ 100,000",
         ratio(now["e2e"], 100_000)),
        ("end to end until the api's read model has caught up too (measurements/s)", *pair("caught_up"), "≥ 100,000",
         ratio(now["caught_up"], 100_000)),
        ("set-based SQL pricing + posting of the month, same run (measurements/s)", *pair("sql"), "alternative", ""),
        ("end to end ÷ set-based SQL", ratio(was["e2e"], was["sql"]), ratio(now["e2e"], now["sql"]),
         "aim ≥ 0.5 (moonshot ≥ 1)", ratio(ratio_value(now["e2e"], now["sql"]), 0.5)),
        ("publish → balance in the api, p50 / p99 (s), 10,000 resources an hour", *pair("p50", k2="p99"), "p99 < 1",
         ratio(now["p99"], 1)),
        ("pricer alone (measurements/s) / peak MB", *pair("pricer", k2="pricer_rss"), "≥ 300,000 / < 500",
         ratio(now["pricer"], 300_000)),
        ("ledger alone (charges/s) / peak MB", *pair("ledger", k2="ledger_rss"), "≥ 300,000 / < 500",
         ratio(now["ledger"], 300_000)),
        ("pricer, 2 instances in one group (measurements/s)", *pair("pricer2"), "", ratio(now["pricer2"], 300_000)),
        ("ledger, 2 instances in one group (charges/s)", *pair("ledger2"), "", ratio(now["ledger2"], 300_000)),
        ("largest peak RSS of a service over the end-to-end run (MB)", *pair("rss_max"), "< 500",
         ratio(now["rss_max"], 500)),
        ("collector publish rate in the end-to-end run (measurements/s)", *pair("publish"), "", ""),
        ("api read-model updates in the end-to-end run (measurements/s)", *pair("api_updates"), "", ""),
        ("collector: one reading of ~50,000 resources (s) / peak MB", *pair("collector_s", k2="collector_rss"),
         "< 10 / < 300", ratio(now["collector_s"], 10)),
        ("api monthly usage query, p99 (ms) / req/s", *pair("api_p99", k2="api_rps"), "p99 < 50",
         ratio(now["api_p99"], 50)),
        ("floor: consume only (measurements/s; before: messages, one a measurement)", *pair("floor_consume"),
         "≥ 300,000", ratio(now["floor_consume"], 300_000)),
        ("floor: consume + decode", *pair("floor_decode"), "≥ 300,000", ratio(now["floor_decode"], 300_000)),
        ("floor: consume + decode + publish unchanged, acked per batch", *pair("floor_forward"), "≥ 300,000",
         ratio(now["floor_forward"], 300_000)),
        ("our pricer without its database: consume + decode + price + publish", *pair("floor_price"), "≥ 300,000",
         ratio(now["floor_price"], 300_000)),
        ("floor: COPY of the pricer's stored rows (measurements/s; before: a row each)", *pair("floor_copy"),
         "≥ 300,000", ratio(now["floor_copy"], 300_000)),
        ("bound: cores ÷ machine CPU of forward + COPY, any number of pricers", *pair("pricer_bound"),
         "≥ 300,000", ratio(now["pricer_bound"], 300_000)),
        ("ledger floor: consume + decode of the ledger benchmark's charges", *pair("ledger_decode"), "≥ 300,000",
         ratio(now["ledger_decode"], 300_000)),
        ("ledger bound: cores ÷ machine CPU of decode + state row, any number of ledgers", *pair("ledger_bound"),
         "≥ 300,000", ratio(now["ledger_bound"], 300_000)),
        ("Kafka ProducerPerformance, same record size (records/s)", *pair("kafka_records"), "broker limit", ""),
        ("PostgreSQL COPY of one row per measurement, uuid key (rows/s)", *pair("copy_rows"), "", ""),
    ]
    out = [
        f"Scale `{scale}`, measured {results['measured_at']} on {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_gib']} GiB, "
        f'Python {m["python"]}; PostgreSQL 15 and Kafka 4.1 on the same machine. "before": the first design '
        f"(usage.*.v1, one message and one row per measurement), full scale, measured "
        f"{before_run.get('measured_at', 'n/a')} on {before_run.get('machine', {}).get('cpu', 'n/a')} "
        f"(bench/results_v1.json). Ratios are now ÷ target (for times and memory: above 1 is over the limit).",
        "",
        "| measure | before (v1) | now (v2) | target / limit | ratio |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {a} | {b if b is not None else 'n/a'} | {c if c is not None else 'n/a'} | {d} | {e} |"
            for a, b, c, d, e in rows]
    soak = results.get("soak", {})
    peak = _peak
    if soak.get("pricer", {}).get("count") or soak.get("ledger", {}).get("count"):
        sp, sl = soak.get("pricer", {}), soak.get("ledger", {})
        out += [
            "",
            f"Soak (`BENCH_SCALE=soak`, measured {soak.get('measured_at')}), one instance each at full speed:",
            f"pricer {sp.get('count')} measurements in {sp.get('measured_window_s')} s = "
            f"{sp.get('sustained_measurements_per_s')}/s, "
            f"RSS MB by tenth of the run {sp.get('rss_mb_by_tenth')}, peak {peak(sp)}; "
            f"ledger {sl.get('messages')} charges in {sl.get('measured_window_s')} s = "
            f"{sl.get('sustained_charges_per_s')}/s, "
            f"RSS MB max of first / last quarter {sl.get('rss_mb_first_quarter_max')} / "
            f"{sl.get('rss_mb_last_quarter_max')}"
            + (f", by tenth of the run {sl['rss_mb_by_tenth']}" if sl.get("rss_mb_by_tenth") else "")
            + ", "
            f"peak {peak(sl)}, posting rule holds: {sl.get('check', {}).get('posting_rule_holds')}.",
        ]
    e2e = results["results"].get("e2e", {})
    if e2e.get("rss_mb"):
        out += ["", "Memory of each service over the end-to-end run (MB, start / peak / end): "
                + ", ".join(f"{k} {v['start']} / {v['peak']} / {v['end']}" for k, v in e2e["rss_mb"].items())]
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    now = _figures(results["results"])
    was = _figures(orjson.loads(BEFORE.read_bytes())["results"]) if BEFORE.exists() else {}
    names = [
        ("end to end (to the ledger)", "e2e"),
        ("end to end, api caught up", "caught_up"),
        ("pricer alone", "pricer"),
        ("ledger alone", "ledger"),
        ("api read model", "api_updates"),
        ("floor: read + decode + publish", "floor_forward"),
        ("set-based SQL (month)", "sql"),
    ]
    names = [(n, k) for n, k in names if isinstance(now.get(k), (int, float))]
    fig, ax = plt.subplots(figsize=(9, 5.6))
    y = list(range(len(names)))[::-1]
    ax.barh([v + 0.2 for v in y], [was.get(k) or 0 for _, k in names], height=0.4, color="#a6a6a6",
            label="before: one message and row per measurement (v1)")
    ax.barh([v - 0.2 for v in y], [now[k] for _, k in names], height=0.4, color="#1f4e79",
            label="now: a shard's batch per message (v2)")
    ax.set_yticks(y, [n for n, _ in names])
    ax.axvline(100_000, color="#c00000", linestyle="--", label="end-to-end target 100,000/s")
    ax.axvline(300_000, color="#7f6000", linestyle=":", label="per-stage target 300,000/s")
    ax.set_xscale("log")
    ax.set_xlabel("measurements per second, log scale")
    m = results["machine"]
    ax.set_title(f"Throughput, {m['cores']} cores, scale {results['scale']}, {results['measured_at']}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.13), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    scale = os.environ.get("BENCH_SCALE", "small")
    if scale not in SCALES:
        raise SystemExit(f"BENCH_SCALE must be one of {', '.join(SCALES)}")
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    results: dict[str, Any] = {
        "scale": scale,
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%d"),
        "results": {},
    }
    previous = ROOT / "bench" / "results.json"
    if previous.exists():
        earlier = orjson.loads(previous.read_bytes())
        for kept in ("load", "soak"):  # written by `make load` and BENCH_SCALE=soak, kept until they run again
            if kept in earlier:
                results[kept] = earlier[kept]
        if only or scale == "soak":
            results["results"] = earlier.get("results", {})
            results["scale"], results["measured_at"] = earlier.get("scale", scale), earlier.get("measured_at")
    target = results.setdefault("soak", {}) if scale == "soak" else results["results"]
    for name, args in SCALES[scale].items():
        if not only or name in only:
            target[name] = run_one(name, args)
    if scale == "soak":
        results["soak"]["measured_at"] = time.strftime("%Y-%m-%d")
    (ROOT / "bench" / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    (ROOT / "bench" / "results.md").write_text(markdown(results, results["scale"]))
    chart(results, ROOT / "bench" / "chart.png")
    print((ROOT / "bench" / "results.md").read_text())


if __name__ == "__main__":
    main()
