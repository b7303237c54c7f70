"""Fault injection: configuration, seeded randomness and the ASGI middleware for CF endpoints."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from simulator.clock import SimClock, format_time, parse_time
from simulator.foundation import to_hour

__all__ = ["FaultConfig", "FaultMiddleware", "FaultState", "cf_error_body", "is_cf_path"]


@dataclass
class FaultConfig:
    """What goes wrong, and how often. Rates are fractions in [0, 1] of CF (``/v3``) requests."""

    error_rate: float = 0.0
    """Requests answered 502 or 503 with a CF-style error body."""
    timeout_rate: float = 0.0
    """Requests that sleep ``timeout_seconds`` before being answered (to trip client timeouts)."""
    timeout_seconds: float = 30.0
    slow_page_seconds: float = 0.0
    """Delay added to every CF request."""
    outage: list[tuple[datetime, datetime]] = field(default_factory=list)
    """[from, to) simulated-hour windows during which every CF request gets 503."""
    malformed_rate: float = 0.0
    """Fraction of listed resources returned with a required field missing."""
    seed: int = 0
    """Seed of the fault randomness (reset whenever the config is replaced)."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "timeout_rate", "malformed_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        for name in ("timeout_seconds", "slow_page_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        windows: list[tuple[datetime, datetime]] = []
        for start, end in self.outage:
            s, e = to_hour(start), to_hour(end)
            if not s < e:
                raise ValueError(f"outage window must have from < to, got [{s}, {e})")
            windows.append((s, e))
        self.outage = windows

    def in_outage(self, hour: datetime) -> bool:
        return any(start <= hour < end for start, end in self.outage)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["outage"] = [[format_time(s), format_time(e)] for s, e in self.outage]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaultConfig:
        """Build from JSON (outage windows as ``[[from, to], ...]`` ISO strings). Raises ValueError."""
        if not isinstance(data, dict):
            raise ValueError("fault config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name == "outage":
                if not isinstance(value, list) or not all(isinstance(w, list | tuple) and len(w) == 2 for w in value):
                    raise ValueError("outage must be a list of [from, to] pairs")
                kwargs[name] = [(parse_time(str(w[0])), parse_time(str(w[1]))) for w in value]
            elif name == "seed":
                kwargs[name] = int(value)
            else:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{name} must be a number")
                kwargs[name] = float(value)
        return cls(**kwargs)


class FaultState:
    """The live fault config and its seeded random stream."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)

    def replace(self, config: FaultConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)

    def malformed(self) -> bool:
        rate = self.config.malformed_rate
        return rate > 0.0 and self.rng.random() < rate


def cf_error_body(code: int, title: str, detail: str) -> bytes:
    return orjson.dumps({"errors": [{"code": code, "title": title, "detail": detail}]})


_UNAVAILABLE = (503, 10015, "CF-ServiceUnavailable")
_BAD_GATEWAY = (502, 10001, "CF-UnknownError")


def is_cf_path(path: str) -> bool:
    return path == "/v3" or path.startswith("/v3/")


class FaultMiddleware:
    """Applies outages, errors, timeouts and slowness to CF ``/v3`` requests (pure ASGI)."""

    def __init__(self, app: ASGIApp, faults: FaultState, clock: SimClock) -> None:
        self.app = app
        self.faults = faults
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_cf_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        cfg, rng = self.faults.config, self.faults.rng
        try:
            hour = self.clock.hour_for(Headers(scope=scope))
        except ValueError:
            hour = None  # the endpoint answers 400 for a bad X-Sim-Time
        if hour is not None and cfg.in_outage(hour):
            await _reply(send, *_UNAVAILABLE, f"Simulated outage at {format_time(hour)}")
            return
        if cfg.error_rate > 0.0 and rng.random() < cfg.error_rate:
            status, code, title = _BAD_GATEWAY if rng.random() < 0.5 else _UNAVAILABLE
            await _reply(send, status, code, title, "Simulated server error")
            return
        if cfg.timeout_rate > 0.0 and rng.random() < cfg.timeout_rate:
            await asyncio.sleep(cfg.timeout_seconds)
        if cfg.slow_page_seconds > 0.0:
            await asyncio.sleep(cfg.slow_page_seconds)
        await self.app(scope, receive, send)


async def _reply(send: Send, status: int, code: int, title: str, detail: str) -> None:
    body = cf_error_body(code, title, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
