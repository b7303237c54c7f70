"""Settings of the api, from ``API_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, local_dsn


class ApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", frozen=True)

    database_url: SecretStr = local_dsn("api")
    port: int = 8080
