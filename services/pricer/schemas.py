"""Shapes of the pricer's internal HTTP endpoints (the api forwards its admin routes to them)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.pricer.pricing import MAX_AMOUNT, Price
from shared.contracts import UtcDatetime

__all__ = ["PriceIn", "PriceEndIn", "PriceOut", "PriceCreatedOut", "PriceList", "UnpricedList"]


class PriceIn(BaseModel):
    """``POST /internal/prices``: a price valid from ``valid_from`` until ``valid_until`` (exclusive;
    null: no end yet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    meter: Annotated[str, Field(min_length=1, max_length=64)]
    resource_kind: Annotated[str, Field(max_length=128)] = ""
    unit_of_measure: Annotated[str, Field(min_length=1, max_length=32)] = Field(
        description="What ``unit`` counts, e.g. `MB-hour` or `instance-hour` (informational)."
    )
    microcredits_per_unit: Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
    unit: Annotated[int, Field(gt=0, le=MAX_AMOUNT)] = Field(
        description="How many units of the measured quantity the price is for, e.g. 730 instance-hours."
    )
    valid_from: UtcDatetime
    valid_until: UtcDatetime | None = None

    @model_validator(mode="after")
    def _range_not_empty(self) -> Self:
        if self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be later than valid_from")
        return self


class PriceEndIn(BaseModel):
    """``POST /internal/prices/{id}/end``: the price stops applying at ``at`` (exclusive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: UtcDatetime


class PriceOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: UUID
    meter: str
    resource_kind: str
    unit_of_measure: str
    microcredits_per_unit: int
    unit: int
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
        default=0, description="Unpriced charges this price covered, re-priced and published as new revisions."
    )


class PriceList(BaseModel):
    items: list[PriceOut]


class UnpricedList(BaseModel):
    items: list[dict[str, Any]] = Field(description="The latest revision of each unpriced charge (usage.charge).")
    next_cursor: str | None = None
