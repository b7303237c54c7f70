"""The example consumer an internal team would copy (examples/consumer) runs against the real broker: it
subscribes to usage.charges.v3 with its own group and writes one CSV row per charge, exact amounts and units
included (a graduated price's charges with their units and no amount: the ledger prices the month's
total), and it does not take messages away from the services' groups."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from shared.batches import Band, Charges, Price, Ref, charges_id, encode_charges, shard_key, shard_of
from shared.contracts import ChargesComputed
from shared.kafka import Outgoing, Publisher, group_lag
from shared.topics import CHARGES

ROOT = Path(__file__).resolve().parents[2]
HOUR = datetime(2026, 10, 5, 14, tzinfo=UTC)
PRICE = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
GRADUATED = Price(uuid.UUID("00000000-0000-4000-8000-0000000000bb"), 0, 1024, "graduated",
                  [Band("1000", 0), Band("4001/2", 1370, 250), Band(None, 1000)])


def _batch(resources: list[str], values: list[int], priced: list[bool], revision: int = 1) -> Charges:
    shard = shard_of(resources[0])
    assert all(shard_of(r) == shard for r in resources)
    n = len(resources)
    return Charges(
        id=charges_id(HOUR, "cfapps", shard, resources, [revision] * n),
        reading_hour=HOUR, meter="cfapps", unit="MB", shard=shard, priced_at=HOUR,
        orgs=[Ref("org-1", "Org One")], spaces=[Ref("space-1", "dev")], kinds=[""],
        prices=[Price(PRICE, 1_000_000, 747_520)],
        resource_id=resources, resource_name=[f"name-{r}" for r in resources], org=[0] * n, space=[0] * n,
        kind=[0] * n, value=values, estimated=[False] * n, revision=[revision] * n,
        price=[0 if p else -1 for p in priced],
        amount_numerator=[v * 1_000_000 if p else 0 for v, p in zip(values, priced, strict=True)],
        amount_denominator=[747_520 if p else 1 for p in priced],
    )


def _graduated_batch(resources: list[str], values: list[int]) -> Charges:
    """A batch of a graduated price: amount 0/1 per item, as the pricer publishes it."""
    shard = shard_of(resources[0])
    n = len(resources)
    return Charges(
        id=charges_id(HOUR, "cfservices", shard, resources, [1] * n),
        reading_hour=HOUR, meter="cfservices", unit="instance", shard=shard, priced_at=HOUR,
        orgs=[Ref("org-1", "Org One")], spaces=[Ref("space-1", "dev")], kinds=["plan-g"], prices=[GRADUATED],
        resource_id=resources, resource_name=[f"name-{r}" for r in resources], org=[0] * n, space=[0] * n,
        kind=[0] * n, value=values, estimated=[False] * n, revision=[1] * n, price=[0] * n,
        amount_numerator=[0] * n, amount_denominator=[1] * n,
    )


def _same_shard(count: int) -> list[str]:
    """``count`` resource ids of one shard (a batch holds one shard)."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        rid = f"app-{i:04d}"
        if shard_of(rid) == shard_of("app-0000"):
            found.append(rid)
        i += 1
    return found


async def test_the_example_writes_one_row_per_charge_with_its_exact_amount(infra, topic_prefix, tmp_path) -> None:
    resources = _same_shard(3)
    first = _batch(resources, [1024, 2048, 512], [True, True, False])
    again = _batch(resources[:1], [1024], [True], revision=2)
    graduated = _graduated_batch(["svc-g"], [3000])
    for b in (first, again, graduated):
        ChargesComputed.model_validate_json(encode_charges(b))  # what the pricer publishes, by the contract
    publisher = Publisher(infra.kafka, "test-example")
    await publisher.start()
    try:
        await publisher.publish(
            topic_prefix + CHARGES,
            [Outgoing(shard_key(b.shard), encode_charges(b)) for b in (first, again, graduated)],
        )
    finally:
        await publisher.stop()

    out = tmp_path / "charges.csv"
    group = f"{topic_prefix}example-csv"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "KAFKA_TOPIC_PREFIX": topic_prefix}
    log = tmp_path / "consumer.log"
    with log.open("wb") as sink:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.consumer.consumer", "--out", str(out), "--group", group],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(300):
            if out.exists() and len(out.read_text().splitlines()) >= 6 and await group_lag(
                infra.kafka, group, topic_prefix + CHARGES
            ) == 0:
                break
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    with out.open() as f:
        rows = list(csv.DictReader(f))
    by_shard = [r for r in rows if r["resource_id"] != "svc-g"]  # (the graduated batch's partition may differ)
    assert [(r["resource_id"], r["revision"]) for r in by_shard] == [
        (resources[0], "1"), (resources[1], "1"), (resources[2], "1"), (resources[0], "2"),
    ]
    (g,) = [r for r in rows if r["resource_id"] == "svc-g"]
    assert (g["price_id"], g["price_model"], g["value"], g["unit"]) == (str(GRADUATED.id), "graduated", "3000",
                                                                         "instance")
    assert g["units"] == "375/128"  # 3000 instances / 1024, exact
    assert (g["amount_numerator"], g["amount_denominator"], g["credits"]) == ("", "", "")
    priced = by_shard[0]
    assert (priced["price_model"], priced["units"]) == ("flat", "1/730")  # 1024 MB / 747,520 (730 × 1024)
    assert (priced["amount_numerator"], priced["amount_denominator"]) == (str(1024 * 1_000_000), "747520")
    assert priced["credits"] == "0.001370"  # 1024e6 / 747520 µcr = 1369.86 µcr, shown to 6 places of credits
    assert (priced["price_id"], priced["org_id"], priced["space_id"], priced["unit"]) == (
        str(PRICE),
        "org-1",
        "space-1",
        "MB",
    )
    unpriced = by_shard[2]
    assert (unpriced["price_id"], unpriced["price_model"], unpriced["units"]) == ("", "", "")
    assert (unpriced["amount_numerator"], unpriced["credits"]) == ("0", "0.000000")
    # Its own group: the services' groups still have everything to read.
    assert await group_lag(infra.kafka, topic_prefix + "ledger", topic_prefix + CHARGES) == 3
