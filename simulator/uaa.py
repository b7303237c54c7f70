"""UAA-like OAuth2 client_credentials token endpoints (opaque CF tokens, and OIDC JWTs)."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qs, unquote_plus

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.oidc import DEFAULT_AUDIENCE, mint_token
from simulator.responses import json_response
from simulator.state import SimState

__all__ = ["uaa_routes"]


def _oauth_error(status: int, error: str, description: str) -> Response:
    return json_response({"error": error, "error_description": description}, status)


async def _read_form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _client_credentials(request: Request, form: dict[str, str]) -> tuple[str, str] | None:
    """From HTTP Basic auth (RFC 6749 form-encoded id/secret) or the form fields."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, sep, secret = decoded.partition(":")
        return (unquote_plus(client_id), unquote_plus(secret)) if sep else None
    if "client_id" in form:
        return form["client_id"], form.get("client_secret", "")
    return None


async def _authorize(request: Request, expected: tuple[str, str]) -> tuple[dict[str, str], Response | None]:
    form = await _read_form(request)
    if _client_credentials(request, form) != expected:
        return form, _oauth_error(401, "unauthorized", "Bad credentials")
    grant_type = form.get("grant_type")
    if not grant_type:
        return form, _oauth_error(400, "invalid_request", "Missing grant type")
    if grant_type != "client_credentials":
        return form, _oauth_error(400, "unsupported_grant_type", f"Unsupported grant type: {grant_type}")
    return form, None


def uaa_routes(state: SimState) -> list[Route]:
    config = state.config

    async def cf_token(request: Request) -> Response:
        """``POST /oauth/token``: an opaque bearer token for the CF v3 API."""
        _, error = await _authorize(request, (config.client_id, config.client_secret))
        if error is not None:
            return error
        issued = state.tokens.issue(config.token_ttl_seconds)
        return json_response(
            {
                "access_token": issued.access_token,
                "token_type": "bearer",
                "expires_in": issued.expires_in,
                "scope": issued.scope,
                "jti": issued.jti,
            },
            headers={"cache-control": "no-store", "pragma": "no-cache"},
        )

    async def oidc_token(request: Request) -> Response:
        """``POST /oidc/token``: a signed JWT for the billing API (form: scope, customers, audience)."""
        form, error = await _authorize(request, (config.oidc_client_id, config.oidc_client_secret))
        if error is not None:
            return error
        scopes = form.get("scope", "usage.read").split()
        customers = [c for c in form.get("customers", "").replace(",", " ").split() if c]
        ttl = 3600
        token = mint_token(
            scopes,
            customers,
            subject=form.get("subject") or config.oidc_client_id,
            audience=form.get("audience") or DEFAULT_AUDIENCE,
            ttl=ttl,
            issuer=state.issuer,
            key=state.signing_key(),
        )
        return json_response(
            {"access_token": token, "token_type": "bearer", "expires_in": ttl, "scope": " ".join(scopes)},
            headers={"cache-control": "no-store", "pragma": "no-cache"},
        )

    return [
        Route("/oauth/token", cf_token, methods=["POST"]),
        Route("/oidc/token", oidc_token, methods=["POST"]),
    ]
