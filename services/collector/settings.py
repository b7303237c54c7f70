"""Settings of the collector, from ``COLLECTOR_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, local_dsn


class CollectorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="COLLECTOR_", extra="ignore", frozen=True)

    database_url: SecretStr = local_dsn("collector")
    port: int = 8081
