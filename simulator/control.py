"""Simulator control routes (no auth): clock, oracle, faults, health."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.clock import format_time, parse_time
from simulator.faults import FaultConfig
from simulator.responses import json_response
from simulator.state import SimState

__all__ = ["control_routes"]


def _error(detail: str, status: int = 400) -> Response:
    return json_response({"error": detail}, status)


async def _json_body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON body: {exc}") from None


def control_routes(state: SimState) -> list[Route]:
    def clock_body() -> dict[str, str]:
        return {"time": format_time(state.clock.now)}

    async def get_clock(request: Request) -> Response:
        return json_response(clock_body())

    async def put_clock(request: Request) -> Response:
        """Body ``{"time": "<ISO-8601>"}`` or ``{"advance_hours": n}``."""
        try:
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            if "time" in body:
                state.clock.set(parse_time(str(body["time"])))
            elif isinstance(body.get("advance_hours"), int) and not isinstance(body["advance_hours"], bool):
                state.clock.advance(body["advance_hours"])
            else:
                raise ValueError('expected {"time": "..."} or {"advance_hours": <int>}')
        except ValueError as exc:
            return _error(str(exc))
        return json_response(clock_body())

    async def expected(request: Request) -> Response:
        """The oracle's measurements for ``?hour=`` (default: the request's simulated hour)."""
        try:
            raw = request.query_params.get("hour")
            hour = parse_time(raw) if raw is not None else state.clock.hour_for(request.headers)
        except ValueError as exc:
            return _error(f"invalid hour: {exc}")
        measurements = state.foundation.expected_usage(hour)
        return json_response({"hour": format_time(hour), "measurements": [asdict(m) for m in measurements]})

    async def get_faults(request: Request) -> Response:
        return json_response(state.faults.config.to_json())

    async def put_faults(request: Request) -> Response:
        """Replace the whole fault config (omitted fields take their defaults)."""
        try:
            config = FaultConfig.from_json(await _json_body(request))
        except (ValueError, TypeError) as exc:
            return _error(str(exc))
        state.faults.replace(config)
        return json_response(config.to_json())

    async def info(request: Request) -> Response:
        f = state.foundation
        return json_response(
            {
                "seed": f.seed,
                "orgs": f.n_orgs,
                "spaces_per_org": f.n_spaces_per_org,
                "apps": f.n_apps,
                "services": f.n_services,
                "plans": f.n_plans,
                "start": format_time(state.config.start),
                "time": format_time(state.clock.now),
                "token_ttl_seconds": state.config.token_ttl_seconds,
                "issuer": state.issuer,
            }
        )

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    return [
        Route("/sim/clock", get_clock, methods=["GET"]),
        Route("/sim/clock", put_clock, methods=["PUT"]),
        Route("/sim/expected", expected, methods=["GET"]),
        Route("/sim/faults", get_faults, methods=["GET"]),
        Route("/sim/faults", put_faults, methods=["PUT"]),
        Route("/sim/info", info, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
