"""Typed settings, read once from the environment, failing fast on a bad value.

Each service has its own prefix (``COLLECTOR_``, ``PRICER_``, ``LEDGER_``, ``API_``); the broker is the
one setting they share, ``KAFKA_BOOTSTRAP_SERVERS``. Secrets are ``SecretStr`` and never print.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServiceSettings", "local_dsn"]


def local_dsn(role: str) -> SecretStr:
    """The DSN of ``role`` on the local stack that ``make up`` starts (deploy/local/pg.sh)."""
    return SecretStr(f"postgresql://{role}:{role}@127.0.0.1:5433/billing")


class ServiceSettings(BaseSettings):
    """What every service needs. Subclasses set ``env_prefix`` and their own defaults."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    database_url: SecretStr = Field(description="PostgreSQL DSN of this service's own role.")
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS"),
        min_length=1,
    )
    topic_prefix: str = Field(
        default="",
        validation_alias=AliasChoices("KAFKA_TOPIC_PREFIX"),
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prepended to every topic name (tests and staging use it to keep apart).",
    )
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    db_pool_size: int = Field(default=8, ge=1, le=100)
    batch_max_records: int = Field(
        default=200, ge=1, le=100_000,
        description="Messages handled per batch (one transaction); a batch message holds a shard's measurements.",
    )
    batch_timeout_ms: int = Field(default=200, ge=1, le=60_000)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    schema_name: str = Field(default="", description="Defaults to the service name.")

    def topic(self, name: str) -> str:
        """The full name of topic ``name`` (a constant of ``shared.topics``) for this deployment."""
        return f"{self.topic_prefix}{name}"
