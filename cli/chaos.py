"""``billing chaos`` (``make chaos``): drive a seeded foundation's hours through the whole pipeline while
killing it, then prove that nothing was lost and nothing was counted twice.

The run has a world of its own on the local stack (a fresh database and topic prefix, its own ports), so
it never touches the demo's data. While a driver asks the collector for every hour's reading, in order,
paced over the run, a chaos task:

- SIGKILLs a random service instance (collector, pricer, ledger, api, and the second pricer/ledger while
  they exist) every few seconds and restarts it, at least ``min_kills`` times;
- restarts the Kafka broker once and PostgreSQL once, with the project's own scripts;
- scales the pricer and the ledger from one instance to two and back (consumer-group rebalances);
- and the simulator fails all along: 5xx answers, requests that hang past the collector's timeout, and
  an outage window of several simulated hours (those hours are estimated from their neighbours).

Then it waits for every consumer group and outbox to drain and checks, independently of the services'
own bookkeeping:

- every (hour, meter) holds exactly the measurements the seed implies: read where the collector's meter
  run succeeded, estimated (policy ``previous``) where it failed, by count and by summed value;
- the pricer priced each of them once (distinct measurements), the ledger applied or held each once;
- per customer, billing month (America/New_York) and price, the posted microcredits equal the oracle's
  floor(exact sum), and the usage lines of the transactions add up to the same (nothing posted twice);
- every transaction balances, the signed sum of all entries is zero (the accounting equation);
- the api's balance of every customer shows the ledger's usage;
- the dead-letter topics hold no message that is valid for its topic;
- the completeness report (``GET /admin/completeness``) reconciles for every hour and meter of the run.

It prints a summary and exits 1 on any difference, 2 when the run itself could not be carried out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from cli.demo import Api, set_up
from cli.localstack import KAFKA, ROOT, admin_dsn, drop_database, dsn, free_port, fresh_database, infra
from cli.scenario import DEMO, SMALL, PriceSpec, Scenario, price_at
from shared.batches import decode_measurements
from shared.blobs import Frames
from shared.clock import BUSINESS_TZ
from shared.contracts import ChargesComputed, MeasurementsTaken, TransactionPosted
from shared.kafka import group_lag
from shared.topics import CHARGES, READINGS, TRANSACTIONS, delete_topics, dlq, ensure_topics
from simulator.oidc import mint_token

__all__ = ["PLANS", "Plan", "run_chaos"]

HOUR = timedelta(hours=1)
SERVICES = ("collector", "pricer", "ledger", "api")
MAX_GAP_HOURS = 72  # the collector's default; gaps up to this long are estimated
console = Console()


@dataclass(frozen=True)
class Plan:
    """How big and how rough a run is."""

    name: str
    scenario: Scenario
    first_hour: datetime
    hours: int
    seconds: float                       # the driver spreads the hours over this long
    min_kills: int
    kill_pause: tuple[float, float]      # seconds between kills, uniform
    outage: tuple[int, int]              # [from, to) hour offsets of the simulator's outage
    error_rate: float = 0.03             # CF requests answered 502/503
    timeout_rate: float = 0.01           # CF requests that hang past the collector's timeout
    seed: int = 1

    @property
    def hour_list(self) -> list[datetime]:
        return [self.first_hour + HOUR * k for k in range(self.hours)]


PLANS = {
    # CI: four days around the middle of the month (the late org's assignment and the price change).
    "small": Plan(
        "small",
        SMALL,
        SMALL.mid_month - 48 * HOUR,
        96,
        seconds=100,
        min_kills=20,
        kill_pause=(1.5, 4.0),
        outage=(40, 46),
    ),
    # The demo's whole month: 744 hours, about half a million measurements.
    "full": Plan(
        "full", DEMO, DEMO.bounds[0], 744, seconds=420, min_kills=40, kill_pause=(3.0, 8.0), outage=(300, 308)
    ),
}


# ---------------------------------------------------------------------------------------------- processes


@dataclass
class Instance:
    name: str   # "pricer", "pricer-2"
    kind: str   # "pricer"
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Stats:
    kills: Counter[str] = field(default_factory=Counter)
    unexpected_exits: Counter[str] = field(default_factory=Counter)
    kafka_restarts: int = 0
    pg_restarts: int = 0
    scale_events: list[str] = field(default_factory=list)
    reading_retries: int = 0
    hours_driven: int = 0
    timeline: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.started:7.1f}s {text}")


class Supervisor:
    """Starts, kills and restarts the service instances of the run, each with its own port and log."""

    def __init__(self, database: str, prefix: str, sim_url: str, logs: Path) -> None:
        self.database, self.prefix, self.sim_url, self.logs = database, prefix, sim_url, logs
        self.instances: dict[str, Instance] = {}
        self.expected_down: set[str] = set()
        logs.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, kind: str) -> Instance:
        inst = Instance(name, kind, free_port())
        self.instances[name] = inst
        return inst

    def url(self, kind: str) -> str:
        return self.instances[kind].url

    def env(self, inst: Instance) -> dict[str, str]:
        env = {
            **os.environ, "KAFKA_BOOTSTRAP_SERVERS": KAFKA, "KAFKA_TOPIC_PREFIX": self.prefix,
            "COLLECTOR_SCHEDULE_ENABLED": "false", "COLLECTOR_SIM_TIME_HEADER": "true",
            "COLLECTOR_CF_API_URL": self.sim_url, "COLLECTOR_UAA_URL": self.sim_url,
            "COLLECTOR_REQUEST_TIMEOUT_SECONDS": "2", "COLLECTOR_RETRY_ATTEMPTS": "4",
            "LEDGER_AUTO_CLOSE_MONTHS": "false", "API_QUERY_CACHE_SECONDS": "0",
            # Every service verifies tokens of the simulator's issuer (the internal routes too).
            **{f"{kind.upper()}_OIDC_ISSUER": self.sim_url for kind in SERVICES},
        }
        for kind in SERVICES:
            env[f"{kind.upper()}_DATABASE_URL"] = dsn(self.database, kind)
            if kind in self.instances and kind != "api":
                env[f"API_{kind.upper()}_URL"] = self.instances[kind].url
        env[f"{inst.kind.upper()}_PORT"] = str(inst.port)
        return env

    def start(self, inst: Instance) -> None:
        with (self.logs / f"{inst.name}.log").open("ab") as log:
            inst.proc = subprocess.Popen([str(ROOT / ".venv/bin/billing"), inst.kind], cwd=ROOT, env=self.env(inst),
                                         stdout=log, stderr=log, start_new_session=True)

    async def ready(self, inst: Instance, timeout: float = 180) -> None:
        assert inst.proc is not None
        await wait_http(
            inst.url + "/readyz", inst.proc, timeout, f"{inst.name} (see {self.logs / (inst.name + '.log')})"
        )

    def kill(self, inst: Instance) -> None:
        assert inst.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(inst.proc.pid, signal.SIGKILL)
        inst.proc.wait()

    def terminate(self, inst: Instance, timeout: float = 40) -> None:
        if inst.proc is None or inst.proc.poll() is not None:
            return
        inst.proc.terminate()
        try:
            inst.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            inst.proc.kill()
            inst.proc.wait()

    def exited(self) -> list[Instance]:
        return [
            i
            for i in self.instances.values()
            if i.proc is not None and i.proc.poll() is not None and i.name not in self.expected_down
        ]

    def stop_all(self) -> None:
        for inst in reversed(list(self.instances.values())):
            self.terminate(inst)


class ChaosError(RuntimeError):
    """The run could not be carried out (not a difference in the books)."""


# ------------------------------------------------------------------------------------------------ the run


async def drive(plan: Plan, sup: Supervisor, stats: Stats) -> None:
    """Ask the collector for every hour's reading, in order, paced over ``plan.seconds``; retried until
    the collector answers (it may be dead, restarting, or without its database or broker)."""
    hours = plan.hour_list
    started = time.monotonic()
    # The collector's internal route verifies an admin's token, like every /internal route.
    token = mint_token(["usage.admin"], subject="chaos-driver", issuer=sup.sim_url, ttl=int(plan.seconds) * 4 + 3600)
    async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {token}"}) as http:
        for i, hour in enumerate(hours):
            await asyncio.sleep(max(0.0, started + plan.seconds * i / len(hours) - time.monotonic()))
            body = {"hour": _iso(hour), "kind": "periodic"}
            while True:
                try:
                    resp = await http.post(sup.url("collector") + "/internal/readings", json=body)
                    if resp.status_code in (200, 201):
                        break
                except httpx.HTTPError:
                    pass
                stats.reading_retries += 1
                await asyncio.sleep(0.5)
            stats.hours_driven = i + 1


async def restart(sup: Supervisor, inst: Instance, stats: Stats, why: str) -> None:
    sup.start(inst)
    await sup.ready(inst)
    sup.expected_down.discard(inst.name)
    stats.note(f"{inst.name} back ({why})")


async def chaos(plan: Plan, sup: Supervisor, stats: Stats, driver: asyncio.Task[None]) -> None:
    """Kills, broker and database restarts and scaling, until the driver is done and enough kills were made."""
    rng = random.Random(plan.seed)
    events = [(0.2, "scale up"), (0.35, "restart kafka"), (0.6, "restart postgres"), (0.8, "scale down")]
    while not driver.done() or events or sum(stats.kills.values()) < plan.min_kills:
        await asyncio.sleep(rng.uniform(*plan.kill_pause))
        if driver.done() and driver.exception() is not None:
            return
        for inst in sup.exited():
            stats.unexpected_exits[inst.name] += 1
            stats.note(f"{inst.name} exited by itself (code {inst.proc.returncode if inst.proc else '?'}); restarting")
            await restart(sup, inst, stats, "after an unexpected exit")
        progress = stats.hours_driven / plan.hours
        if events and (progress >= events[0][0] or driver.done()):
            _, event = events.pop(0)
            await infra_event(event, sup, stats)
            continue
        inst = sup.instances[rng.choice(sorted(n for n in sup.instances if n not in sup.expected_down))]
        sup.expected_down.add(inst.name)
        sup.kill(inst)
        stats.kills[inst.kind] += 1
        stats.note(f"SIGKILL {inst.name}")
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        await restart(sup, inst, stats, "after SIGKILL")


async def infra_event(event: str, sup: Supervisor, stats: Stats) -> None:
    stats.note(event)
    if event == "scale up":
        for kind in ("pricer", "ledger"):
            inst = sup.add(f"{kind}-2", kind)
            sup.start(inst)
            await sup.ready(inst)
            stats.scale_events.append(f"{kind} 1→2")
    elif event == "scale down":
        for kind in ("pricer", "ledger"):
            inst = sup.instances.pop(f"{kind}-2")
            sup.terminate(inst)
            stats.scale_events.append(f"{kind} 2→1")
    elif event == "restart kafka":
        await asyncio.to_thread(infra, "kafka", "stop")
        await asyncio.sleep(3)
        await asyncio.to_thread(infra, "kafka", "start")
        stats.kafka_restarts += 1
    elif event == "restart postgres":
        await asyncio.to_thread(infra, "pg", "stop")
        await asyncio.sleep(3)
        await asyncio.to_thread(infra, "pg", "start")
        stats.pg_restarts += 1
    stats.note(f"{event}: done")


async def wait_settled(database: str, prefix: str, timeout: float = 900) -> None:
    """Until every consumer group has committed everything and every outbox is empty, three times in a row."""
    groups = [("pricer", READINGS), ("ledger", CHARGES), ("api", CHARGES), ("api", TRANSACTIONS)]
    outboxes = ["SELECT count(*) FROM collector.reading_outbox",
                "SELECT count(*) FROM pricer.unpublished_batches", "SELECT count(*) FROM ledger.outbox"]
    quiet = 0
    deadline = time.monotonic() + timeout
    with console.status("waiting for the pipeline to drain") as status:
        while time.monotonic() < deadline:
            lags = [await group_lag(KAFKA, prefix + g, prefix + t) for g, t in groups]
            conn = await asyncpg.connect(admin_dsn(database))
            try:
                pending = [await conn.fetchval(q) for q in outboxes]
            finally:
                await conn.close()
            status.update(f"waiting for the pipeline to drain: lags {lags}, outboxes {pending}")
            quiet = quiet + 1 if sum(lags) == 0 and sum(pending) == 0 else 0
            if quiet >= 3:
                return
            await asyncio.sleep(1)
    raise ChaosError("the pipeline did not drain in time")


# ---------------------------------------------------------------------------------------------- the oracle


@dataclass
class Oracle:
    """What the books must show, from the seed and the hours whose meter runs failed (estimated)."""

    per_hour: dict[tuple[datetime, str], tuple[int, int]]        # (hour, meter) -> (count, sum of values)
    estimated: int
    posted: dict[tuple[str, str, tuple[str, str, datetime]], int]  # (customer, month, price key) -> microcredits
    held: int


def oracle(plan: Plan, ok_runs: set[tuple[datetime, str]]) -> Oracle:
    s = plan.scenario
    world = s.foundation()
    hours = plan.hour_list
    usage = {h: world.expected_usage(h) for h in hours}
    # Per meter: hours whose run failed are estimated from the last good hour before them, for resources
    # also present at the next good hour (policy "previous"), when the gap is not longer than the maximum.
    rows: dict[datetime, list[Any]] = {h: [] for h in hours}
    estimated = 0
    for meter in ("cfapps", "cfservices"):
        good = [h for h in hours if (h, meter) in ok_runs]
        for h in good:
            rows[h].extend(e for e in usage[h] if e.meter == meter)
        for before, after in itertools.pairwise(good):
            gap = int((after - before) / HOUR) - 1
            if gap <= 0 or gap > MAX_GAP_HOURS:
                continue
            present_after = {e.resource_guid for e in usage[after] if e.meter == meter}
            carried = [e for e in usage[before] if e.meter == meter and e.resource_guid in present_after]
            for k in range(1, gap + 1):
                rows[before + HOUR * k].extend(carried)
                estimated += len(carried)
    per_hour: dict[tuple[datetime, str], tuple[int, int]] = {}
    for h in hours:
        for meter in ("cfapps", "cfservices"):
            values = [e.value for e in rows[h] if e.meter == meter]
            per_hour[(h, meter)] = (len(values), sum(values))
    owners: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for org, customer, starts in s.assignments():
        owners[org].append((starts, customer))
    prices = s.prices()
    exact: dict[tuple[str, str, tuple[str, str, datetime]], Fraction] = defaultdict(Fraction)
    units: dict[tuple[str, str, tuple[str, str, datetime]], tuple[PriceSpec, Fraction]] = {}
    held = 0
    for h in hours:
        month = h.astimezone(BUSINESS_TZ).strftime("%Y-%m")
        for e in rows[h]:
            owner = [c for starts, c in sorted(owners.get(e.org_guid, [])) if starts <= h]
            if not owner:
                held += 1
                continue
            price = price_at(prices, e.meter, e.resource_kind, h, s.tier_of(owner[-1]))
            if price is None:
                continue
            key = (s.customers[owner[-1]], month, price.key)
            if price.bands is not None:  # a rate card: f of the month's exact units, floored once
                _, so_far = units.get(key, (price, Fraction(0)))
                units[key] = (price, so_far + Fraction(e.value, price.unit))
                continue
            exact[key] += Fraction(e.value * price.microcredits_per_unit, price.unit)
    for key, (price, u) in units.items():
        exact[key] = price.graduated(u)
    posted = {k: v.numerator // v.denominator for k, v in exact.items()}
    return Oracle(per_hour, estimated, posted, held)


# ---------------------------------------------------------------------------------------------- the checks


@dataclass
class Findings:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    measurements: int = 0
    estimated: int = 0
    held: int = 0
    microcredits: int = 0

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    @property
    def differences(self) -> int:
        return sum(1 for _, ok, _ in self.checks if not ok)


def _diff(want: dict[Any, Any], got: dict[Any, Any], limit: int = 5) -> str:
    keys = sorted((k for k in set(want) | set(got) if want.get(k) != got.get(k)), key=str)
    shown = "; ".join(f"{k}: want {want.get(k)}, got {got.get(k)}" for k in keys[:limit])
    return f"{len(keys)} differ: {shown}" if keys else ""


async def verify(plan: Plan, database: str, prefix: str, api: Api) -> Findings:
    f = Findings()
    hours = plan.hour_list
    first, end = hours[0], hours[-1] + HOUR
    conn = await asyncpg.connect(admin_dsn(database))
    try:
        ok_runs = {(r["hour"], r["meter"]) for r in await conn.fetch(
            "SELECT hour, meter FROM collector.meter_runs WHERE ok AND hour >= $1 AND hour < $2", first, end)}
        # The collector keeps each reading's batches as it published them: count and sum them.
        collected: dict[tuple[datetime, str], tuple[int, int]] = {}
        f.estimated = 0
        rows = await conn.fetch(
            "SELECT hour, meter, message FROM collector.reading_batches WHERE hour >= $1 AND hour < $2", first, end
        )
        messages = await Frames(table="collector.blob_frames").unpack_all(conn, [r["message"] for r in rows])
        for r, message in zip(rows, messages, strict=True):
            batch = decode_measurements(message).message
            assert batch is not None, "the collector stored a batch it cannot read"
            n, v = collected.get((r["hour"], r["meter"]), (0, 0))
            collected[(r["hour"], r["meter"])] = (n + len(batch.value), v + sum(batch.value))
            f.estimated += sum(batch.estimated)
        # Distinct measurements priced: each batch adds its new measurements (re-pricings move priced and
        # unpriced counts between each other).
        priced = {(r["reading_hour"], r["meter"]): int(r["n"]) for r in await conn.fetch(
            """SELECT reading_hour, meter, sum(d_priced + d_unpriced) AS n FROM pricer.charge_batches
                GROUP BY 1, 2""")}
        applied = int(await conn.fetchval("SELECT coalesce(sum(posted), 0) FROM ledger.shard_state"))
        f.held = int(await conn.fetchval("SELECT coalesce(sum(held), 0) FROM ledger.held_shards"))
        names = {r["id"]: r["name"] for r in await conn.fetch("SELECT id, name FROM ledger.customers")}
        price_keys = {r["id"]: (r["meter"], r["resource_kind"], r["valid_from"]) for r in await conn.fetch(
            "SELECT id, meter, resource_kind, lower(valid_during) AS valid_from FROM pricer.prices")}
        month_usage = {(names[r["customer_id"]], f"{r['month']:%Y-%m}", price_keys.get(r["price_id"])): r["posted"]
                       for r in await conn.fetch("SELECT customer_id, month, price_id, posted FROM ledger.month_usage")}
        lines = {(names[r["customer_id"]], f"{r['month']:%Y-%m}", price_keys.get(r["price_id"])): int(r["mc"])
                 for r in await conn.fetch(
                     """SELECT t.customer_id, u.month, u.price_id, sum(u.microcredits) AS mc
                          FROM ledger.usage_lines u JOIN ledger.transactions t ON t.id = u.transaction_id
                         GROUP BY 1, 2, 3""")}
        unbalanced = await conn.fetchval(
            """SELECT count(*) FROM (SELECT transaction_id FROM ledger.entries GROUP BY 1
                HAVING sum(CASE side WHEN 'debit' THEN amount ELSE -amount END) <> 0) x""")
        transactions = await conn.fetchval("SELECT count(*) FROM ledger.transactions")
        equation = await conn.fetchval(
            "SELECT coalesce(sum(CASE side WHEN 'debit' THEN amount ELSE -amount END), 0) FROM ledger.entries"
        )
    finally:
        await conn.close()

    want = await asyncio.to_thread(oracle, plan, ok_runs)
    f.measurements = sum(n for n, _ in collected.values())
    f.microcredits = sum(want.posted.values())
    f.check(
        "measurements per hour and meter equal the seed's (count and summed value, estimates included)",
        collected == {k: v for k, v in want.per_hour.items() if v[0]} and f.estimated == want.estimated,
        _diff({k: v for k, v in want.per_hour.items() if v[0]}, collected)
        or f"{f.measurements:,} measurements over {len(hours)} hours, {f.estimated:,} estimated "
        f"(oracle {want.estimated:,})",
    )
    f.check("every measurement priced exactly once", priced == {k: v[0] for k, v in collected.items()},
            _diff({k: v[0] for k, v in collected.items()}, priced) or f"{sum(priced.values()):,} charges")
    f.check("every charge applied or held exactly once by the ledger", applied + f.held == f.measurements,
            f"{applied:,} applied + {f.held:,} held = {applied + f.held:,} of {f.measurements:,}")
    f.check(
        "measurements held for the unassigned org equal the seed's",
        f.held == want.held,
        f"{f.held:,} (oracle {want.held:,})",
    )
    posted = {k: v for k, v in month_usage.items() if v}
    f.check(
        "posted microcredits per customer, month and price equal floor(exact sum) of the seed's charges",
        posted == want.posted,
        _diff(want.posted, posted) or f"{len(posted)} (customer, month, price) totals, {f.microcredits:,} µcr",
    )
    f.check(
        "usage lines of the posted transactions add up to the same totals (nothing posted twice)",
        {k: v for k, v in lines.items() if v} == posted,
        _diff(posted, {k: v for k, v in lines.items() if v}) or "equal",
    )
    f.check("every transaction balances", unbalanced == 0, f"{unbalanced} of {transactions:,} unbalanced")
    f.check("accounting equation: the signed sum of all entries is zero", equation == 0, f"sum = {equation}")
    api_used = {}
    for cid, name in names.items():
        balance = await api.call("GET", f"/v1/customers/{cid}/balance")
        api_used[name] = int(balance["used"])
    ledger_used = dict.fromkeys(names.values(), 0)
    for (name, _, _), mc in lines.items():
        ledger_used[name] += mc
    f.check(
        "the api's balances show the ledger's usage", api_used == ledger_used, _diff(ledger_used, api_used) or "equal"
    )
    dead, valid = await dead_letters(prefix)
    f.check("dead-letter topics hold no valid message", valid == 0, f"{dead} dead-lettered, {valid} of them valid")
    report = await api.call("GET", "/admin/completeness", params={"from": _iso(first), "to": _iso(end)})
    bad = [r for r in report["rows"] if not r["reconciles"]]
    f.check(
        "the completeness report reconciles for every hour and meter",
        bool(report["reconciles"]) and report["hours"] == len(hours),
        f"{report['hours']} hours, {len(report['rows'])} rows, {report['flagged']} flagged, "
        f"{report['missing_readings']} missing readings"
        + "".join(f"; {r['hour']} {r['meter']}: " + ", ".join(p["detail"] for p in r["problems"]) for r in bad[:3])
        + "".join(f"; {p}" for p in report["problems"]),
    )
    return f


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


async def dead_letters(prefix: str) -> tuple[int, int]:
    """(messages in the run's DLQs, how many of them are valid for their topic)."""
    models: dict[str, type[BaseModel]] = {
        READINGS: MeasurementsTaken, CHARGES: ChargesComputed, TRANSACTIONS: TransactionPosted
    }
    total = valid = 0
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        for topic, model in models.items():
            name = prefix + dlq(topic)
            parts = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or set()]
            if not parts:
                await consumer.topics()
                parts = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or set()]
            ends = await consumer.end_offsets(parts)
            count = sum(ends.values())
            total += count
            if not count:
                continue
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            seen = 0
            while seen < count:
                batch = await consumer.getmany(timeout_ms=2000)
                if not batch:
                    break
                for records in batch.values():
                    for record in records:
                        seen += 1
                        try:
                            model.model_validate_json(record.value or b"")
                            valid += 1
                        except (ValidationError, ValueError):
                            pass
    finally:
        await consumer.stop()
    return total, valid


# ---------------------------------------------------------------------------------------------- reporting


def summary(plan: Plan, stats: Stats, findings: Findings, seconds: float) -> Table:
    table = Table(
        title=f"billing chaos ({plan.name}): {plan.hours} hours of seed {plan.scenario.seed} in {seconds:.0f} s"
    )
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    kills = sum(stats.kills.values())
    table.add_row(
        "kills survived (SIGKILL + restart)", str(kills), ", ".join(f"{k} {v}" for k, v in sorted(stats.kills.items()))
    )
    table.add_row("Kafka restarts / PostgreSQL restarts", f"{stats.kafka_restarts} / {stats.pg_restarts}", "")
    rebalances = stats.kills["pricer"] + stats.kills["ledger"] + stats.kills["api"] + 2 * len(stats.scale_events)
    table.add_row(
        "scaling / consumer-group rebalances",
        f"{len(stats.scale_events)} / {rebalances}",
        ", ".join(stats.scale_events),
    )
    table.add_row(
        "simulator faults",
        f"{plan.error_rate:.0%} 5xx, {plan.timeout_rate:.0%} timeouts",
        f"outage of {plan.outage[1] - plan.outage[0]} hours; {stats.reading_retries} reading requests retried",
    )
    table.add_row("unexpected exits", str(sum(stats.unexpected_exits.values())),
                  ", ".join(f"{k} {v}" for k, v in sorted(stats.unexpected_exits.items())))
    table.add_row("measurements checked", f"{findings.measurements:,}",
                  f"{findings.estimated:,} estimated, {findings.held:,} held, {findings.microcredits:,} µcr posted")
    for name, ok, detail in findings.checks:
        table.add_row(name, "[green]ok" if ok else "[red]DIFFERENT", detail)
    table.add_row("[bold]differences found", f"[bold]{findings.differences}", "")
    return table


async def run_chaos(plan_name: str = "small", keep: bool = False) -> int:
    plan = PLANS[plan_name]
    s = plan.scenario
    run = f"chaos{os.getpid()}"
    logs = ROOT / ".local" / "chaos" / run
    database = await fresh_database("chaos")
    prefix = f"{run}."
    await ensure_topics(KAFKA, prefix=prefix)
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    sup = Supervisor(database, prefix, sim_url, logs)
    stats = Stats()
    hours = plan.hour_list
    outage = (hours[plan.outage[0]], hours[plan.outage[1]])
    sim_log = (logs / "sim.log")
    logs.mkdir(parents=True, exist_ok=True)
    sim = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything else runs
        [str(ROOT / ".venv/bin/billing"), "sim", "--port", str(sim_port), "--log-level", "warning", *s.sim_args(),
         "--fault-error-rate", str(plan.error_rate), "--fault-timeout-rate", str(plan.timeout_rate),
         "--fault-timeout-seconds", "3", "--fault-seed", str(plan.seed),
         "--fault-outage", f"{outage[0]:%Y-%m-%dT%H:%M:%SZ}/{outage[1]:%Y-%m-%dT%H:%M:%SZ}"],
        cwd=ROOT, env={**os.environ, "SIM_OIDC_ISSUER": sim_url}, stdout=sim_log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True)
    api: Api | None = None
    t0 = time.monotonic()
    try:
        await wait_http(sim_url + "/healthz", sim, 60, f"the simulator (see {sim_log})")
        for kind in SERVICES:
            sup.add(kind, kind)
        for inst in list(sup.instances.values()):
            sup.start(inst)
        for inst in list(sup.instances.values()):
            await sup.ready(inst)
        console.rule(f"[bold]billing chaos[/] ({plan.name}): {len(hours)} hours from {hours[0]:%Y-%m-%d %H:%M}Z, "
                     f"database {database}, topics {prefix}*, logs {logs}")
        api = Api(sup.url("api"), mint_token(["usage.admin", "usage.read"], subject="chaos-admin", issuer=sim_url))
        await set_up(api, s)
        driver = asyncio.create_task(drive(plan, sup, stats), name="driver")
        monkey = asyncio.create_task(chaos(plan, sup, stats, driver), name="chaos")
        with console.status("") as status:
            while not monkey.done():
                status.update(
                    f"hours {stats.hours_driven}/{plan.hours}, kills {sum(stats.kills.values())}, "
                    f"restarts kafka {stats.kafka_restarts} pg {stats.pg_restarts}, scale {len(stats.scale_events)}"
                )
                await asyncio.wait([monkey], timeout=1)
        monkey.result()
        await driver
        console.print(
            f"chaos done after {time.monotonic() - t0:.0f} s: {sum(stats.kills.values())} kills; "
            "waiting for the pipeline to drain"
        )
        for inst in sup.exited():
            stats.unexpected_exits[inst.name] += 1
            await restart(sup, inst, stats, "after an unexpected exit")
        await wait_settled(database, prefix)
        findings = await verify(plan, database, prefix, api)
        console.print(summary(plan, stats, findings, time.monotonic() - t0))
        result = {
            "plan": plan.name,
            "seconds": round(time.monotonic() - t0),
            "kills": dict(stats.kills),
            "kafka_restarts": stats.kafka_restarts,
            "pg_restarts": stats.pg_restarts,
            "scale_events": stats.scale_events,
            "unexpected_exits": dict(stats.unexpected_exits),
            "reading_retries": stats.reading_retries,
            "measurements": findings.measurements,
            "estimated": findings.estimated,
            "held": findings.held,
            "microcredits": findings.microcredits,
            "differences": findings.differences,
            "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in findings.checks],
            "timeline": stats.timeline,
        }
        (logs / "summary.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        enough = sum(stats.kills.values()) >= plan.min_kills and stats.kafka_restarts and stats.pg_restarts
        if findings.differences or not enough:
            console.print(f"[bold red]chaos: {findings.differences} differences[/] (logs and timeline in {logs})")
            return 1
        console.print(f"[bold green]chaos: nothing lost, nothing counted twice[/] (summary in {logs / 'summary.json'})")
        return 0
    finally:
        if api is not None:
            await api.http.aclose()
        sup.stop_all()
        sim.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(10)
        if not keep:
            with contextlib.suppress(Exception):
                await delete_topics(KAFKA, prefix=prefix)
            with contextlib.suppress(Exception):
                await drop_database(database)


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Until ``url`` answers 200; ChaosError when ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ChaosError(f"{what} exited with {proc.returncode} while starting")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise ChaosError(f"{what} did not answer {url} within {timeout:.0f} s")
