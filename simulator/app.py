"""Assembly of the simulator's Starlette application."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware

from simulator.cf_api import cf_routes
from simulator.config import SimConfig
from simulator.control import control_routes
from simulator.faults import FaultMiddleware
from simulator.oidc_api import oidc_routes
from simulator.state import SimState

__all__ = ["SimConfig", "create_app"]


def create_app(config: SimConfig | None = None) -> Starlette:
    """The CF v3 + UAA + OIDC simulator. Its live state is ``app.state.sim`` (a SimState)."""
    state = SimState.from_config(config or SimConfig())
    app = Starlette(
        routes=[*cf_routes(state), *oidc_routes(state), *control_routes(state)],
        middleware=[Middleware(FaultMiddleware, faults=state.faults, clock=state.clock)],
    )
    app.state.sim = state
    return app
