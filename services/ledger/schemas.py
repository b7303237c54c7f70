"""Request bodies of the ledger's internal HTTP commands (responses are plain JSON objects)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts import UtcDatetime

__all__ = ["MAX_MICROCREDITS", "AgreementIn", "AssignmentIn", "CustomerIn", "ReverseIn", "TierIn"]

MAX_MICROCREDITS = 2**62


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierIn(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")]
    credits_per_period: Annotated[int, Field(gt=0, le=MAX_MICROCREDITS, strict=True)] = Field(
        description="Microcredits an agreement of this tier funds unless it names its own amount."
    )


class CustomerIn(_Body):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    tier: Annotated[str, Field(min_length=1, max_length=64)]


class AssignmentIn(_Body):
    org_id: Annotated[str, Field(min_length=1, max_length=64)]
    customer_id: UUID
    starts_at: UtcDatetime


class AgreementIn(_Body):
    customer_id: UUID
    starts_at: UtcDatetime
    ends_at: UtcDatetime
    credits: Annotated[int, Field(gt=0, le=MAX_MICROCREDITS, strict=True)] | None = Field(
        default=None, description="Microcredits funded; the customer's tier default when absent."
    )


class ReverseIn(_Body):
    reason: Annotated[str, Field(max_length=500)] = ""
