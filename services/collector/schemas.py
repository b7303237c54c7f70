"""HTTP shapes of the collector's internal endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts import UtcDatetime


class ReadingRequest(BaseModel):
    """A manual reading; ``hour`` defaults to the current hour."""

    model_config = ConfigDict(extra="forbid")

    hour: UtcDatetime | None = Field(default=None, description="The UTC hour to read (minutes are dropped).")
    kind: Literal["manual", "periodic"] = Field(
        default="manual",
        description="periodic: the scheduled reading of the hour, re-driven by an operator or the chaos run.",
    )
