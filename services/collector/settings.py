"""Settings of the collector, from ``COLLECTOR_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.contracts import UtcDatetime
from shared.settings import DSN_HELP, PORT_HELP, Kind, ServiceSettings, local_dsn

__all__ = ["CollectorSettings"]


class CollectorSettings(ServiceSettings):
    """The collector: its database and broker, the Cloud Foundry API and UAA it reads with its client
    credentials (each required in production), and the hourly schedule."""

    model_config = SettingsConfigDict(env_prefix="COLLECTOR_", extra="ignore", frozen=True)
    PRODUCTION_REQUIRED: ClassVar[Mapping[str, Kind]] = {
        **ServiceSettings.PRODUCTION_REQUIRED,
        "cf_api_url": "url",
        "uaa_url": "url",
        "client_secret": "secret",
    }
    PRODUCTION_NOTES: ClassVar[Mapping[str, str]] = {"sim_time_header": "must be `false`"}

    database_url: SecretStr = Field(default=local_dsn("collector"), description=DSN_HELP)
    port: int = Field(default=8081, ge=0, le=65535, description=PORT_HELP)

    cf_api_url: str = Field(default="http://127.0.0.1:8090", description="Cloud Controller (CF v3 API) base URL.")
    uaa_url: str = Field(default="http://127.0.0.1:8090", description="UAA base URL (token endpoint /oauth/token).")
    client_id: str = Field(default="billing-collector", min_length=1, description="UAA client id.")
    client_secret: SecretStr = Field(default=SecretStr("sim-secret"), description="UAA client secret.")
    per_page: int = Field(default=5000, ge=1, le=5000, description="Resources per page asked of the CF API.")
    request_timeout_seconds: float = Field(default=30.0, gt=0, description="Timeout of one CF or UAA request.")
    retry_attempts: int = Field(default=5, ge=1, le=20, description="Attempts per CF request before a meter fails.")
    token_refresh_margin_seconds: int = Field(
        default=60, ge=0, description="A UAA token is renewed this long before it expires."
    )

    schedule_enabled: bool = Field(
        default=True, description="Take a periodic reading every hour at minute `schedule_minute`."
    )
    schedule_minute: int = Field(default=1, ge=0, le=59, description="Minute of the hour of the periodic reading.")
    gap_policy: Literal["previous", "linear", "none"] = Field(
        default="previous", description="Estimates for missed hours: `previous`, `linear` or `none`."
    )
    max_gap_hours: int = Field(
        default=72, ge=1, le=24 * 31, description="Longer gaps are reported on the reading, not filled."
    )
    sim_time_header: bool = Field(
        default=False,
        description="Send X-Sim-Time for the hour being read (simulator only; lets a backfill replay past hours; "
        "refused in production).",
    )
    publish_chunk: int = Field(
        default=500, ge=1, le=100_000, description="Batches the relay publishes per transaction."
    )
    expected_since: UtcDatetime | None = Field(
        default=None,
        description="Completeness report: hours from this one on must each have a reading (default: from each "
        "meter's first successful reading).",
    )

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if self.sim_time_header:
            problems.append("COLLECTOR_SIM_TIME_HEADER is on (only the simulator reads X-Sim-Time)")
        return problems
