"""Settings of the pricer, from ``PRICER_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, local_dsn


class PricerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PRICER_", extra="ignore", frozen=True)

    database_url: SecretStr = local_dsn("pricer")
    port: int = 8082

    maintenance_interval_seconds: float = Field(
        default=15.0, gt=0, description="How often the outbox of re-priced revisions is flushed and the unpriced gauge refreshed."
    )
    reprice_chunk: int = Field(default=2000, ge=1, le=50_000, description="Unpriced charges re-priced per transaction.")
    catalog_lock_timeout_ms: int = Field(
        default=10_000, ge=100, description="How long a price change waits for in-flight batches before answering 503."
    )
