"""An example consumer of ``usage.charges.v3`` that an internal team can copy: FastStream, its own consumer
group, one CSV row per charge.

    python -m examples.consumer.consumer --out charges.csv [--bootstrap 127.0.0.1:9092] [--group charges-csv]

What it shows:
- a batch subscriber (``batch=True``): each Kafka message is already a batch of charges (one reading hour,
  meter and shard of resources), so a handful of messages per call is plenty;
- acknowledgement after the work (``AckPolicy.MANUAL`` + ``msg.ack()`` once the rows are on disk): at
  least once, never at most once. A redelivered batch writes its rows again: a charge's identity is
  (reading_hour, meter, resource_id, revision), and a higher revision of the same measurement replaces the
  lower one (its amount is the new total, not a difference);
- reading the columnar layout: item i is the i-th entry of every item column; ``org``, ``space``,
  ``kind`` and ``price`` are positions in the ``orgs``, ``spaces``, ``kinds`` and ``prices`` tables
  (``price`` -1: no price covers it yet; its amount is 0). The exact amount in microcredits is
  ``amount_numerator / amount_denominator``; round only for display;
- price models: a charge's units are ``value / prices[price].unit`` (exact). A ``flat`` price's charge has
  its exact amount; a ``graduated`` or ``volume`` price's charge has amount 0/1, because its money depends
  on the customer's whole month of the price (bands): the CSV leaves its amount and credits empty rather
  than show a cost of 0.

The contract is documented in ``docs/asyncapi/pricer.json`` (``ChargesComputed``). This example depends
on FastStream and pydantic only, not on the billing code.
"""

from __future__ import annotations

import argparse
import csv
import os
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Literal

from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.middlewares import AckPolicy
from pydantic import BaseModel

COLUMNS = (
    "reading_hour", "meter", "resource_id", "resource_name", "org_id", "space_id", "resource_kind", "value",
    "unit", "estimated", "revision", "price_id", "price_model", "units", "amount_numerator", "amount_denominator",
    "credits",
)


class Named(BaseModel):
    id: str
    name: str = ""


class BandTerms(BaseModel):
    up_to: str | None  # exact: "n" or "n/d" units of the price; null for the last band
    microcredits_per_unit: int
    flat_fee: int = 0


class PriceTerms(BaseModel):
    id: str
    microcredits_per_unit: int
    unit: int
    model: Literal["flat", "graduated", "volume"] = "flat"
    bands: list[BandTerms] | None = None


class ChargesComputed(BaseModel):
    """The part of the contract this consumer reads (unknown fields are ignored: newer minor additions to
    the topic do not break it)."""

    schema_name: Literal["usage.charges"]
    schema_version: Literal[3]
    reading_hour: str
    meter: str
    unit: str
    orgs: list[Named]
    spaces: list[Named]
    kinds: list[str]
    prices: list[PriceTerms]
    resource_id: list[str]
    resource_name: list[str]
    org: list[int]
    space: list[int]
    kind: list[int]
    value: list[int]
    estimated: list[bool]
    revision: list[int]
    price: list[int]
    amount_numerator: list[int]
    amount_denominator: list[int]


def rows(batch: ChargesComputed) -> list[tuple[object, ...]]:
    """One CSV row per charge of the batch."""
    out = []
    for i, rid in enumerate(batch.resource_id):
        p = batch.price[i]
        price = batch.prices[p] if p >= 0 else None
        num, den = batch.amount_numerator[i], batch.amount_denominator[i]
        units = str(Fraction(batch.value[i], price.unit)) if price is not None else ""
        money: tuple[object, ...]
        if price is not None and price.model != "flat":
            # Priced by the ledger on the customer's month total; see ledger.transactions.v1 (usage lines).
            money = ("", "", "")
        else:
            money = (num, den, f"{Decimal(num) / Decimal(den) / Decimal(1_000_000):.6f}")  # credits: display only
        out.append((
            batch.reading_hour, batch.meter, rid, batch.resource_name[i], batch.orgs[batch.org[i]].id,
            batch.spaces[batch.space[i]].id, batch.kinds[batch.kind[i]], batch.value[i], batch.unit,
            batch.estimated[i], batch.revision[i], price.id if price is not None else "",
            price.model if price is not None else "", units, *money,
        ))
    return out


def build(bootstrap: str, topic: str, group: str, out: Path) -> FastStream:
    broker = KafkaBroker(bootstrap, client_id=group)
    new_file = not out.exists()
    handle = out.open("a", newline="")
    writer = csv.writer(handle)
    if new_file:
        writer.writerow(COLUMNS)
        handle.flush()

    @broker.subscriber(
        topic, group_id=group, batch=True, max_records=100, auto_offset_reset="earliest", ack_policy=AckPolicy.MANUAL
    )
    async def on_charges(batches: list[ChargesComputed], msg: KafkaMessage) -> None:
        for batch in batches:
            writer.writerows(rows(batch))
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the offsets move on
        await msg.ack()

    app = FastStream(broker)

    @app.after_shutdown
    async def close() -> None:
        handle.close()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Write every charge of usage.charges.v3 to a CSV file.")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    parser.add_argument("--topic", default=os.environ.get("KAFKA_TOPIC_PREFIX", "") + "usage.charges.v3")
    parser.add_argument("--group", default="charges-csv", help="this consumer's own group (never a service's)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV file (appended to)")
    args = parser.parse_args()
    import asyncio

    asyncio.run(build(args.bootstrap, args.topic, args.group, args.out).run())


if __name__ == "__main__":
    main()
