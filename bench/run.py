"""``make bench``: every benchmark in one run on one machine, then ``bench/results.json``,
``bench/results.md`` and ``bench/chart.png``.

``BENCH_SCALE=small`` (a few minutes, for development) or ``full`` (the sizes the issues name).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import machine

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")

SCALES: dict[str, dict[str, list[str]]] = {
    "small": {
        "collector": ["-m", "bench.bench_collector", "--apps", "6000", "--services", "2000", "--orgs", "10"],
        "pricer": ["bench/bench_pricer.py", "--count", "100000", "--resources", "1000"],
        "ledger": ["bench/bench_ledger.py", "--count", "100000", "--resources", "1000", "--orgs", "100", "--customers", "10"],
        "api": ["bench/bench_api.py", "--resources", "1000", "--seconds", "5", "--warmup", "1"],
        "e2e": ["-m", "bench.bench_e2e", "--resources", "1000", "--hours", "72", "--latency-hours", "3"],
        "baselines": ["-m", "bench.bench_baselines", "--resources", "1000", "--hours", "72"],
        "floor": ["-m", "bench.bench_floor", "--count", "200000"],
    },
    "full": {
        "collector": ["-m", "bench.bench_collector"],
        "pricer": ["bench/bench_pricer.py", "--count", "2000000"],
        "pricer_x2": ["bench/bench_pricer.py", "--count", "2000000", "--instances", "2"],
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


def run_one(name: str, args: list[str]) -> dict[str, Any]:
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


def markdown(results: dict[str, Any], scale: str) -> str:
    m = results["machine"]
    r = results["results"]
    e2e, base = r.get("e2e", {}), r.get("baselines", {})
    col, pri, led, api_all = r.get("collector", {}), r.get("pricer", {}), r.get("ledger", {}), r.get("api", {})
    api, bare = api_all.get("api", {}), api_all.get("bare_starlette", api_all.get("bare", {}))
    pri_rate, led_rate = pri.get("sustained_measurements_per_s"), led.get("sustained_charges_per_s")
    pri2, led2 = r.get("pricer_x2", {}), r.get("ledger_x2", {})
    floor = r.get("floor", {})
    fl = lambda k: floor.get(k, {}).get("messages_per_s")  # noqa: E731
    lf = floor.get("ledger", {})
    peak = lambda d: max(d.get("peak_rss_mb") or [0]) if isinstance(d.get("peak_rss_mb"), list) else d.get("peak_rss_mb")  # noqa: E731
    e2e_rate = e2e.get("e2e_measurements_per_s")
    rows = [
        ("end to end, collector publish → ledger committed (measurements/s)", e2e_rate, "≥ 100,000", ratio(e2e_rate, 100_000)),
        ("publish → balance in the api, p50 / p99 (s)", f"{e2e.get('publish_to_balance_p50_s')} / {e2e.get('publish_to_balance_p99_s')}", "p99 < 2", ratio(e2e.get("publish_to_balance_p99_s"), 2)),
        ("collector publish rate (measurements/s)", e2e.get("collector_publish_per_s"), "", ""),
        ("collector: one reading of ~50,000 resources (s) / peak MB", f"{col.get('seconds')} / {col.get('peak_rss_mb')}", "< 10 / < 300", ratio(col.get("seconds"), 10)),
        ("pricer alone (measurements/s) / peak MB", f"{pri_rate} / {peak(pri)}", "≥ 150,000 / < 500", ratio(pri_rate, 150_000)),
        ("ledger alone (charges/s) / peak MB", f"{led_rate} / {peak(led)}", "≥ 150,000 / < 500", ratio(led_rate, 150_000)),
        ("pricer, 2 instances in one group (measurements/s) / peak MB of the larger", f"{pri2.get('sustained_measurements_per_s')} / {peak(pri2)}", "≥ 150,000 / < 500", ratio(pri2.get("sustained_measurements_per_s"), 150_000)),
        ("ledger, 2 instances in one group (charges/s) / peak MB of the larger", f"{led2.get('sustained_charges_per_s')} / {peak(led2)}", "≥ 150,000 / < 500", ratio(led2.get("sustained_charges_per_s"), 150_000)),
        ("floor: aiokafka consume only, one message per measurement (messages/s)", fl("consume"), "≥ 150,000", ratio(fl("consume"), 150_000)),
        ("floor: consume + decode (shared.wire), nothing else (messages/s)", fl("decode"), "≥ 150,000", ratio(fl("decode"), 150_000)),
        ("floor: consume + decode + publish unchanged, acked per batch (messages/s)", fl("forward"), "≥ 150,000", ratio(fl("forward"), 150_000)),
        ("our pricer without its database: consume + decode + price + publish the charge (messages/s)", fl("price"), "≥ 150,000", ratio(fl("price"), 150_000)),
        ("floor: COPY of the pricer's charge rows, machine otherwise idle (rows/s)", floor.get("copy", {}).get("rows_per_s"), "≥ 150,000", ratio(floor.get("copy", {}).get("rows_per_s"), 150_000)),
        ("bound: cores ÷ machine CPU of forward + COPY, any number of pricers (measurements/s)", floor.get("pricer_bound_per_s"), "≥ 150,000", ratio(floor.get("pricer_bound_per_s"), 150_000)),
        ("bound: cores ÷ machine CPU of consume + decode, any consumer (messages/s)", floor.get("read_bound_per_s"), "≥ 150,000", ratio(floor.get("read_bound_per_s"), 150_000)),
        ("ledger floor: consume + decode of the ledger benchmark's charges, one process (charges/s)", lf.get("decode", {}).get("messages_per_s"), "≥ 150,000", ratio(lf.get("decode", {}).get("messages_per_s"), 150_000)),
        ("ledger floor: charge_state rows inserted if absent (COPY to temp + INSERT … ON CONFLICT DO NOTHING), idle machine (rows/s)", lf.get("state_if_absent", {}).get("rows_per_s"), "≥ 150,000", ratio(lf.get("state_if_absent", {}).get("rows_per_s"), 150_000)),
        ("bound: cores ÷ machine CPU of charge decode + state row if absent, any number of ledgers (charges/s)", lf.get("ledger_bound_per_s"), "≥ 150,000", ratio(lf.get("ledger_bound_per_s"), 150_000)),
        ("api read-model updates (charges/s)", e2e.get("api_read_model_updates_per_s"), "", ""),
        ("api monthly usage query: req/s, p50 / p99 (ms)", f"{api.get('rps')} , {api.get('p50_ms')} / {api.get('p99_ms')}", "p99 < 50 ms", ratio(api.get("p99_ms"), 50)),
        ("api uncached (req/s, p50 / p99 ms)", f"{api_all.get('api_uncached', {}).get('rps')} , {api_all.get('api_uncached', {}).get('p50_ms')} / {api_all.get('api_uncached', {}).get('p99_ms')}", "", ""),
        ("bare Starlette endpoint, same client (req/s)", bare.get("rps"), "api ≥ half", ratio(api.get("rps"), bare.get("rps"))),
        ("Kafka ProducerPerformance, same record size (records/s)", base.get("kafka_producer_perf_records_per_s"), "broker limit", f"pipeline = {ratio(e2e_rate, base.get('kafka_producer_perf_records_per_s'))}"),
        ("PostgreSQL COPY of the same rows, uuid key (rows/s)", base.get("postgres_copy_rows_per_s"), "pipeline ≥ half", f"pipeline = {ratio(e2e_rate, base.get('postgres_copy_rows_per_s'))}"),
        ("set-based SQL pricing + posting of the month (measurements/s)", base.get("set_based_sql_measurements_per_s"), "alternative", f"pipeline = {ratio(e2e_rate, base.get('set_based_sql_measurements_per_s'))}"),
    ]
    out = [f"Scale `{scale}`, measured {results['measured_at']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
           f"Python {m['python']}; PostgreSQL 15 and Kafka 4.1 on the same machine.", "",
           "| measure | result | target / limit | ratio |", "|---|---|---|---|"]
    out += [f"| {a} | {b if b is not None else 'n/a'} | {c} | {d} |" for a, b, c, d in rows]
    soak = results.get("soak", {})
    if soak.get("pricer", {}).get("count") or soak.get("ledger", {}).get("count"):
        sp, sl = soak.get("pricer", {}), soak.get("ledger", {})
        out += ["", f"Soak (`BENCH_SCALE=soak`, measured {soak.get('measured_at')}), one instance each at full speed:",
                f"pricer {sp.get('count')} measurements in {sp.get('measured_window_s')} s = {sp.get('sustained_measurements_per_s')}/s, "
                f"RSS MB by tenth of the run {sp.get('rss_mb_by_tenth')}, peak {peak(sp)}; "
                f"ledger {sl.get('messages')} charges in {sl.get('measured_window_s')} s = {sl.get('sustained_charges_per_s')}/s, "
                f"RSS MB max of first / last quarter {sl.get('rss_mb_first_quarter_max')} / {sl.get('rss_mb_last_quarter_max')}"
                + (f", by tenth of the run {sl['rss_mb_by_tenth']}" if sl.get("rss_mb_by_tenth") else "") + ", "
                f"peak {peak(sl)}, posting rule holds: {sl.get('check', {}).get('posting_rule_holds')}."]
    if e2e.get("rss_mb"):
        out += ["", "Memory of each service over the end-to-end run (MB, start / peak / end): "
                + ", ".join(f"{k} {v['start']} / {v['peak']} / {v['end']}" for k, v in e2e["rss_mb"].items())]
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["results"]
    bars = [
        ("pipeline end to end", r.get("e2e", {}).get("e2e_measurements_per_s")),
        ("collector publish", r.get("e2e", {}).get("collector_publish_per_s")),
        ("pricer alone", r.get("pricer", {}).get("sustained_measurements_per_s")),
        ("ledger alone", r.get("ledger", {}).get("sustained_charges_per_s")),
        ("api read model", r.get("e2e", {}).get("api_read_model_updates_per_s")),
        ("floor: read + decode + publish", r.get("floor", {}).get("forward", {}).get("messages_per_s")),
        ("floor: COPY of charge rows", r.get("floor", {}).get("copy", {}).get("rows_per_s")),
        ("ledger floor: read + decode charges", r.get("floor", {}).get("ledger", {}).get("decode", {}).get("messages_per_s")),
        ("ledger bound: decode + state row, 2 cores", r.get("floor", {}).get("ledger", {}).get("ledger_bound_per_s")),
        ("Kafka ProducerPerformance", r.get("baselines", {}).get("kafka_producer_perf_records_per_s")),
        ("PostgreSQL COPY", r.get("baselines", {}).get("postgres_copy_rows_per_s")),
        ("set-based SQL (month)", r.get("baselines", {}).get("set_based_sql_measurements_per_s")),
    ]
    bars = [(n, v) for n, v in bars if isinstance(v, (int, float))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh([n for n, _ in bars][::-1], [v for _, v in bars][::-1], color=["#1f4e79"] * len(bars))
    ax.axvline(100_000, color="#c00000", linestyle="--", label="end-to-end target 100,000/s")
    ax.axvline(150_000, color="#7f6000", linestyle=":", label="per-stage target 150,000/s")
    ax.set_xscale("log")
    ax.set_xlabel("messages (rows) per second, log scale")
    m = results["machine"]
    ax.set_title(f"Throughput, {m['cores']} cores, scale {results['scale']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    scale = os.environ.get("BENCH_SCALE", "small")
    if scale not in SCALES:
        raise SystemExit(f"BENCH_SCALE must be one of {', '.join(SCALES)}")
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    results: dict[str, Any] = {"scale": scale, "machine": machine(), "measured_at": time.strftime("%Y-%m-%d"), "results": {}}
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
