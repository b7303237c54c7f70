"""HTTP routes of the OIDC issuer: discovery document and JWKS."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.oidc import discovery_document, jwks_document
from simulator.responses import json_response
from simulator.state import SimState

__all__ = ["oidc_routes"]


def oidc_routes(state: SimState) -> list[Route]:
    async def discovery(request: Request) -> Response:
        return json_response(discovery_document(state.issuer))

    async def jwks(request: Request) -> Response:
        return json_response(jwks_document(state.signing_key()), headers={"cache-control": "max-age=300"})

    return [
        Route("/.well-known/openid-configuration", discovery, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    ]
