"""Settings of the pricer, from ``PRICER_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import DSN_HELP, PORT_HELP, ServiceSettings, local_dsn

__all__ = ["PricerSettings"]


class PricerSettings(ServiceSettings):
    """The pricer: its database and broker (required in production) and its own tuning."""

    model_config = SettingsConfigDict(env_prefix="PRICER_", extra="ignore", frozen=True)

    database_url: SecretStr = Field(default=local_dsn("pricer"), description=DSN_HELP)
    port: int = Field(default=8082, ge=0, le=65535, description=PORT_HELP)

    maintenance_interval_seconds: float = Field(
        default=15.0,
        gt=0,
        description="How often the outbox of re-priced revisions is flushed and the unpriced gauge refreshed.",
    )
    reprice_chunk: int = Field(
        default=2000, ge=1, le=50_000, description="Unpriced charges re-priced per transaction."
    )
    reading_hour_horizon_seconds: int = Field(
        default=86_400,
        ge=3600,
        le=31 * 86_400,
        description="How far past the pricer's clock a measurement's reading_hour may be (clock skew between "
        "collector and pricer); a later one, or one before 2000-01-01, goes to the DLQ.",
    )
    catalog_lock_timeout_ms: int = Field(
        default=10_000, ge=100, description="How long a price change waits for in-flight batches before answering 503."
    )
