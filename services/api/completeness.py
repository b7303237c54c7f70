"""The completeness report (``GET /admin/completeness?from=&to=``): for every reading hour (UTC hour start)
and meter, how many measurements each stage of the pipeline has, and where they do not add up.

Each owning service counts its own schema (``GET /internal/completeness`` on the collector, the pricer
and the ledger); the api counts the dead-letter topics (``services/api/dead_letters.py``) and merges.
Every count is of distinct measurements; for charges, of the latest revision (a re-priced measurement
counts once).

The figures of a row (hour h, meter m):

- ``read``: measurements the collector read from Cloud Foundry; ``estimated``: those it estimated for a
  missed hour; ``published``: those of readings whose outbox row is marked published (``unpublished`` =
  the rest: the relay still owes them to ``usage.readings.v2``).
- ``priced`` / ``unpriced``: measurements whose latest charge revision at the pricer has / has no price;
  ``dead_lettered_at_pricer``: distinct measurements of that hour and meter on ``usage.readings.v2.dlq``
  and ``usage.readings.v1.dlq`` dead-lettered by the pricer's consumer group (a refused item of a batch
  counts alone; a batch refused as a whole counts each of its items).
- ``posted``: charges the ledger applied to a customer's exact month sum (``shard_state``), zero-amount
  and unpriced ones included (they count at 0 and are re-posted when re-priced; posting floors per
  customer, month and price, so a charge need not move a whole microcredit to be posted); ``held``:
  charges whose org had no customer at that hour (``held_shards``); ``dead_lettered_at_ledger``:
  distinct measurements on ``usage.charges.v3.dlq`` and ``usage.charges.v2.dlq`` (still drained) dead-lettered
  by the ledger's consumer group (the api's own group dead-letters the same bad charges too; those are not
  counted twice).
- ``revisions_behind``: the sum of the latest charge revisions at the pricer minus the sum of the
  revisions the ledger applied (posted or held).
- ``conflicts_at_pricer`` / ``conflicts_at_ledger``: distinct measurements of that hour and meter that
  arrived again with other content than the copy the pricer (the ledger) stores, refused to the same
  DLQs with a ``conflict:`` reason (``shared.batches.CONFLICT``). They are not in the dead-lettered
  counts: the stored copy is counted by its stage, so rules 2 and 3 still add up.

The rules, each checked per row; a row that breaks one is flagged with the rule and its numbers:

1. ``published``: read + estimated == published (the collector's outbox is drained).
2. ``priced``: published == priced + unpriced + dead_lettered_at_pricer (every published measurement was
   priced, left unpriced, or refused by the pricer; nothing else arrived).
3. ``posted``: priced + unpriced == posted + held + dead_lettered_at_ledger (the ledger posted, held or
   refused every charge, and has none the pricer does not).
4. ``latest_revision``: revisions_behind == 0 (the ledger applied the latest revision of every charge;
   checked when rule 3 holds and nothing of the row was dead-lettered at the ledger, since the counts
   must match for the sums to compare).
5. ``reading``: every hour in [from, to) that is due (it has ended by the collector's clock) and not
   before the meter's first successful reading (or ``COLLECTOR_EXPECTED_SINCE`` when set) has, for each
   meter the collector runs, a successful reading or estimated measurements. A meter that failed and was
   not estimated (yet), an hour never read (collector down, gap longer than the maximum, policy
   ``none``), and an estimated hour with nothing to estimate for that meter are flagged alike: nothing
   was billed for it, and an operator should know.
6. ``conflict``: conflicts_at_pricer == conflicts_at_ledger == 0. A measurement (or a charge revision)
   that came again with other content was refused and the first copy kept: one of them is wrong (a
   forged or buggy message), and an operator must look at the DLQ to tell which.

Dead letters are best effort: a DLQ message is attributed by its JSON's ``reading_hour`` and ``meter``;
those that cannot be (not JSON, fields missing) are totalled per DLQ topic over the whole topic, as
``unattributed``. A message both dead-lettered and later processed (a transient failure, then a replay)
counts twice and flags its row: look at the DLQ. If a DLQ cannot be read completely, the report says so
and does not reconcile.

Limits: ``from`` and ``to`` are RFC 3339 times with a zone; the report covers the whole UTC hours h with
from <= h < to, at least one and at most ``MAX_HOURS`` (31 days).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from shared.clock import hours_between, utcnow
from shared.completeness import CollectorCompleteness, LedgerCompleteness, PricerCompleteness, RangeQuery
from shared.edge import INVALID_PARAMETER, ProblemError, parse_params

__all__ = [
    "MAX_HOURS",
    "RULES",
    "TOTALS",
    "CollectorFacts",
    "CollectorRow",
    "CountDeadLetters",
    "DeadLetterCounts",
    "GetJson",
    "Key",
    "LedgerRow",
    "PricerRow",
    "Problem",
    "Row",
    "UpstreamAnswerError",
    "build_report",
    "parse_collector",
    "parse_ledger",
    "parse_pricer",
    "parse_range",
    "reconcile",
    "report_json",
    "whole_hours",
]

MAX_HOURS = 31 * 24
RULES = ("published", "priced", "posted", "latest_revision", "reading", "conflict")

HOUR = timedelta(hours=1)

Key = tuple[datetime, str]  # (reading hour, meter)


# ------------------------------------------------------------------------------------------ input


def _bad(detail: str) -> ProblemError:
    return ProblemError(INVALID_PARAMETER, detail, parameter="to")


def whole_hours(q: RangeQuery) -> tuple[datetime, datetime]:
    """The first whole hour of [from, to) and the end of the last one; a 422 problem, as every route
    answers a bad parameter, when from >= to, the range holds no whole hour or more than MAX_HOURS."""
    start, end = q.since, q.until
    if start >= end:
        raise _bad("to: must be after from")
    if end - start > (MAX_HOURS + 1) * HOUR:  # before listing the hours of a long range
        raise _bad(f"to: the range is longer than {MAX_HOURS} hours (31 days)")
    hours = hours_between(start, end)
    if not hours:
        raise _bad("to: the range holds no whole UTC hour (from <= h < to)")
    if len(hours) > MAX_HOURS:
        raise _bad(f"to: the range holds {len(hours)} whole hours; at most {MAX_HOURS} (31 days)")
    return hours[0], hours[-1] + HOUR


def parse_range(query: Mapping[str, str]) -> tuple[datetime, datetime]:
    """``from`` and ``to`` of a query (missing, unknown or repeated parameters and times without a zone
    are 422 problems too) as ``whole_hours`` gives them."""
    return whole_hours(parse_params(RangeQuery, query.items()))


class UpstreamAnswerError(Exception):
    """An owning service answered something that is not its completeness document."""


@dataclass(frozen=True, slots=True)
class CollectorRow:
    read: int = 0
    estimated: int = 0
    published: int = 0
    meter_run: str | None = None  # "ok" | "failed" | None (no run of this meter in that hour)


@dataclass(frozen=True, slots=True)
class CollectorFacts:
    meters: tuple[str, ...]  # the meters the collector runs
    expected_since: Mapping[str, datetime | None]  # per meter: hours from then on must be read
    due_before: datetime  # hours before this one have ended: they are due
    rows: Mapping[Key, CollectorRow]


@dataclass(frozen=True, slots=True)
class PricerRow:
    priced: int = 0
    unpriced: int = 0
    revisions: int = 0


@dataclass(frozen=True, slots=True)
class LedgerRow:
    posted: int = 0
    held: int = 0
    revisions: int = 0


@dataclass
class DeadLetterCounts:
    """One DLQ topic's dead-lettered measurements by (hour, meter), as ``dead_letters.tally`` counts them."""

    topic: str
    groups: tuple[str, ...]
    records: int = 0  # records read from the topic, whoever dead-lettered them
    counted: int = 0  # distinct messages of ``groups``
    unattributed: int = 0  # of which without a reading hour and meter
    complete: bool = True
    error: str = ""
    by_row: dict[Key, int] = field(default_factory=dict)
    # measurements refused as conflicts (reason ``conflict:``), apart from ``by_row``
    conflicts_by_row: dict[Key, int] = field(default_factory=dict)


def _validated(model: type[BaseModel], body: Any, who: str) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise UpstreamAnswerError(f"the {who} answered an unexpected document: {exc.error_count()} errors") from None


def parse_collector(body: Any) -> CollectorFacts:
    a: CollectorCompleteness = _validated(CollectorCompleteness, body, "collector")
    return CollectorFacts(
        meters=tuple(a.meters),
        expected_since=dict(a.expected_since),
        due_before=a.due_before,
        rows={(i.hour, i.meter): CollectorRow(i.read, i.estimated, i.published, i.meter_run) for i in a.items},
    )


def parse_pricer(body: Any) -> dict[Key, PricerRow]:
    a: PricerCompleteness = _validated(PricerCompleteness, body, "pricer")
    return {(i.hour, i.meter): PricerRow(i.priced, i.unpriced, i.revisions) for i in a.items}


def parse_ledger(body: Any) -> dict[Key, LedgerRow]:
    a: LedgerCompleteness = _validated(LedgerCompleteness, body, "ledger")
    return {(i.hour, i.meter): LedgerRow(i.posted, i.held, i.revisions) for i in a.items}


# ------------------------------------------------------------------------------------------ rules


@dataclass(frozen=True, slots=True)
class Problem:
    rule: str
    detail: str


@dataclass(frozen=True, slots=True)
class Row:
    hour: datetime
    meter: str
    expected: bool
    reading: str  # "ok" | "estimated" | "failed" | "none"
    read: int
    estimated: int
    published: int
    priced: int
    unpriced: int
    dead_lettered_at_pricer: int
    posted: int
    held: int
    dead_lettered_at_ledger: int
    revisions_behind: int
    problems: tuple[Problem, ...]
    conflicts_at_pricer: int = 0
    conflicts_at_ledger: int = 0

    @property
    def unpublished(self) -> int:
        return self.read + self.estimated - self.published

    @property
    def reconciles(self) -> bool:
        return not self.problems


def _reading_status(c: CollectorRow) -> str:
    if c.meter_run == "ok":
        return "ok"
    if c.estimated > 0:
        return "estimated"
    return "failed" if c.meter_run == "failed" else "none"


def _row(
    hour: datetime,
    meter: str,
    expected: bool,
    c: CollectorRow,
    p: PricerRow,
    led: LedgerRow,
    dl_pricer: int,
    dl_ledger: int,
    conflicts: tuple[int, int] = (0, 0),
) -> Row:
    problems: list[Problem] = []
    reading = _reading_status(c)
    collected = c.read + c.estimated
    if collected != c.published:
        problems.append(
            Problem(
                "published",
                f"read {c.read} + estimated {c.estimated} = {collected} measurements, published {c.published} "
                f"({collected - c.published} still in the collector's outbox)",
            )
        )
    at_pricer = p.priced + p.unpriced + dl_pricer
    if c.published != at_pricer:
        problems.append(
            Problem(
                "priced",
                f"published {c.published}, the pricer has priced {p.priced} + unpriced {p.unpriced} + "
                f"dead-lettered {dl_pricer} = {at_pricer}",
            )
        )
    charges = p.priced + p.unpriced
    at_ledger = led.posted + led.held + dl_ledger
    if charges != at_ledger:
        problems.append(
            Problem(
                "posted",
                f"priced {p.priced} + unpriced {p.unpriced} = {charges} charges, the ledger has posted {led.posted} "
                f"+ held {led.held} + dead-lettered {dl_ledger} = {at_ledger}",
            )
        )
    behind = p.revisions - led.revisions
    if charges == at_ledger and dl_ledger == 0 and behind != 0:
        problems.append(
            Problem(
                "latest_revision",
                f"the pricer's latest revisions sum to {p.revisions}, the ledger applied revisions summing to "
                f"{led.revisions}: {behind} revision(s) not applied",
            )
        )
    if expected and reading in ("failed", "none"):
        why = "the meter failed and the hour was not estimated" if reading == "failed" else "no reading and no estimate"
        problems.append(Problem("reading", f"reading missing: {why}"))
    for n, stage, copy in ((conflicts[0], "pricer", "measurement"), (conflicts[1], "ledger", "charge")):
        if n:
            problems.append(
                Problem(
                    "conflict",
                    f"{n} measurement(s) arrived again at the {stage} with other content than its stored {copy}: "
                    "refused to the DLQ (reason conflict:), the stored copy kept",
                )
            )
    return Row(
        hour,
        meter,
        expected,
        reading,
        c.read,
        c.estimated,
        c.published,
        p.priced,
        p.unpriced,
        dl_pricer,
        led.posted,
        led.held,
        dl_ledger,
        behind,
        tuple(problems),
        conflicts[0],
        conflicts[1],
    )


def reconcile(
    hours: Sequence[datetime],
    collector: CollectorFacts,
    pricer: Mapping[Key, PricerRow],
    ledger: Mapping[Key, LedgerRow],
    dead_at_pricer: Mapping[Key, int],
    dead_at_ledger: Mapping[Key, int],
    conflicts_at_pricer: Mapping[Key, int] | None = None,
    conflicts_at_ledger: Mapping[Key, int] | None = None,
) -> list[Row]:
    """One row per (hour, meter) of ``hours`` that any stage knows of or that is expected, by hour and
    meter; see the module docstring for the rules."""
    in_range = set(hours)
    keys: set[Key] = set()
    c_pricer, c_ledger = conflicts_at_pricer or {}, conflicts_at_ledger or {}
    for source in (collector.rows, pricer, ledger, dead_at_pricer, dead_at_ledger, c_pricer, c_ledger):
        keys.update(k for k in source if k[0] in in_range)
    expected: set[Key] = set()
    for meter in collector.meters:
        since = collector.expected_since.get(meter)
        if since is None:
            continue
        expected.update((h, meter) for h in hours if since <= h < collector.due_before)
    keys |= expected
    return [
        _row(
            h,
            m,
            (h, m) in expected,
            collector.rows.get((h, m), _NO_C),
            pricer.get((h, m), _NO_P),
            ledger.get((h, m), _NO_L),
            dead_at_pricer.get((h, m), 0),
            dead_at_ledger.get((h, m), 0),
            (c_pricer.get((h, m), 0), c_ledger.get((h, m), 0)),
        )
        for h, m in sorted(keys)
    ]


_NO_C, _NO_P, _NO_L = CollectorRow(), PricerRow(), LedgerRow()

TOTALS = (
    "read",
    "estimated",
    "published",
    "unpublished",
    "priced",
    "unpriced",
    "dead_lettered_at_pricer",
    "posted",
    "held",
    "dead_lettered_at_ledger",
    "conflicts_at_pricer",
    "conflicts_at_ledger",
)


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def row_json(r: Row) -> dict[str, Any]:
    return {
        "hour": _iso(r.hour),
        "meter": r.meter,
        "expected": r.expected,
        "reading": r.reading,
        **{name: getattr(r, name) for name in TOTALS},
        "revisions_behind": r.revisions_behind,
        "reconciles": r.reconciles,
        "problems": [{"rule": p.rule, "detail": p.detail} for p in r.problems],
    }


def report_json(
    start: datetime,
    end: datetime,
    rows: Sequence[Row],
    meters: Sequence[str],
    dead_letters: Sequence[DeadLetterCounts],
    generated_at: datetime,
) -> dict[str, Any]:
    """The answer of ``GET /admin/completeness``."""
    problems = [
        f"{d.topic}: could not be read completely ({d.error or 'timed out'}); dead-lettered counts are a lower bound"
        for d in dead_letters
        if not d.complete
    ]
    flagged = sum(1 for r in rows if not r.reconciles)
    return {
        "from": _iso(start),
        "to": _iso(end),
        "generated_at": _iso(generated_at),
        "hours": len(hours_between(start, end)),
        "meters": sorted(set(meters) | {r.meter for r in rows}),
        "reconciles": flagged == 0 and not problems,
        "flagged": flagged,
        "missing_readings": sum(1 for r in rows if any(p.rule == "reading" for p in r.problems)),
        "problems": problems,
        "totals": {name: sum(getattr(r, name) for r in rows) for name in TOTALS},
        "dead_letters": [
            {
                "topic": d.topic,
                "consumer_groups": list(d.groups),
                "records": d.records,
                "counted": d.counted,
                "unattributed": d.unattributed,
                "complete": d.complete,
            }
            for d in dead_letters
        ],
        "rows": [row_json(r) for r in rows],
    }


# ------------------------------------------------------------------------------------------ fan-out

# GET an owner's internal route: (service, path, query) -> its JSON body (errors are the caller's to raise).
GetJson = Callable[[str, str, Mapping[str, str]], Awaitable[Any]]
# Count the DLQs: ([usage.readings.v2.dlq, usage.readings.v1.dlq] by the pricer, [usage.charges.v3.dlq,
# usage.charges.v2.dlq] by the ledger).
CountDeadLetters = Callable[[], Awaitable[tuple[Sequence[DeadLetterCounts], Sequence[DeadLetterCounts]]]]


def _summed(counts: Sequence[DeadLetterCounts]) -> tuple[dict[Key, int], dict[Key, int]]:
    """Dead-lettered measurements and conflicts per (hour, meter), summed over DLQ topics."""
    rows: dict[Key, int] = {}
    conflicts: dict[Key, int] = {}
    for c in counts:
        for key, n in c.by_row.items():
            rows[key] = rows.get(key, 0) + n
        for key, n in c.conflicts_by_row.items():
            conflicts[key] = conflicts.get(key, 0) + n
    return rows, conflicts


async def build_report(
    get_json: GetJson, dead_letters: CountDeadLetters, start: datetime, end: datetime
) -> dict[str, Any]:
    """Ask the three owners and count the DLQs, all at once; reconcile and render the report of
    [start, end) (whole hours, as ``parse_range`` gives them)."""
    params = {"from": _iso(start), "to": _iso(end)}
    c, p, led, (at_pricer, at_ledger) = await asyncio.gather(
        get_json("collector", "/internal/completeness", params),
        get_json("pricer", "/internal/completeness", params),
        get_json("ledger", "/internal/completeness", params),
        dead_letters(),
    )
    collector = parse_collector(c)
    pricer_rows, pricer_conflicts = _summed(at_pricer)
    ledger_rows, ledger_conflicts = _summed(at_ledger)
    rows = reconcile(
        hours_between(start, end), collector, parse_pricer(p), parse_ledger(led), pricer_rows, ledger_rows,
        pricer_conflicts, ledger_conflicts,
    )
    return report_json(start, end, rows, collector.meters, (*at_pricer, *at_ledger), utcnow())
