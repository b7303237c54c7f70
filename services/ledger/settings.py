"""Settings of the ledger, from ``LEDGER_*`` environment variables (and ``KAFKA_BOOTSTRAP_SERVERS``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import DSN_HELP, PORT_HELP, ServiceSettings, local_dsn

__all__ = ["LedgerSettings"]


class LedgerSettings(ServiceSettings):
    """The ledger: its database and broker (required in production) and its own tuning."""

    # populate_by_name: LedgerSettings(topic_prefix=..., kafka_bootstrap_servers=...) must not be ignored
    # (those fields have environment aliases; without it pydantic-settings drops the keyword silently).
    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore", frozen=True, populate_by_name=True)

    database_url: SecretStr = Field(default=local_dsn("ledger"), description=DSN_HELP)
    port: int = Field(default=8083, ge=0, le=65535, description=PORT_HELP)
    settlement_delay_hours: int = Field(
        default=72,
        ge=0,
        le=24 * 366,
        description="How long after an agreement ends its unused credits expire; usage of the period that "
        "arrives within this delay is still drawn from it.",
    )
    month_close_delay_hours: int = Field(
        default=96,
        ge=0,
        le=24 * 366,
        description="How long after a month ends (America/New_York) it is closed automatically.",
    )
    auto_close_months: bool = Field(
        default=True,
        description="Close months automatically after the delay; off where past months are replayed (the demo "
        "closes its month itself once the replay is posted).",
    )
    periodic_interval_seconds: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="How often the periodic task runs (expiry, month close, held charges, outbox); 0 = never.",
    )
    amend_quiet_seconds: float = Field(
        default=60.0,
        ge=0,
        le=30 * 86_400,
        description="A closed month's amended statement (the next version) is issued once no correction of it "
        "has been posted for this long, so that a re-rating's many batches make one version.",
    )
    outbox_sweep_after_seconds: float = Field(
        default=30.0,
        ge=0,
        description="The periodic task re-publishes outbox messages older than this (left by a crash).",
    )
