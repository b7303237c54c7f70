"""The scenario of the api's read-model tests and its oracle: charges (revisions, duplicates, an unpriced
charge re-priced, a charge revised while its org's customer is not known yet, an org that changes customer
in the middle of a day, both sides of the New York month boundary and the end of daylight saving time),
dealt into ``usage.charges.v2`` batches, and the ledger's TransactionPosted/StatementIssued messages for
customers ``A`` and ``B``; ``fill`` publishes them to a harness's topics and waits until they are consumed,
and ``oracle`` computes the expected figures from the charges with Fractions, not by the api's code."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from shared.contracts import StatementIssued, TransactionPosted
from tests.support.api_factories import ChargeItem, amount_of, batches, charge, statement, txn
from tests.support.api_harness import ApiHarness

NY = ZoneInfo("America/New_York")
A, B = uuid.UUID("0190a000-0000-7000-8000-00000000000a"), uuid.UUID("0190a000-0000-7000-8000-00000000000b")
H1 = datetime(2026, 10, 5, 14, tzinfo=UTC)
H2 = datetime(2026, 10, 5, 15, tzinfo=UTC)
H3 = datetime(2026, 11, 1, 3, tzinfo=UTC)  # Oct 31, 23:00 EDT: still October in New York
H4 = datetime(2026, 11, 1, 4, tzinfo=UTC)  # Nov 1, 00:00 EDT: November
H5 = datetime(2026, 11, 1, 6, tzinfo=UTC)  # Nov 1, 01:00 EST (after the clocks went back)
OCT = (datetime(2026, 10, 1, 4, tzinfo=UTC), datetime(2026, 11, 1, 4, tzinfo=UTC))
NOV_END = datetime(2026, 12, 1, 5, tzinfo=UTC)

# Which customer each org belongs to in each hour (what the ledger's usage postings will say): org-z moves
# from A to B between H1 and H2, in the middle of October 5 in New York.
OWNER = {("org-x", h): A for h in (H1, H2, H3, H4, H5)} | {
    ("org-y", H1): B, ("org-y", H2): B, ("org-z", H1): A, ("org-z", H2): B
}


def rx1(h: datetime, i: int) -> ChargeItem:
    value = 512 * (i + 1)
    amount = Fraction(value * 1_000_000, 1024 * 730)
    return charge(h, "app-x1", org="org-x", space="space-x", value=value, amount=amount)


def svc(h: datetime, amount: Fraction, revision: int = 1) -> ChargeItem:
    return charge(
        h, "svc-x2", org="org-x", space="space-x2", meter="cfservices", kind="plan-a", unit="instance", value=1,
        amount=amount, revision=revision,
    )


# Published before the ledger names any customer: all of them wait for their org's customer.
EARLY = [
    rx1(H1, 0),
    svc(H1, Fraction(5, 3)),
    charge(H1, "app-z1", org="org-z", space="space-z", value=128, amount=Fraction(333)),
    charge(H2, "app-z1", org="org-z", space="space-z", value=128, amount=Fraction(1, 9)),
    charge(H1, "app-y1", org="org-y", space="space-y", value=64, amount=Fraction(1, 2)),
    charge(H2, "app-x3", org="org-x", space="space-x", value=256, priced=False),
    # revised while still waiting: only the second revision may count (app-x6 shares app-y2's shard: one
    # batch holds orgs of both customers)
    charge(H1, "app-y2", org="org-y", space="space-y", value=32, amount=Fraction(5, 7)),
    charge(H1, "app-x6", org="org-x", space="space-x", value=2048, amount=Fraction(3, 7)),
    charge(H1, "app-y2", org="org-y", space="space-y", value=48, amount=Fraction(2, 11), revision=2),
]
# Published after the ledger named every customer.
LATE = [
    rx1(H2, 1),
    rx1(H3, 2),
    rx1(H4, 3),
    rx1(H5, 4),
    rx1(H2, 1),  # duplicate delivery
    svc(H1, Fraction(11, 1000), revision=2),
    svc(H1, Fraction(5, 3)),  # old revision again
    svc(H3, Fraction(2_000_000, 730)),
    charge(H2, "app-x3", org="org-x", space="space-x", value=256, amount=Fraction(1000, 7), revision=2),
    charge(H2, "app-y1", org="org-y", space="space-y", value=64, amount=Fraction(1, 2)),
    charge(H1, "app-y2", org="org-y", space="space-y", value=32, amount=Fraction(5, 7)),  # the replaced one again
    # app-z2 shares app-x1's shard: org-z is B's at H2, org-x A's
    charge(H2, "app-z2", org="org-z", space="space-z", value=256, amount=Fraction(7, 5)),
]


def latest(items: list[ChargeItem]) -> list[ChargeItem]:
    """The charge of each measurement with the highest revision."""
    best: dict[tuple[datetime, str, str], ChargeItem] = {}
    for c in items:
        if c.measurement not in best or c.revision > best[c.measurement].revision:
            best[c.measurement] = c
    return list(best.values())


def final_charges() -> list[ChargeItem]:
    return latest(EARLY + LATE)


def oracle(
    customer: uuid.UUID, period: Any, group: Any, owner: dict[tuple[str, datetime], uuid.UUID] | None = None,
    charges: list[ChargeItem] | None = None,
) -> dict[tuple[Any, Any], tuple[dict[str, int], Fraction]]:
    """Per (period of the reading hour, group of the charge): the values per unit and the exact amount of
    the latest charges whose org belonged to ``customer`` in their hour (``OWNER`` and the scenario's
    charges unless others are given)."""
    owner = OWNER if owner is None else owner
    out: dict[tuple[Any, Any], list[Any]] = defaultdict(lambda: [defaultdict(int), Fraction(0)])
    for c in final_charges() if charges is None else latest(charges):
        if owner.get((c.org_id, c.reading_hour)) != customer:
            continue
        cell = out[(period(c.reading_hour), group(c))]
        cell[0][c.unit] += c.value
        cell[1] += amount_of(c)
    return {k: (dict(v[0]), v[1]) for k, v in out.items()}


def ny_month(h: datetime) -> str:
    return h.astimezone(NY).strftime("%Y-%m")


def ny_day(h: datetime) -> str:
    return h.astimezone(NY).date().isoformat()


def ts(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


LEDGER_AMOUNTS = {H1: 3_000, H2: 4_000, H3: 5_000, H4: 6_000, H5: 7_000}


def ledger_messages() -> dict[str, Any]:
    fund_a = txn(A, "funding", 100_000_000, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC))
    usage_a = {
        h: txn(
            A, "late_usage" if h == H4 else "usage", amt, occurred_at=h, reading_hour=h,
            orgs=["org-x", "org-z"] if h == H1 else ["org-x"],
        )
        for h, amt in LEDGER_AMOUNTS.items()
    }
    expiry = txn(A, "expiry", 2_000_000, occurred_at=datetime(2026, 10, 20, tzinfo=UTC))
    orig = usage_a[H2]
    by_id = txn(
        A, "reversal", 4_000, occurred_at=datetime(2026, 10, 21, tzinfo=UTC), idempotency_key=f"reversal:{orig.id}",
        reverse_sides=True,
    )
    by_mirror = txn(
        A, "reversal", 5_000, occurred_at=datetime(2026, 11, 3, tzinfo=UTC), idempotency_key="correction-17",
        reverse_sides=True,
    )
    fund_b = txn(B, "funding", 1_000, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC))
    usage_b = [
        txn(B, "usage", 700, occurred_at=H1, reading_hour=H1, orgs=["org-y"]),
        txn(B, "usage", 800, occurred_at=H2, reading_hour=H2, orgs=["org-y", "org-z"]),
    ]
    stmt = statement(
        A, "2026-10", opening_balance=0, funded=100_000_000, used=8_000, expired=2_000_000, closing_balance=97_992_000
    )
    messages: dict[str, Any] = {
        "a": [fund_a, *usage_a.values(), expiry, by_id, by_mirror, stmt],
        "b": [fund_b, *usage_b],
        "orig": orig,
        "mirror_orig": usage_a[H3],
        "by_id": by_id,
        "by_mirror": by_mirror,
        "stmt": stmt,
    }
    return messages


def ledger_list(msgs: dict[str, Any]) -> list[TransactionPosted | StatementIssued]:
    """Every ledger message of the scenario, in the order they are published."""
    return [*msgs["a"], *msgs["b"]]


async def fill(h: ApiHarness) -> dict[str, Any]:
    """Charges first (they wait unattributed), then the ledger's facts, then more charges; each step
    consumed before the next is published."""
    await h.publish_charges(batches(EARLY))
    await h.caught_up()
    msgs = ledger_messages()
    await h.publish_ledger(ledger_list(msgs))
    await h.caught_up()
    await h.publish_charges(batches(LATE))
    await h.caught_up()
    return msgs
