"""What each service requires in production, as the operator must know it: the contract the settings
classes, the manifests and the start-up checks are tested against."""

from __future__ import annotations

from services.api.settings import ApiSettings
from services.collector.settings import CollectorSettings
from services.ledger.settings import LedgerSettings
from services.pricer.settings import PricerSettings

# What an operator must set for each service in production: the contract the manifests are checked against.
REQUIRED = {
    ApiSettings: [
        "API_DATABASE_URL",
        "KAFKA_BOOTSTRAP_SERVERS",
        "API_OIDC_ISSUER",
        "API_LEDGER_URL",
        "API_PRICER_URL",
        "API_COLLECTOR_URL",
    ],
    CollectorSettings: [
        "COLLECTOR_DATABASE_URL",
        "KAFKA_BOOTSTRAP_SERVERS",
        "COLLECTOR_OIDC_ISSUER",
        "COLLECTOR_CF_API_URL",
        "COLLECTOR_UAA_URL",
        "COLLECTOR_CLIENT_SECRET",
    ],
    LedgerSettings: ["LEDGER_DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "LEDGER_OIDC_ISSUER"],
    PricerSettings: ["PRICER_DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "PRICER_OIDC_ISSUER"],
}
