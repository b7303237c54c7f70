"""End-to-end benchmark: measurements/s from the collector's publish to the ledger's committed posting,
and the delay from a reading's publish to the customer's balance (through the api) reflecting it.

A synthetic foundation of ``--resources`` resources (70% apps, 30% service instances on three plans) in 50
orgs of 10 customers is published hour by hour, as the collector's relay publishes, for ``--hours`` hours
(the full size: 10,000 × 744 = 7.44 M). The pricer, the ledger and the api run as their own processes.
Then, at steady hourly load, a few more hours are published one at a time and the time until every
customer's balance in the api equals the exact expected figure is measured.

    .venv/bin/python -m bench.bench_e2e --resources 10000 --hours 744
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import msgspec

from bench.common import KAFKA, ROOT, drop_database, dsn, emit, fresh_database, fresh_topics
from shared import ids
from shared.batches import Item, Measurements, encode_measurements, measurement_batches, measurements_id, shard_key
from shared.clock import billing_month
from shared.kafka import Outgoing, Publisher, group_lag
from shared.topics import CHARGES, READINGS, TRANSACTIONS, delete_topics
from simulator.oidc import mint_token
from tests.stack import Stack

START = datetime(2026, 10, 1, 4, tzinfo=UTC)  # 2026-10-01 00:00 America/New_York
HOUR = timedelta(hours=1)
PLANS = ["plan-small", "plan-medium", "plan-large"]
APP_PRICE = (1_000_000, 730 * 1024)
PLAN_PRICES = {p: ((k + 1) * 2_000_000, 730) for k, p in enumerate(PLANS)}


class World:
    """Deterministic synthetic resources; value of a resource at hour h = base × (1 + h mod 3)."""

    def __init__(self, n: int, customers: int = 10, orgs: int = 50) -> None:
        self.orgs = [f"org-{i:03d}" for i in range(orgs)]
        self.customer_of_org = {o: i % customers for i, o in enumerate(self.orgs)}
        self.customers = customers
        self.resources: list[tuple[str, str, str, str, int, str]] = []  # id, meter, kind, org, base, unit
        apps = int(n * 0.7)
        for i in range(n):
            org = self.orgs[i % orgs]
            if i < apps:
                self.resources.append((f"app-{i:06d}", "cfapps", "", org, 64 * (1 + i % 16), "MB"))
            else:
                self.resources.append((f"si-{i:06d}", "cfservices", PLANS[i % 3], org, 1, "instance"))
        self._template: list[Measurements] | None = None
        # Exact usage of one hour per (customer, price key), for the factor 1; an hour's is factor × this.
        self.per_hour: dict[tuple[int, str, str], Fraction] = defaultdict(Fraction)
        for _, meter, kind, org, base, _ in self.resources:
            mpu, unit = APP_PRICE if meter == "cfapps" else PLAN_PRICES[kind]
            self.per_hour[(self.customer_of_org[org], meter, kind)] += Fraction(base * mpu, unit)

    @staticmethod
    def factor(hour: datetime) -> int:
        return 1 + int((hour - START) / HOUR) % 3

    def rows(self, hour: datetime) -> list[dict[str, Any]]:
        """The hour's measurements as rows (the set-based SQL baseline stores them so)."""
        f = self.factor(hour)
        make = {m: ids.measurement_ids(hour, m) for m in ("cfapps", "cfservices")}
        return [
            {"id": make[meter](res), "meter": meter, "resource_id": res, "resource_kind": kind, "org_id": org,
             "value": base * f}
            for res, meter, kind, org, base, _ in self.resources
        ]

    def messages(self, hour: datetime) -> list[Outgoing]:
        """The hour's readings as the collector's relay publishes them: usage.readings.v2 batches (built
        from the batches of the first hour with this hour's values: the relay sends stored bytes, it does
        not build them, so building them should cost the benchmark little)."""
        if self._template is None:
            by_meter: dict[tuple[str, str], list[Item]] = defaultdict(list)
            for res, meter, kind, org, base, unit in self.resources:
                by_meter[(meter, unit)].append(Item(res, res, org, org, f"{org}-space", "space", kind, base))
            self._template = [
                b
                for (meter, unit), items in by_meter.items()
                for b in measurement_batches(
                    START, meter, unit, items, reading_id=ids.reading_id(START), taken_at=START
                )
            ]
        f = self.factor(hour)
        rid, taken = ids.reading_id(hour), hour + timedelta(minutes=1)
        return [
            Outgoing(shard_key(b.shard), encode_measurements(msgspec.structs.replace(
                b, id=measurements_id(hour, b.meter, b.shard, b.resource_id), reading_id=rid, reading_hour=hour,
                taken_at=taken, value=[v * f for v in b.value],
            )))
            for b in self._template
        ]

    def expected_used(self, hours: list[datetime]) -> dict[int, int]:
        """Posted microcredits per customer after ``hours``: floor per customer, month and price."""
        sums: dict[tuple[int, Any, str, str], Fraction] = defaultdict(Fraction)
        for h in hours:
            month = billing_month(h)
            for (c, meter, kind), amount in self.per_hour.items():
                sums[(c, month, meter, kind)] += amount * self.factor(h)
        out: dict[int, int] = defaultdict(int)
        for (c, *_), v in sums.items():
            out[c] += v.numerator // v.denominator
        return dict(out)


async def set_up(stack: Stack, world: World) -> list[str]:
    # The internal routes verify an admin's token (of the simulator's issuer here).
    async with httpx.AsyncClient(timeout=60, headers=stack.admin_headers("bench-setup")) as c:
        ledger, pricer = stack.url("ledger"), stack.url("pricer")

        async def post(url: str, body: dict[str, object]) -> httpx.Response:
            r = await c.post(url, json=body)
            r.raise_for_status()
            return r

        await post(f"{ledger}/internal/tiers", {"name": "bench", "credits_per_period": 10**15})
        customers = []
        start, end = START.isoformat(), (START + timedelta(days=366)).isoformat()
        for i in range(world.customers):
            r = await post(f"{ledger}/internal/customers", {"name": f"customer-{i}", "tier": "bench"})
            customers.append(r.json()["id"])
            await post(
                f"{ledger}/internal/agreements", {"customer_id": r.json()["id"], "starts_at": start, "ends_at": end}
            )
        for org, ci in world.customer_of_org.items():
            await post(
                f"{ledger}/internal/org-assignments", {"org_id": org, "customer_id": customers[ci], "starts_at": start}
            )
        prices = [("cfapps", "", "MB-hour", *APP_PRICE)]
        prices += [("cfservices", p, "instance-hour", *PLAN_PRICES[p]) for p in PLANS]
        for meter, kind, uom, mpu, unit in prices:
            await post(f"{pricer}/internal/prices", {
                "meter": meter, "resource_kind": kind, "unit_of_measure": uom, "microcredits_per_unit": mpu,
                "unit": unit, "valid_from": (START - timedelta(days=1)).isoformat(), "valid_until": None})
    return customers


async def lags(prefix: str) -> dict[str, int]:
    pairs = {"pricer": ("pricer", READINGS), "ledger": ("ledger", CHARGES), "api_charges": ("api", CHARGES),
             "api_transactions": ("api", TRANSACTIONS)}
    return {k: await group_lag(KAFKA, prefix + g, prefix + t) for k, (g, t) in pairs.items()}


async def main(n_resources: int, n_hours: int, latency_hours: int) -> None:
    world = World(n_resources)
    db = await fresh_database("bench_e2e")
    prefix = await fresh_topics()
    stack = Stack(lambda role: dsn(db, role), prefix, ROOT / "bench" / "out" / "logs-e2e")
    rss: dict[str, list[float]] = defaultdict(list)
    try:
        await stack.start("sim", "pricer", "ledger", "api")
        customers = await set_up(stack, world)
        publisher = Publisher(KAFKA, client_id="bench-collector")
        await publisher.start()
        topic = prefix + READINGS
        total = n_resources * n_hours
        done: dict[str, float | None] = {k: None for k in ("pricer", "ledger", "api_charges", "api_transactions")}

        async def watch(t0: float) -> None:
            while any(v is None for v in done.values()):
                for name in ("pricer", "ledger", "api"):
                    rss[name].append(stack.rss_mb(name))
                current = await lags(prefix)
                # A stage is done when its lag is zero once everything upstream of it is done (a consumer
                # can be caught up for a moment while its producer is still at work).
                upstream = {"pricer": publish_end[0] is not None, "ledger": done["pricer"] is not None,
                            "api_charges": done["pricer"] is not None, "api_transactions": done["ledger"] is not None}
                for k, v in current.items():
                    if upstream[k] and v == 0 and done[k] is None:
                        done[k] = time.perf_counter() - t0
                await asyncio.sleep(0.5)

        publish_end: list[float | None] = [None]
        t0 = time.perf_counter()
        watcher = asyncio.create_task(watch(t0))
        hours = [START + HOUR * k for k in range(n_hours)]
        encode_s = 0.0
        for h in hours:
            te = time.perf_counter()
            msgs = world.messages(h)
            encode_s += time.perf_counter() - te
            await publisher.publish(topic, msgs)
        publish_end[0] = time.perf_counter() - t0
        await watcher

        # Steady hourly load: one hour at a time, publish -> every customer's balance in the api exact.
        token = mint_token(["usage.admin", "usage.read"], issuer=stack.url("sim"))
        latencies: list[float] = []
        async with httpx.AsyncClient(
            base_url=stack.url("api"), headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as api:
            for k in range(latency_hours):
                h = START + HOUR * (n_hours + k)
                hours.append(h)
                want = world.expected_used(hours)
                msgs = world.messages(h)
                tp = time.perf_counter()
                await publisher.publish(topic, msgs)

                async def reflected(ci: int, cid: str, want: dict[int, int] = want, tp: float = tp) -> float:
                    while True:
                        resp = await api.get(f"/v1/customers/{cid}/balance")
                        body = resp.json()
                        if resp.status_code == 200 and int(body["used"]) == want.get(ci, 0):
                            return time.perf_counter() - tp
                        if time.perf_counter() - tp > 120:
                            raise RuntimeError(f"balance of customer {ci} never reached {want.get(ci)}: {body}")
                        await asyncio.sleep(0.02)

                latencies.extend(await asyncio.gather(*(reflected(i, c) for i, c in enumerate(customers))))
        await publisher.stop()
        latencies.sort()
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
        emit(
            {
                "resources": n_resources,
                "hours": n_hours,
                "measurements": total,
                "collector_publish_per_s": round(total / (publish_end[0] or float("inf"))),
                "collector_encode_s": round(encode_s, 1),
                "e2e_seconds": round(done["ledger"] or 0, 1),
                "e2e_measurements_per_s": round(total / (done["ledger"] or 1e-9)),
                "pricer_done_s": round(done["pricer"] or 0, 1),
                "api_read_model_done_s": round(max(done["api_charges"] or 0, done["api_transactions"] or 0), 1),
                "api_read_model_updates_per_s": round(total / max(done["api_charges"] or 1e-9, 1e-9)),
                "latency_hours": latency_hours,
                "publish_to_balance_p50_s": round(statistics.median(latencies), 3),
                "publish_to_balance_p99_s": round(p(0.99), 3),
                "rss_mb": {
                    k: {"start": round(v[0]), "peak": round(max(v)), "end": round(v[-1])} for k, v in rss.items() if v
                },
                "targets": {"e2e_measurements_per_s": 100_000, "publish_to_balance_p99_s": 1.0},
            },
            "e2e",
        )
    finally:
        stack.stop()
        await drop_database(db)
        await delete_topics(KAFKA, prefix=prefix)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", type=int, default=10_000)
    ap.add_argument("--hours", type=int, default=744)
    ap.add_argument("--latency-hours", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.resources, a.hours, a.latency_hours))
