"""Settings of the api, from ``API_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import DSN_HELP, PORT_HELP, Kind, ServiceSettings, local_dsn

__all__ = ["ApiSettings"]


def _base_url(value: object) -> str:
    text = str(AnyHttpUrl(str(value)))
    return text.rstrip("/")


class ApiSettings(ServiceSettings):
    """The api: its database and broker, the OIDC issuer its tokens come from (``ServiceSettings``), and the
    owning services it forwards admin commands to (each required in production)."""

    # validate_by_name: ServiceSettings gives topic_prefix and kafka_bootstrap_servers env aliases, and
    # without it `ApiSettings(topic_prefix=...)` is silently ignored (see the report on shared/settings.py).
    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", frozen=True, validate_by_name=True)
    PRODUCTION_REQUIRED: ClassVar[Mapping[str, Kind]] = {
        **ServiceSettings.PRODUCTION_REQUIRED,
        "ledger_url": "url",
        "pricer_url": "url",
        "collector_url": "url",
    }

    database_url: SecretStr = Field(default=local_dsn("api"), description=DSN_HELP)
    port: int = Field(default=8080, ge=0, le=65535, description=PORT_HELP)

    query_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Usage answers and access decisions are reused this long; 0 = off.",
    )

    # The owning services of the admin commands.
    ledger_url: str = Field(default="http://127.0.0.1:8083", description="The ledger's base URL (admin commands).")
    pricer_url: str = Field(default="http://127.0.0.1:8082", description="The pricer's base URL (admin commands).")
    collector_url: str = Field(
        default="http://127.0.0.1:8081", description="The collector's base URL (admin commands)."
    )
    upstream_timeout_seconds: float = Field(
        default=15, gt=0, le=300, description="Timeout of a forwarded admin command."
    )

    # Webhooks (services/api/webhooks.py).
    webhook_poll_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often each instance looks for webhook deliveries that are due."
    )
    webhook_timeout_seconds: float = Field(default=5, gt=0, le=30, description="Timeout of one webhook POST.")
    webhook_allow_http: bool = Field(
        default=False, description="In production, accept http:// webhook URLs too (https only otherwise)."
    )

    @field_validator("ledger_url", "pricer_url", "collector_url", mode="after")
    @classmethod
    def _upstream_is_url(cls, value: str) -> str:
        return _base_url(value)
