"""The api's logic, free of HTTP and Kafka: how charges and ledger messages change the read model, who
may see which customer, and how usage periods are cut (days and months in America/New_York).

Read-model rules (the charges themselves: ``charges.py`` and ``projector.py``):
- A charge is kept once per measurement, latest revision only (per shard of resources); a newer one takes
  the older one's value and amount back out of the rollups and puts its own in.
- A charge counts for a customer once the ledger has said, in a usage line of a usage transaction, that
  its org belonged to that customer in its reading hour (``org_customer_hour``); until then its changes
  wait (``pending_charges``).
- Balances come from the ledger's transactions by type: funding → funded, usage/late_usage → used,
  expiry → expired, a reversal → minus its original's bucket. Remaining = funded − used − expired;
  overage = max(0, −remaining). "As of" a time counts transactions that occurred at or before it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from uuid import UUID

from services.api.charges import ny_day, ny_month
from shared.clock import BUSINESS_TZ, as_utc
from shared.contracts import EntryLine, StatementIssued, TransactionPosted
from shared.money import MICROCREDITS_PER_CREDIT, display_credits

__all__ = [
    "DIMENSIONS",
    "GRANULARITIES",
    "GROUP_BYS",
    "TRANSACTION_TYPES",
    "Balance",
    "OrgHour",
    "TransactionRow",
    "UsageRange",
    "UsageRangeError",
    "amount_fields",
    "balance_from_buckets",
    "credits_text",
    "entries_mirror",
    "iso",
    "ny_day",
    "ny_midnight",
    "ny_month",
    "period_of",
    "reversal_candidates",
    "statement_row",
    "transaction_row",
    "usage_org_hours",
    "usage_range",
    "used_change",
]

log = logging.getLogger(__name__)

GRANULARITIES: tuple[str, ...] = ("hour", "day", "month")
GROUP_BYS: tuple[str, ...] = ("org", "space", "resource", "meter", "kind")
DIMENSIONS = GROUP_BYS
TRANSACTION_TYPES: tuple[str, ...] = ("funding", "usage", "late_usage", "expiry", "reversal", "correction")
BUCKET_OF_TYPE = {
    "funding": "funded", "usage": "used", "late_usage": "used", "expiry": "expired", "correction": "used"
}
USED_TYPES = ("usage", "late_usage", "correction")  # transactions that move ``used`` through the usage account

# The widest range one usage query may cover, per granularity (periods): a month of hours, a year of
# days, ten years of months.
MAX_PERIODS = {"hour": 31 * 24 + 1, "day": 366, "month": 120}


def ny_midnight(day: date) -> datetime:
    """The UTC instant at which ``day`` begins in America/New_York."""
    return datetime(day.year, day.month, day.day, tzinfo=BUSINESS_TZ).astimezone(UTC)


def _next_month(month: date) -> date:
    return date(month.year + (month.month == 12), month.month % 12 + 1, 1)


# --------------------------------------------------------------------------------------------- ledger


@dataclass(frozen=True, slots=True)
class OrgHour:
    org_id: str
    hour: datetime
    customer_id: UUID


def usage_org_hours(txns: Iterable[TransactionPosted]) -> list[OrgHour]:
    """Which customer each org belonged to in each reading hour, from usage transactions' usage lines."""
    seen: dict[tuple[str, datetime], OrgHour] = {}
    for t in txns:
        if t.type not in ("usage", "late_usage") or t.reading_hour is None:
            continue
        for line in t.usage:
            if line.org_id:
                seen.setdefault((line.org_id, t.reading_hour), OrgHour(line.org_id, t.reading_hour, t.customer_id))
    return list(seen.values())


@dataclass(frozen=True, slots=True)
class TransactionRow:
    transaction_id: UUID
    customer_id: UUID
    type: str
    occurred_at: datetime
    posted_at: datetime
    reading_hour: datetime | None
    description: str
    idempotency_key: str
    amount: int
    bucket: str
    signed_amount: int
    reverses: UUID | None
    entries: list[dict[str, object]]
    usage: list[dict[str, object]]
    corrects_month: date | None = None


def transaction_amount(entries: Iterable[EntryLine]) -> int:
    """The amount a balanced transaction moves: the total of its debit side."""
    return sum(e.amount for e in entries if e.side == "debit")


def transaction_row(t: TransactionPosted, original: tuple[UUID, str, int] | None = None) -> TransactionRow:
    """The stored form of ``t``; a reversal needs its ``original`` (id, bucket, signed amount) to know
    which bucket it takes back from — without it, it moves no bucket (and is logged)."""
    amount = transaction_amount(t.entries)
    reverses: UUID | None = None
    if t.type == "reversal":
        if original is None:
            bucket, signed = "none", 0
            log.warning("reversal of an unknown transaction moves no balance", extra={"transaction_id": str(t.id)})
        else:
            reverses, bucket = original[0], original[1]
            signed = -amount if original[2] >= 0 else amount
    elif t.type in USED_TYPES:
        bucket, signed = "used", used_change(t, amount)
    else:
        bucket, signed = BUCKET_OF_TYPE[t.type], amount
    return TransactionRow(
        transaction_id=t.id,
        customer_id=t.customer_id,
        type=t.type,
        occurred_at=t.occurred_at,
        posted_at=t.posted_at,
        reading_hour=t.reading_hour,
        description=t.description,
        idempotency_key=t.idempotency_key,
        amount=amount,
        bucket=bucket,
        signed_amount=signed,
        reverses=reverses,
        entries=[e.model_dump(mode="json") for e in t.entries],
        usage=[u.model_dump(mode="json") for u in t.usage],
        corrects_month=date.fromisoformat(t.corrects_month + "-01") if t.corrects_month else None,
    )


def used_change(t: TransactionPosted, amount: int) -> int:
    """How much a usage, late usage or correction transaction moves ``used``. Its usage lines carry signed
    microcredits (a volume price's crossing, a revision or a correction lowering a charge posts a negative
    line), and the debit total counts the decreases as well as the net, so with a negative line the change is
    the sum of the lines; otherwise (all lines positive) it is the amount. A correction without lines: the
    usage account's net credit (the ledger credits it with increases), else the amount."""
    lines = [u.microcredits for u in t.usage]
    if any(m < 0 for m in lines) or (t.type == "correction" and lines):
        return sum(lines)
    if t.type == "correction":
        on_usage = [e for e in t.entries if e.account == "usage"]
        if on_usage:
            return sum(e.amount if e.side == "credit" else -e.amount for e in on_usage)
    return amount


_UUID_IN_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def reversal_candidates(t: TransactionPosted) -> list[UUID]:
    """Ids a reversal may name as its original: its ``reverses`` field; for messages published before the
    field existed, the UUIDs in its idempotency key and description (the ledger's ``reversal:<id>``)."""
    if t.reverses is not None:
        return [t.reverses]
    found = _UUID_IN_TEXT.findall(f"{t.idempotency_key} {t.description}")
    return [UUID(x) for x in dict.fromkeys(found) if UUID(x) not in (t.id, t.customer_id)]


def entries_mirror(a: Iterable[Mapping[str, object]], b: Iterable[EntryLine]) -> bool:
    """True when ``b`` are the entries ``a`` with every side swapped (what a reversal posts)."""
    swap = {"debit": "credit", "credit": "debit"}
    left = sorted((str(e["account"]), swap[str(e["side"])], int(e["amount"])) for e in a)  # type: ignore[call-overload]
    right = sorted((e.account, e.side, e.amount) for e in b)
    return left == right


def statement_row(s: StatementIssued) -> dict[str, object]:
    return {
        "customer_id": s.customer_id,
        "month": date.fromisoformat(s.month + "-01"),
        "statement_id": s.id,
        "opening_balance": s.opening_balance,
        "funded": s.funded,
        "used": s.used,
        "expired": s.expired,
        "closing_balance": s.closing_balance,
        "used_by_kind": [line.model_dump(mode="json") for line in s.used_by_kind],
        "issued_at": s.issued_at,
        "version": s.version,
        "original_used": s.original_used,
        "correction": s.correction,
        "reasons": list(s.reasons),
    }


# ------------------------------------------------------------------------------------------- balances


@dataclass(frozen=True, slots=True)
class Balance:
    funded: int
    used: int
    expired: int

    @property
    def remaining(self) -> int:
        return self.funded - self.used - self.expired

    @property
    def overage(self) -> int:
        return max(0, -self.remaining)

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "funded": self.funded,
            "used": self.used,
            "expired": self.expired,
            "remaining": self.remaining,
            "overage": self.overage,
        }
        out["credits"] = {k: display_credits(int(v)) for k, v in out.items()}  # type: ignore[call-overload]
        return out


def balance_from_buckets(sums: Mapping[str, int]) -> Balance:
    return Balance(funded=sums.get("funded", 0), used=sums.get("used", 0), expired=sums.get("expired", 0))


# ---------------------------------------------------------------------------------------------- usage


class UsageRangeError(ValueError):
    """``from``/``to`` do not make a range of whole periods of the granularity."""


@dataclass(frozen=True, slots=True)
class UsageRange:
    granularity: str
    start: datetime  # UTC
    end: datetime  # UTC
    first: date | datetime  # first period key (date for day/month, UTC hour for hour)
    stop: date | datetime  # first period key after the range


def usage_range(start: datetime, end: datetime, granularity: str) -> UsageRange:
    """Check that [start, end) is whole periods of ``granularity`` (hours in UTC, days and months in
    America/New_York) and not too wide."""
    if end <= start:
        raise UsageRangeError("`to` must be after `from`")
    if granularity == "hour":
        for name, t in (("from", start), ("to", end)):
            if (t.minute, t.second, t.microsecond) != (0, 0, 0):
                raise UsageRangeError(f"`{name}` must be a whole hour for granularity=hour")
        periods = int((end - start) / timedelta(hours=1))
        first: date | datetime = start
        stop: date | datetime = end
    elif granularity == "day":
        for name, t in (("from", start), ("to", end)):
            if ny_midnight(ny_day(t)) != t:
                raise UsageRangeError(f"`{name}` must be midnight in America/New_York for granularity=day")
        first, stop = ny_day(start), ny_day(end)
        periods = (stop - first).days
    elif granularity == "month":
        for name, t in (("from", start), ("to", end)):
            if ny_midnight(ny_month(t)) != t:
                raise UsageRangeError(
                    f"`{name}` must be the start of a month in America/New_York for granularity=month"
                )
        first, stop = ny_month(start), ny_month(end)
        periods = (stop.year - first.year) * 12 + stop.month - first.month
    else:
        raise UsageRangeError(f"unknown granularity {granularity!r}")
    if periods > MAX_PERIODS[granularity]:
        raise UsageRangeError(f"at most {MAX_PERIODS[granularity]} periods per query for granularity={granularity}")
    return UsageRange(granularity, start, end, first, stop)


@functools.lru_cache(maxsize=4096)
def period_of(granularity: str, key: date | datetime) -> dict[str, str]:
    """The label and UTC bounds of the period whose key is ``key`` (cached: callers must not change it)."""
    if granularity == "hour":
        assert isinstance(key, datetime)
        start = as_utc(key)
        return {"period": iso(start), "period_start": iso(start), "period_end": iso(start + timedelta(hours=1))}
    assert isinstance(key, date) and not isinstance(key, datetime)
    if granularity == "day":
        return {
            "period": key.isoformat(),
            "period_start": iso(ny_midnight(key)),
            "period_end": iso(ny_midnight(key + timedelta(days=1))),
        }
    return {
        "period": key.strftime("%Y-%m"),
        "period_start": iso(ny_midnight(key)),
        "period_end": iso(ny_midnight(_next_month(key))),
    }


def iso(t: datetime) -> str:
    """A UTC time as RFC 3339 with ``Z``."""
    return as_utc(t).isoformat().replace("+00:00", "Z")


def amount_fields(amount: Fraction) -> dict[str, object]:
    """How an exact amount is answered: ``microcredits`` = floor of the exact sum (an integer),
    ``microcredits_exact`` = the reduced fraction "numerator/denominator", ``credits`` = a 6-decimal
    figure for people (never to be summed)."""
    n, d = amount.numerator, amount.denominator
    return {"microcredits": n // d, "microcredits_exact": f"{n}/{d}", "credits": credits_text(n, d)}


def credits_text(n: int, d: int) -> str:
    """``shared.money.display_credits(Fraction(n, d))`` in integer arithmetic (it is on the hot path):
    microcredits rounded half up (away from zero) to whole ones, shown as credits with 6 decimals."""
    sign = "-" if n < 0 else ""
    q = (abs(n) * 2 + d) // (2 * d)
    whole, frac = divmod(q, MICROCREDITS_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"
