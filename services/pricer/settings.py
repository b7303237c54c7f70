"""Settings of the pricer, from ``PRICER_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, local_dsn


class PricerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PRICER_", extra="ignore", frozen=True)

    database_url: SecretStr = local_dsn("pricer")
    port: int = 8082
