"""Admin commands forwarded to the service that owns them (one httpx.AsyncClient per app, with timeouts):
the answer is the owner's status and body, problem+json included; 502 when the owner cannot be reached,
504 when it does not answer in time. A command's Idempotency-Key goes along (checked here first, as the
owner checks it), so a retry after a 504 is answered by the owner without running it twice.

Each /admin route is its owner's route contract (``services/<owner>/schemas.py``) under the api's path: the
same parameters, body and answers, so the api's OpenAPI document types every admin body and answer exactly
as the owner takes and gives them (the api imports only those schemas modules, never an owner's logic).
Path and query parameters are validated here with the owner's models and re-rendered from their parsed
form, so only validated values reach the upstream URL; the body is passed on as sent, for the owner to
validate (strictly, once).

The caller's bearer token is forwarded: the owner verifies it again and records its subject as the actor
(README, "Security model"). Of the caller's other headers only ``Idempotency-Key`` is passed on, and of
the owner's only ``Idempotent-Replayed``. A forwarded command is documented as its owner's command (its
key and the refusals that come with it) but recorded by the owner alone (``Operation.forwarded``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.responses import Response

from services.collector import schemas as collector
from services.ledger import schemas as ledger
from services.pricer import schemas as pricer
from shared.edge import (
    BAD_GATEWAY,
    GATEWAY_TIMEOUT,
    KEY_HEADER,
    REPLAYED_HEADER,
    Call,
    Operation,
    Params,
    idempotency_key,
    problem,
)

__all__ = ["ADMIN_ROUTES", "AdminRoute", "Forwarder", "UpstreamError", "admin_operations", "render"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdminRoute:
    path: str  # the api's path (same parameter names as the owner's)
    service: str  # "ledger" | "pricer" | "collector"
    contract: Operation  # the owner's route

    @property
    def method(self) -> str:
        return self.contract.method

    @property
    def upstream(self) -> str:
        return self.contract.path


ADMIN_ROUTES: tuple[AdminRoute, ...] = (
    AdminRoute("/admin/customers", "ledger", ledger.LIST_CUSTOMERS),
    AdminRoute("/admin/customers", "ledger", ledger.CREATE_CUSTOMER),
    AdminRoute("/admin/customers/{customer_id}", "ledger", ledger.GET_CUSTOMER),
    AdminRoute("/admin/tiers", "ledger", ledger.LIST_TIERS),
    AdminRoute("/admin/tiers", "ledger", ledger.CREATE_TIER),
    AdminRoute("/admin/org-assignments", "ledger", ledger.LIST_ASSIGNMENTS),
    AdminRoute("/admin/org-assignments", "ledger", ledger.ASSIGN_ORG),
    AdminRoute("/admin/agreements", "ledger", ledger.LIST_AGREEMENTS),
    AdminRoute("/admin/agreements", "ledger", ledger.CREATE_AGREEMENT),
    AdminRoute("/admin/months/{month}/close", "ledger", ledger.CLOSE_MONTH),
    AdminRoute("/admin/statements/amend", "ledger", ledger.AMEND),
    AdminRoute("/admin/transactions/{transaction_id}/reverse", "ledger", ledger.REVERSE),
    AdminRoute("/admin/unassigned", "ledger", ledger.HELD),
    AdminRoute("/admin/prices", "pricer", pricer.LIST_PRICES),
    AdminRoute("/admin/prices", "pricer", pricer.ADD_PRICE),
    AdminRoute("/admin/prices/{price_id}/end", "pricer", pricer.END_PRICE),
    AdminRoute("/admin/unpriced", "pricer", pricer.UNPRICED),
    AdminRoute("/admin/rerate", "pricer", pricer.START_RERATE),
    AdminRoute("/admin/rerates", "pricer", pricer.LIST_RERATES),
    AdminRoute("/admin/rerates/{rerate_id}", "pricer", pricer.GET_RERATE),
    AdminRoute("/admin/readings", "collector", collector.LIST_READINGS),
    AdminRoute("/admin/readings", "collector", collector.TAKE_READING),
)


def render(params: Params | None) -> dict[str, str]:
    """Parameters given (not defaulted) as the text the owner parses: times in UTC with ``Z``, months
    ``YYYY-MM``, UUIDs in their canonical form."""
    if params is None:
        return {}
    values = params.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)
    return {k: str(v) for k, v in values.items()}


def _content_type(value: str | None) -> str:
    if value and value.isascii() and value.isprintable():
        return value
    return "application/octet-stream"  # the owner refuses it (415); never a header that cannot be encoded


class UpstreamError(Exception):
    """An owning service could not be asked, or did not answer 200 with JSON: ``status`` is the api's
    answer (502, or 504 on a timeout)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


class Forwarder:
    def __init__(self, client: httpx.AsyncClient, bases: Mapping[str, str]) -> None:
        self._client = client
        self._bases = dict(bases)

    async def get_json(self, service: str, path: str, params: Mapping[str, str], *, token: str) -> Any:
        """GET an internal route of ``service`` (values already validated by the caller) with ``token`` and
        return its JSON body; UpstreamError unless it answers 200 with JSON."""
        try:
            url = self._bases[service] + path
            headers = {"accept": "application/json", "authorization": f"Bearer {token}"}
            resp = await self._client.get(url, params=dict(params), headers=headers)
        except httpx.TimeoutException:
            raise UpstreamError(504, "Gateway Timeout", f"the {service} did not answer in time") from None
        except httpx.HTTPError as exc:
            log.warning("internal query failed", extra={"upstream": service, "path": path, "error": repr(exc)})
            raise UpstreamError(502, "Bad Gateway", f"the {service} service cannot be reached") from None
        if resp.status_code != 200:
            detail = f"the {service} answered {resp.status_code} to {path}: {resp.text[:300]}"
            raise UpstreamError(502, "Bad Gateway", detail)
        try:
            return resp.json()
        except ValueError:
            detail = f"the {service} answered {path} with something that is not JSON"
            raise UpstreamError(502, "Bad Gateway", detail) from None

    async def exists(self, service: str, path: str, *, token: str) -> bool:
        """Whether ``service`` has the thing at ``path``: True on 200, False on 404; UpstreamError otherwise."""
        try:
            resp = await self._client.get(
                self._bases[service] + path, headers={"accept": "application/json", "authorization": f"Bearer {token}"}
            )
        except httpx.TimeoutException:
            raise UpstreamError(504, "Gateway Timeout", f"the {service} did not answer in time") from None
        except httpx.HTTPError as exc:
            log.warning("internal query failed", extra={"upstream": service, "path": path, "error": repr(exc)})
            raise UpstreamError(502, "Bad Gateway", f"the {service} service cannot be reached") from None
        if resp.status_code in (200, 404):
            return resp.status_code == 200
        raise UpstreamError(502, "Bad Gateway", f"the {service} answered {resp.status_code} to {path}")

    async def send(
        self,
        service: str,
        method: str,
        path: str,
        *,
        token: str,
        query: Mapping[str, str] | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        key: str | None = None,
    ) -> Response:
        """``method path`` on ``service`` with the caller's ``token``: the owner's status and body as it gave
        them, or a 502/504 problem."""
        headers = {"accept": "application/json", "authorization": f"Bearer {token}"}
        if body:
            headers["content-type"] = _content_type(content_type)
        if key is not None:  # checked by the caller (idempotency_key)
            headers[KEY_HEADER] = key
        url = self._bases[service] + path
        try:
            upstream = await self._client.request(method, url, params=dict(query or {}), content=body, headers=headers)
        except httpx.TimeoutException:
            log.warning("admin command timed out", extra={"upstream": service, "path": path})
            detail = (
                f"the {service} did not answer in time; the command may or may not have been applied (send it "
                "again with the same Idempotency-Key to be answered without running it twice)"
            )
            return problem(GATEWAY_TIMEOUT, detail)
        except httpx.HTTPError as exc:
            log.warning("admin command could not be forwarded", extra={"upstream": service, "path": path,
                                                                        "error": repr(exc)})
            return problem(BAD_GATEWAY, f"the {service} service cannot be reached")
        media = upstream.headers.get("content-type")
        # Only the body, its type and whether it is a replay travel back: the owner's other headers (e.g. a
        # Location naming an internal path) are not the api's to give out.
        resp = Response(upstream.content, status_code=upstream.status_code, media_type=media)
        if upstream.headers.get(REPLAYED_HEADER) == "true":
            resp.headers[REPLAYED_HEADER] = "true"
        return resp


def _forwarding(route: AdminRoute, forwarder: Callable[[Call], Forwarder]) -> Operation:
    contract = route.contract

    async def forward(call: Call) -> Response:
        upstream = contract.path.format(**render(call.path))
        body, ctype = b"", None
        if contract.method in ("POST", "PUT", "PATCH"):
            body, ctype = await call.request.body(), call.request.headers.get("content-type")
        return await forwarder(call).send(
            route.service, contract.method, upstream, token=call.caller.token, query=render(call.query),
            body=body, content_type=ctype, key=idempotency_key(call.request.headers),
        )

    return contract.but(
        path=route.path,
        summary=f"{contract.summary} (forwarded to the {route.service})",
        check_body=False,
        refusals={
            **contract.refusals,
            502: "The owning service cannot be reached.",
            504: "The owning service did not answer in time (a command may or may not have been applied).",
        },
        tags=("admin",),
        forwarded=True,
        description=(contract.description + "\n\n" if contract.description else "")
        + (f"A command of the {route.service}, which verifies the token again, records it and answers a retry with "
           "the same Idempotency-Key from its first answer." if contract.command
           else f"Answered by the {route.service}."),
        handler=forward,
    )


def admin_operations(forwarder: Callable[[Call], Forwarder]) -> list[Operation]:
    """The api's /admin operations that forward to an owner, each with its owner's contract."""
    return [_forwarding(r, forwarder) for r in ADMIN_ROUTES]
