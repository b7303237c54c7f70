"""Settings of the collector, from ``COLLECTOR_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.contracts import UtcDatetime
from shared.settings import ServiceSettings, local_dsn


class CollectorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="COLLECTOR_", extra="ignore", frozen=True)

    database_url: SecretStr = local_dsn("collector")
    port: int = 8081

    cf_api_url: str = Field(default="http://127.0.0.1:8090", description="Cloud Controller base URL.")
    uaa_url: str = Field(default="http://127.0.0.1:8090", description="UAA base URL (token endpoint /oauth/token).")
    client_id: str = "billing-collector"
    client_secret: SecretStr = SecretStr("sim-secret")
    per_page: int = Field(default=5000, ge=1, le=5000)
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    retry_attempts: int = Field(default=5, ge=1, le=20)
    token_refresh_margin_seconds: int = Field(default=60, ge=0)

    schedule_enabled: bool = Field(default=True, description="Take a periodic reading every hour at minute `schedule_minute`.")
    schedule_minute: int = Field(default=1, ge=0, le=59)
    gap_policy: Literal["previous", "linear", "none"] = "previous"
    max_gap_hours: int = Field(default=72, ge=1, le=24 * 31)
    sim_time_header: bool = Field(
        default=False,
        description="Send X-Sim-Time for the hour being read (simulator only; lets a backfill replay past hours).",
    )
    publish_chunk: int = Field(default=500, ge=1, le=100_000, description="Batches the relay publishes per transaction.")
    expected_since: UtcDatetime | None = Field(
        default=None,
        description="Completeness report: hours from this one on must each have a reading (default: from each "
        "meter's first successful reading).",
    )
