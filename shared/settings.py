"""Typed settings, read once from the environment, failing fast on a bad value.

Each service has its own prefix (``COLLECTOR_``, ``PRICER_``, ``LEDGER_``, ``API_``); the broker is the
one setting they share, ``KAFKA_BOOTSTRAP_SERVERS``. Secrets are ``SecretStr`` and never print.

Two profiles, chosen by ``BILLING_ENV``: ``local`` (the default) keeps the defaults of the local stack and
the simulator, so ``make up`` and the tests need no configuration; ``production`` gives no default to any
URL, secret, DSN or issuer (the fields a class names in ``PRODUCTION_REQUIRED``) and refuses values that
only make sense on a developer's machine: a loopback host, the simulator's client secret, a database
password equal to its role. A service started with such a setting stops at once with one line naming
the variable(s), instead of starting "healthy" and failing every request: the defaults point at the
simulator, which a cluster does not have.

``BILLING_ALLOW_LOCAL_HOSTS=true`` lifts only the loopback rule, for the test that runs the services with
the environment the deployment manifests give them, mapped onto this machine's stack.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, AnyHttpUrl, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DSN_HELP",
    "PORT_HELP",
    "PROFILE_ENV",
    "Kind",
    "ProfileSettings",
    "ServiceSettings",
    "SettingsError",
    "env_name",
    "kafka_servers_field",
    "load_settings",
    "local_dsn",
    "read_settings",
    "simulator_look",
    "topic_prefix_field",
]

PROFILE_ENV = "BILLING_ENV"
# The simulator's client secrets (simulator/config.py): a real UAA never issues these.
SIMULATOR_SECRETS = frozenset({"sim-secret"})
# What a production field holds, for the simulator-looking checks: a URL, a DSN, host:port broker list, a
# secret, or any value (only its presence is checked).
Kind = Literal["url", "dsn", "servers", "secret", "value"]

S = TypeVar("S", bound="ProfileSettings")
PORT_HELP = "Port to listen on (0: any free port)."
DSN_HELP = "PostgreSQL DSN of this service's own login role (its schema is the service's name)."


def local_dsn(role: str) -> SecretStr:
    """The DSN of ``role`` on the local stack that ``make up`` starts (deploy/local/pg.sh)."""
    return SecretStr(f"postgresql://{role}:{role}@127.0.0.1:5433/billing")


class SettingsError(Exception):
    """The settings cannot be used; the message is one line naming the variables."""


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in {"localhost", "ip6-localhost", "ip6-loopback"} or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def simulator_look(kind: str, value: Any, allow_local_hosts: bool = False) -> str | None:
    """Why ``value`` (of a production-required field of ``kind``) looks like a local or simulator value,
    or None when it does not."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    if not text.strip():
        return "is empty"
    if kind == "secret" and text in SIMULATOR_SECRETS:
        return "is the simulator's client secret"
    if kind == "url":
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "is not an http(s) URL"
        if _loopback(parts.hostname) and not allow_local_hosts:
            return f"points at this machine ({parts.hostname})"
    if kind == "dsn":
        parts = urlsplit(text)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            return "is not a postgresql:// DSN with a host"
        if _loopback(parts.hostname) and not allow_local_hosts:
            return f"points at this machine ({parts.hostname})"
        if parts.username and parts.password == parts.username:
            return "has the role name as its password (the local default)"
    if kind == "servers":
        for server in text.split(","):
            host = server.strip().rsplit(":", 1)[0]
            if _loopback(host) and not allow_local_hosts:
                return f"points at this machine ({host})"
    return None


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``cls``."""
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    if isinstance(alias, str):
        return alias
    return (str(cls.model_config.get("env_prefix", "")) + field).upper()


class ProfileSettings(BaseSettings):
    """The profile every settings class shares; subclasses list their production-required fields."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    # Field name -> Kind: no default in production, and no local-looking value.
    PRODUCTION_REQUIRED: ClassVar[Mapping[str, Kind]] = {}

    billing_env: Literal["local", "production"] = Field(
        default="local",
        validation_alias=AliasChoices(PROFILE_ENV),
        description="`local`: the local stack's and simulator's defaults. `production`: every URL, secret, DSN "
        "and issuer must be set and must not look local; a missing one stops the process naming it.",
    )
    allow_local_hosts: bool = Field(
        default=False,
        validation_alias=AliasChoices("BILLING_ALLOW_LOCAL_HOSTS"),
        description="In production, accept loopback hosts (only the test that runs the manifests' environment "
        "on this machine sets it).",
    )

    def production_problems(self) -> list[str]:
        """What stops this configuration in production, one phrase per variable."""
        problems = []
        cls = type(self)
        for name, kind in cls.PRODUCTION_REQUIRED.items():
            var = env_name(cls, name)
            if name not in self.model_fields_set:
                problems.append(f"{var} is not set")
                continue
            why = simulator_look(kind, getattr(self, name), self.allow_local_hosts)
            if why:
                problems.append(f"{var} {why}")
        return problems

    @model_validator(mode="after")
    def _production_profile(self) -> ProfileSettings:
        if self.billing_env == "production":
            problems = self.production_problems()
            if problems:
                raise ValueError(f"{PROFILE_ENV}=production: " + "; ".join(problems))
        return self


def _one_line(cls: type[BaseSettings], exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = [str(x) for x in err["loc"]]
        if loc and loc[0] in cls.model_fields:
            parts.append(f"{env_name(cls, loc[0])}: {msg}")
        elif loc:
            parts.append(f"{loc[0]}: {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts)


def read_settings(cls: type[S], **overrides: Any) -> S:
    """``cls`` from the environment (and ``overrides``); ``SettingsError`` with one line on a bad value."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise SettingsError(_one_line(cls, exc)) from None


def load_settings(cls: type[S], name: str) -> S:
    """For entry points: ``cls`` from the environment, or one line on stderr and exit status 2."""
    try:
        return read_settings(cls)
    except SettingsError as exc:
        print(f"billing {name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# The broker and the topics' prefix: the same two variables for every service and for ``billing topics``.
def kafka_servers_field() -> Any:
    return Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS"),
        min_length=1,
        description="The Kafka brokers (host:port, comma-separated) every service and the topics job use.",
    )


def topic_prefix_field() -> Any:
    return Field(
        default="",
        validation_alias=AliasChoices("KAFKA_TOPIC_PREFIX"),
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prepended to every topic and consumer-group name (tests and staging use it to keep apart).",
    )


class ServiceSettings(ProfileSettings):
    """What every service needs. Subclasses set ``env_prefix`` and their own defaults."""

    PRODUCTION_REQUIRED: ClassVar[Mapping[str, Kind]] = {
        "database_url": "dsn",
        "kafka_bootstrap_servers": "servers",
        "oidc_issuer": "url",
    }

    database_url: SecretStr = Field(description=DSN_HELP)
    kafka_bootstrap_servers: str = kafka_servers_field()
    topic_prefix: str = topic_prefix_field()
    host: str = Field(default="127.0.0.1", description="Interface to listen on (`0.0.0.0` in a container).")
    port: int = Field(ge=0, le=65535, description=PORT_HELP)
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    db_pool_size: int = Field(default=8, ge=1, le=100, description="Database connections in the pool.")
    batch_max_records: int = Field(
        default=1000, ge=1, le=100_000,
        description="Messages handled per batch (one transaction); a batch message holds a shard's measurements.",
    )
    batch_timeout_ms: int = Field(
        default=200, ge=1, le=60_000, description="How long a consumer waits to fill a batch."
    )
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Larger request bodies are refused (413).")
    http_header_timeout_seconds: float = Field(
        default=10.0, gt=0, le=600,
        description="A request's head (request line and headers) must arrive within this long of its first byte "
        "(of the connection's opening, for its first request), however it trickles in: else 408 and the "
        "connection is closed. A head over 64 KiB is refused (431).",
    )
    http_body_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600,
        description="A request's body must arrive within this long of its head: else 408 and the connection is "
        "closed (a body nobody reads, 1 s later). Answers are not bounded.",
    )
    http_keep_alive_seconds: int = Field(
        default=5, ge=1, le=600, description="An idle connection is closed this long after its last answer."
    )
    http_max_connections: int = Field(
        default=256, ge=2, le=100_000,
        description="Connections per process: a request whose head arrives while this many connections are "
        "open (its own included) or this many requests are in progress is answered 503.",
    )
    schema_name: str = Field(default="", description="The service's database schema; empty: the service's name.")

    # Tokens (shared.auth): every service verifies the bearer tokens of its routes against the same issuer;
    # OIDC discovery at <issuer>/.well-known/openid-configuration finds the JWKS.
    oidc_issuer: str = Field(
        default="http://127.0.0.1:8090",
        description="`iss` every token must carry; its OIDC discovery document names the keys.",
    )
    oidc_audience: str = Field(default="billing-api", min_length=1, description="`aud` every token must carry.")
    clock_skew_seconds: int = Field(default=30, ge=0, le=300, description="Leeway on exp and nbf.")
    jwks_cache_seconds: float = Field(default=600, ge=1, description="Keys are refreshed after this long.")
    jwks_refetch_min_interval_seconds: float = Field(
        default=10, ge=0, description="An unknown `kid` refetches the keys at most this often."
    )
    oidc_timeout_seconds: float = Field(default=5, gt=0, le=60, description="Timeout of a request to the issuer.")
    token_cache_size: int = Field(default=4096, ge=0, le=1_000_000, description="Verified tokens remembered.")
    token_cache_seconds: float = Field(
        default=60, ge=0, le=3600, description="How long a verified token is remembered."
    )

    @field_validator("oidc_issuer", mode="after")
    @classmethod
    def _issuer_is_url(cls, value: str) -> str:
        AnyHttpUrl(value)  # fail fast on something that is not an http(s) URL; keep the exact text for `iss`
        return value

    def topic(self, name: str) -> str:
        """The full name of topic ``name`` (a constant of ``shared.topics``) for this deployment."""
        return f"{self.topic_prefix}{name}"
