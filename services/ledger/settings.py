"""Settings of the ledger, from ``LEDGER_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, local_dsn


class LedgerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore", frozen=True)

    database_url: SecretStr = local_dsn("ledger")
    port: int = 8083
