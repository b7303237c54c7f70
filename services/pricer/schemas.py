"""The pricer's internal HTTP interface: what each route takes and answers, and the routes as contracts
(``shared.edge.Operation``; ``handlers.py`` binds them). The api forwards /admin/prices and
/admin/unpriced here and documents them with these same models. Every route needs a token with
``usage.admin`` (README, "Security model")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.pricer.pricing import MAX_AMOUNT, Price
from shared import audit
from shared.auth import SCOPE_ADMIN
from shared.completeness import PricerCompleteness
from shared.completeness import operation as completeness_operation
from shared.contracts import ChargeComputed
from shared.edge import Answer, Count, CursorText, Operation, Params, Reply, Time, Uuid, count, declarer

__all__ = [
    "ADD_PRICE",
    "AUDIT",
    "COMPLETENESS",
    "END_PRICE",
    "GET_PRICE",
    "LIST_PRICES",
    "OPERATIONS",
    "UNPRICED",
    "PriceCreatedOut",
    "PriceEndIn",
    "PriceIn",
    "PriceList",
    "PriceOut",
    "PricePath",
    "PricesQuery",
    "UnpricedList",
    "UnpricedQuery",
]

Meter = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Kind = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{0,128}$")]  # the empty kind is a kind


class PriceIn(BaseModel):
    """``POST /internal/prices``: a price valid from ``valid_from`` until ``valid_until`` (exclusive;
    null: no end yet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    meter: Meter
    resource_kind: Kind = ""
    unit_of_measure: Annotated[str, Field(min_length=1, max_length=32, pattern=r"\S")] = Field(
        description="What ``unit`` counts, e.g. `MB-hour` or `instance-hour` (informational)."
    )
    microcredits_per_unit: Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
    unit: Annotated[int, Field(gt=0, le=MAX_AMOUNT)] = Field(
        description="How many units of the measured quantity the price is for, e.g. 730 instance-hours."
    )
    valid_from: Time
    valid_until: Time | None = None

    @model_validator(mode="after")
    def _range_not_empty(self) -> Self:
        if self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be later than valid_from")
        return self


class PriceEndIn(BaseModel):
    """``POST /internal/prices/{id}/end``: the price stops applying at ``at`` (exclusive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: Time


class PricePath(Params):
    price_id: Uuid = Field(description="A price id.")


class PricesQuery(Params):
    meter: Meter | None = Field(default=None, description="Only this meter.")
    resource_kind: Kind | None = Field(default=None, description="Only this kind (the empty kind is a kind).")
    at: Time | None = Field(default=None, description="Only prices valid at this time.")
    limit: Count = count(1000, 10_000, "At most this many.")


class UnpricedQuery(Params):
    limit: Count = count(100, 1000)
    cursor: CursorText | None = Field(default=None, description="`next_cursor` of the previous page.")


class PriceOut(Reply):
    id: UUID
    meter: str
    resource_kind: str
    unit_of_measure: str
    microcredits_per_unit: int = Field(ge=0)
    unit: int = Field(ge=1)
    valid_from: datetime
    valid_until: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, price: Price) -> PriceOut:
        return cls(
            id=price.id,
            meter=price.meter,
            resource_kind=price.resource_kind,
            unit_of_measure=price.unit_of_measure,
            microcredits_per_unit=price.microcredits_per_unit,
            unit=price.unit,
            valid_from=price.valid_from,
            valid_until=price.valid_until,
            created_at=price.created_at,
        )


class PriceCreatedOut(PriceOut):
    repriced_charges: int = Field(
        default=0, ge=0, description="Unpriced charges this price covered, re-priced and published as new revisions."
    )


class PriceList(Reply):
    items: list[PriceOut]


class UnpricedList(Reply):
    items: list[ChargeComputed] = Field(description="The latest revision of each unpriced charge.")
    next_cursor: str | None = Field(
        default=None, description="Pass it back as `cursor` for the next page; null on the last page."
    )


BUSY = "The price catalog is busy (batches hold its lock); retry."


_op = declarer(SCOPE_ADMIN, "pricer")


ADD_PRICE = _op(
    "POST", "/internal/prices", "Add a price (re-sending an identical one answers it with 200)",
    {
        201: Answer(PriceCreatedOut, "Added; unpriced charges it covers re-priced"),
        200: Answer(PriceCreatedOut, "The same price existed"),
    },
    body=PriceIn,
    refusals={409: "Another price of the meter and kind overlaps the range.", 503: BUSY},
    command="pricer.price.add",
)
LIST_PRICES = _op("GET", "/internal/prices", "Prices, filtered", {200: Answer(PriceList)}, query=PricesQuery)
GET_PRICE = _op(
    "GET", "/internal/prices/{price_id}", "One price", {200: Answer(PriceOut)},
    path_params=PricePath, refusals={404: "No such price."},
)
END_PRICE = _op(
    "POST", "/internal/prices/{price_id}/end", "End a price at a time (exclusive)", {200: Answer(PriceOut, "Ended")},
    path_params=PricePath, body=PriceEndIn,
    refusals={
        404: "No such price.",
        409: "The price has priced charges after that time, or cannot end then.",
        503: BUSY,
    },
    command="pricer.price.end",
)
UNPRICED = _op(
    "GET", "/internal/charges/unpriced", "The latest revision of each charge that has no price",
    {200: Answer(UnpricedList)}, query=UnpricedQuery,
)
COMPLETENESS = completeness_operation(PricerCompleteness, "pricer")
AUDIT = audit.operation("pricer")

OPERATIONS: tuple[Operation, ...] = (
    ADD_PRICE, LIST_PRICES, GET_PRICE, END_PRICE, UNPRICED, COMPLETENESS, AUDIT
)
