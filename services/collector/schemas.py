"""The collector's internal HTTP interface: what each route takes and answers, and the routes as contracts
(``shared.edge.Operation``; ``handlers.py`` binds them). The api forwards /admin/readings here and
documents it with these same models. Every route needs a token with ``usage.admin`` (README, "Security
model")."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared import audit
from shared.auth import SCOPE_ADMIN
from shared.clock import utcnow
from shared.completeness import CollectorCompleteness
from shared.completeness import operation as completeness_operation
from shared.edge import Answer, Operation, Params, Reply, Time, declarer

__all__ = [
    "AUDIT",
    "COMPLETENESS",
    "LIST_READINGS",
    "MAX_READINGS_RANGE",
    "OPERATIONS",
    "TAKE_READING",
    "ReadingList",
    "ReadingOut",
    "ReadingOutcomeOut",
    "ReadingRequest",
    "ReadingsQuery",
]

MAX_READINGS_RANGE = timedelta(days=32)
FUTURE_LEEWAY = timedelta(minutes=5)


class ReadingRequest(BaseModel):
    """A manual reading; ``hour`` defaults to the current hour."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hour: Time | None = Field(default=None, description="The UTC hour to read (minutes are dropped); not a future one.")
    kind: Literal["manual", "periodic"] = Field(
        default="manual",
        description="periodic: the scheduled reading of the hour, re-driven by an operator or the chaos run.",
    )

    @model_validator(mode="after")
    def _not_in_the_future(self) -> Self:
        if self.hour is not None and self.hour > utcnow() + FUTURE_LEEWAY:
            raise ValueError("hour: cannot read an hour in the future")
        return self


class ReadingsQuery(Params):
    since: Time | None = Field(default=None, alias="from", description="From this hour (default: two days ago).")
    until: Time | None = Field(
        default=None, alias="to", description="Until this hour, exclusive (default: the next hour)."
    )


class ReadingOutcomeOut(Reply):
    hour: datetime
    status: Literal["taken", "exists"]
    kind: Literal["periodic", "manual", "estimated"] = Field(
        description="Of the hour's reading (exists: the one it had)."
    )
    measurements: int = Field(ge=0)
    estimated: int = Field(ge=0)
    errors: list[str] = Field(description="What went wrong while reading (a meter that failed, bad CF input).")
    published: int = Field(ge=0)
    seconds: dict[str, float]
    detail: str | None = Field(default=None, description="Said when nothing was done.")


class ReadingOut(Reply):
    id: UUID
    hour: datetime
    kind: Literal["periodic", "manual", "estimated"] = Field(description="estimated: the hours of a gap, filled.")
    taken_at: datetime
    measurements: int
    estimated: int
    errors: list[str]
    published_at: datetime | None


class ReadingList(Reply):
    items: list[ReadingOut]


_op = declarer(SCOPE_ADMIN, "collector")


TAKE_READING = _op(
    "POST", "/internal/readings", "Take a reading of an hour now (a no-op if the hour has one)",
    {
        201: Answer(ReadingOutcomeOut, "Taken"),
        200: Answer(ReadingOutcomeOut, "The hour had a reading; nothing done"),
    },
    body=ReadingRequest,
    command="collector.reading.take",
)
LIST_READINGS = _op(
    "GET", "/internal/readings", "Readings whose hour is in [from, to)", {200: Answer(ReadingList)},
    query=ReadingsQuery, refusals={422: f"to is not after from, or more than {MAX_READINGS_RANGE.days} days after it."},
)
COMPLETENESS = completeness_operation(CollectorCompleteness, "collector")
AUDIT = audit.operation("collector")

OPERATIONS: tuple[Operation, ...] = (TAKE_READING, LIST_READINGS, COMPLETENESS, AUDIT)

