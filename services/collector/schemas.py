"""HTTP shapes of the collector's internal endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts import UtcDatetime


class ReadingRequest(BaseModel):
    """A manual reading; ``hour`` defaults to the current hour."""

    model_config = ConfigDict(extra="forbid")

    hour: UtcDatetime | None = Field(default=None, description="The UTC hour to read (minutes are dropped).")
