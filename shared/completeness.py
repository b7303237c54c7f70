"""The contract of ``GET /internal/completeness?from=&to=`` on the collector, the pricer and the ledger: what
each owner counts in its own schema per reading hour and meter, for the api's completeness report
(``services/api/completeness.py`` holds the rules). Counts are of distinct measurements; charges at their
latest revision. Only (hour, meter) pairs with something to count are listed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from shared.auth import SCOPE_ADMIN
from shared.contracts import UtcDatetime
from shared.db import Conn
from shared.edge import INVALID_PARAMETER, Answer, Call, Handler, Operation, Params, ProblemError, Time, parse_params
from shared.edge import answer as edge_answer

__all__ = [
    "MAX_RANGE_HOURS",
    "CollectorCompleteness",
    "CollectorCount",
    "LedgerCompleteness",
    "LedgerCount",
    "PricerCompleteness",
    "PricerCount",
    "RangeQuery",
    "check_range",
    "counts_handler",
    "operation",
    "parse_range",
]

# The internal routes take a little more than the api allows (31 days), never an unbounded scan.
MAX_RANGE_HOURS = 32 * 24

Count = Annotated[int, Field(ge=0, strict=True)]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Item(_Answer):
    hour: UtcDatetime = Field(description="The reading hour (UTC hour start).")
    meter: Annotated[str, Field(max_length=64)]


class CollectorCount(_Item):
    read: Count = Field(default=0, description="Measurements read from Cloud Foundry.")
    estimated: Count = Field(default=0, description="Measurements estimated for a missed hour.")
    published: Count = Field(default=0, description="Of both, those of readings the outbox marks published.")
    meter_run: Literal["ok", "failed"] | None = Field(
        default=None, description="This meter's run in the hour's reading."
    )


class CollectorCompleteness(_Answer):
    meters: list[str] = Field(description="The meters the collector runs.")
    expected_since: dict[str, UtcDatetime | None] = Field(
        description="Per meter, the first hour that must have a reading (null: none expected yet)."
    )
    due_before: UtcDatetime = Field(description="Hours before this one have ended by the collector's clock.")
    items: list[CollectorCount]


class PricerCount(_Item):
    priced: Count = 0
    unpriced: Count = 0
    revisions: Count = Field(default=0, description="Sum of the latest revisions of these charges.")


class PricerCompleteness(_Answer):
    items: list[PricerCount]


class LedgerCount(_Item):
    posted: Count = Field(default=0, description="Charges applied to a customer's month (the ledger's shard_state).")
    held: Count = Field(default=0, description="Charges held: their org had no customer at that hour.")
    revisions: Count = Field(default=0, description="Sum of the revisions applied or held.")


class LedgerCompleteness(_Answer):
    items: list[LedgerCount]


class RangeQuery(Params):
    since: Time = Field(alias="from", description="Start (inclusive), with its zone.")
    until: Time = Field(alias="to", description="End (exclusive), with its zone.")


def check_range(q: RangeQuery) -> tuple[datetime, datetime]:
    """``from`` < ``to``, at most MAX_RANGE_HOURS apart; 422 ``invalid-parameter`` otherwise."""
    if q.since >= q.until:
        raise ProblemError(INVALID_PARAMETER, "to: must be after from", parameter="to")
    if (q.until - q.since).total_seconds() > MAX_RANGE_HOURS * 3600:
        raise ProblemError(INVALID_PARAMETER, f"to: at most {MAX_RANGE_HOURS} hours after from", parameter="to")
    return q.since, q.until


def parse_range(query: Mapping[str, str]) -> tuple[datetime, datetime]:
    """``from`` and ``to`` of an internal completeness query; 422 problem when missing, naive, empty or
    longer than MAX_RANGE_HOURS."""
    return check_range(parse_params(RangeQuery, query.items()))


def operation(answer: type[BaseModel], owner: str) -> Operation:
    """The contract of an owner's ``GET /internal/completeness`` answering ``answer``."""
    return Operation(
        "GET",
        "/internal/completeness",
        f"What the {owner} holds per reading hour and meter, for the api's completeness report",
        {200: Answer(answer)},
        SCOPE_ADMIN,
        query=RangeQuery,
        refusals={422: f"from not before to, or more than {MAX_RANGE_HOURS} hours apart."},
        tags=("completeness",),
    )


def counts_handler(
    counts: Callable[[Conn, datetime, datetime], Awaitable[Sequence[asyncpg.Record]]],
    answer: type[PricerCompleteness | LedgerCompleteness],
    item: type[PricerCount | LedgerCount],
) -> Handler:
    """The handler of an owner whose counts are the rows of one query, ``counts(conn, since, until)``, each
    row holding exactly the fields of ``item`` (the pricer and the ledger)."""

    async def completeness(call: Call) -> Response:
        since, until = check_range(call.query_as(RangeQuery))
        async with call.request.app.state.runtime.pool.acquire() as conn:
            rows = await counts(conn, since, until)
        return edge_answer(answer.model_validate({"items": [item.model_validate(dict(r)) for r in rows]}))

    return completeness
