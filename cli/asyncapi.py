"""``billing asyncapi``: the AsyncAPI 3.0 document of each service's topics, as FastStream generates it from
the subscribers and publishers the service declares (``shared.kafka.Stream``), written to
``docs/asyncapi/<service>.json``. The same document is served live at ``/asyncapi.json`` on every service;
the committed copies are what internal teams read, and a test fails when they differ from the code.

Generated with fixed settings (broker ``kafka:9092``, no topic prefix), so that the files do not depend on
the machine that writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import orjson
from pydantic import SecretStr

__all__ = ["DOCS", "SERVICES", "documents", "render", "write"]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "asyncapi"
SERVICES = ("collector", "pricer", "ledger", "api")


class _Fixed(TypedDict):
    kafka_bootstrap_servers: str
    topic_prefix: str
    database_url: SecretStr


_FIXED: _Fixed = {
    "kafka_bootstrap_servers": "kafka:9092",
    "topic_prefix": "",
    "database_url": SecretStr("postgresql://-"),
}


def _factories() -> dict[str, Callable[[], Any]]:
    from services.api.app import create_app as api
    from services.api.settings import ApiSettings
    from services.collector.app import create_app as collector
    from services.collector.settings import CollectorSettings
    from services.ledger.app import create_app as ledger
    from services.ledger.settings import LedgerSettings
    from services.pricer.app import create_app as pricer
    from services.pricer.settings import PricerSettings

    return {
        "collector": lambda: collector(CollectorSettings(**_FIXED)),
        "pricer": lambda: pricer(PricerSettings(**_FIXED)),
        "ledger": lambda: ledger(LedgerSettings(**_FIXED)),
        "api": lambda: api(ApiSettings(**_FIXED)),
    }


def documents() -> dict[str, dict[str, Any]]:
    """Each service's AsyncAPI document (no broker is contacted)."""
    return {name: make().state.runtime.publisher.asyncapi() for name, make in _factories().items()}


def render(document: dict[str, Any]) -> bytes:
    """The bytes committed for a document: sorted keys, indented, a final newline."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write(directory: Path = DOCS) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, doc in documents().items():
        path = directory / f"{name}.json"
        path.write_bytes(render(doc))
        out.append(path)
    return out
