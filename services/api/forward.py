"""Admin commands forwarded to the service that owns them (one httpx.AsyncClient per app, with timeouts):
the answer is the owner's status and body, problem+json included; 502 when the owner cannot be reached,
504 when it does not answer in time. A command's Idempotency-Key goes along (shared/commands.py), with the
caller's subject as the actor, so a retry after a 504 is answered by the owner without running it twice.

Only validated values reach the upstream URL: path parameters are re-rendered from their parsed form
(a UUID, a ``YYYY-MM``), query parameters are limited to a known set, each checked by its type.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from services.api.params import invalid, only_known, parse_limit, parse_month, parse_time, parse_uuid
from shared.commands import KEY_HEADER, REPLAYED_HEADER, idempotency_key
from shared.http import problem

__all__ = ["ADMIN_ROUTES", "FORWARDED_QUERY", "AdminRoute", "Forwarder", "UpstreamError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdminRoute:
    path: str  # our path (Starlette template)
    methods: tuple[str, ...]
    service: str  # "ledger" | "pricer" | "collector"
    upstream: str  # the owner's path, same placeholders
    summary: str


ADMIN_ROUTES: tuple[AdminRoute, ...] = (
    AdminRoute("/admin/customers", ("GET", "POST"), "ledger", "/internal/customers", "Customers (list, create)"),
    AdminRoute("/admin/customers/{customer_id}", ("GET",), "ledger", "/internal/customers/{customer_id}", "One customer"),
    AdminRoute("/admin/tiers", ("GET", "POST"), "ledger", "/internal/tiers", "Tiers (list, create)"),
    AdminRoute("/admin/org-assignments", ("GET", "POST"), "ledger", "/internal/org-assignments", "Org assignments to customers (list, assign)"),
    AdminRoute("/admin/agreements", ("GET", "POST"), "ledger", "/internal/agreements", "Agreements (list, create)"),
    AdminRoute("/admin/months/{month}/close", ("POST",), "ledger", "/internal/months/{month}/close", "Close a month (America/New_York)"),
    AdminRoute(
        "/admin/transactions/{transaction_id}/reverse",
        ("POST",),
        "ledger",
        "/internal/transactions/{transaction_id}/reverse",
        "Reverse a ledger transaction",
    ),
    AdminRoute("/admin/unassigned", ("GET",), "ledger", "/internal/held", "Charges held because their org has no customer"),
    AdminRoute("/admin/prices", ("GET", "POST"), "pricer", "/internal/prices", "Prices (list, add)"),
    AdminRoute("/admin/prices/{price_id}/end", ("POST",), "pricer", "/internal/prices/{price_id}/end", "End a price"),
    AdminRoute("/admin/unpriced", ("GET",), "pricer", "/internal/charges/unpriced", "Charges that have no price"),
    AdminRoute("/admin/readings", ("GET", "POST"), "collector", "/internal/readings", "Readings (list; take a manual one)"),
)

_CURSOR = re.compile(r"^[A-Za-z0-9_.~=-]{1,2048}$")
_CF_GUID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WORD = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_KIND = re.compile(r"^[A-Za-z0-9_.:-]{0,128}$")  # the empty kind is a kind (the pricer filters on it)


def _pattern(name: str, rx: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not rx.match(value):
            raise invalid(name, what)
        return value

    return check


def _time(name: str, value: str) -> str:
    return parse_time(name, value).isoformat().replace("+00:00", "Z")


# Query parameters the admin list routes pass on, each validated here first.
FORWARDED_QUERY: Mapping[str, Callable[[str], str]] = {
    "limit": lambda v: str(parse_limit(v)),
    "cursor": _pattern("cursor", _CURSOR, "must be a cursor returned by a previous page"),
    "customer_id": lambda v: str(parse_uuid("customer_id", v)),
    "org_id": _pattern("org_id", _CF_GUID, "must be a Cloud Foundry guid"),
    "meter": _pattern("meter", _WORD, "letters, digits and _.:- only"),
    "resource_kind": _pattern("resource_kind", _KIND, "letters, digits and _.:- only"),
    "at": lambda v: _time("at", v),
    "from": lambda v: _time("from", v),
    "to": lambda v: _time("to", v),
}

_PATH_PARAMS: Mapping[str, Callable[[str], str]] = {
    "customer_id": lambda v: str(parse_uuid("customer_id", v)),
    "transaction_id": lambda v: str(parse_uuid("transaction_id", v)),
    "price_id": lambda v: str(parse_uuid("price_id", v)),
    "month": lambda v: parse_month("month", v).strftime("%Y-%m"),
}


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

    async def get_json(self, service: str, path: str, params: Mapping[str, str]) -> Any:
        """GET an internal route of ``service`` (values already validated by the caller) and return its
        JSON body; UpstreamError unless it answers 200 with JSON."""
        try:
            url = self._bases[service] + path
            resp = await self._client.get(url, params=dict(params), headers={"accept": "application/json"})
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

    async def forward(self, request: Request, route: AdminRoute, subject: str) -> Response:
        path = route.upstream.format(**{k: _PATH_PARAMS[k](v) for k, v in request.path_params.items()})
        query: dict[str, str] = {}
        if request.method in ("GET", "HEAD"):
            query = {k: FORWARDED_QUERY[k](v) for k, v in only_known(request.query_params, tuple(FORWARDED_QUERY)).items()}
        else:
            only_known(request.query_params, ())
        headers = {"accept": "application/json", "x-billing-actor": subject}
        body = b""
        if request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()
            if body:
                headers["content-type"] = request.headers.get("content-type", "application/octet-stream")
            key = idempotency_key(request.headers)  # checked here as the owner checks it (400 otherwise)
            if key is not None:
                headers[KEY_HEADER] = key
        url = self._bases[route.service] + path
        try:
            upstream = await self._client.request(request.method, url, params=query, content=body, headers=headers)
        except httpx.TimeoutException:
            log.warning("admin command timed out", extra={"upstream": route.service, "path": path})
            return problem(
                504, "Gateway Timeout", f"the {route.service} did not answer in time; the command may or may not have "
                "been applied (sent with an Idempotency-Key, send it again with the same key to get its answer)",
            )
        except httpx.HTTPError as exc:
            log.warning("admin command could not be forwarded", extra={"upstream": route.service, "path": path, "error": repr(exc)})
            return problem(502, "Bad Gateway", f"the {route.service} service cannot be reached")
        media = upstream.headers.get("content-type")
        # Only the body, its type and whether it is a replay travel back: the owner's other headers (e.g. a
        # Location naming an internal path) are not the api's to give out.
        resp = Response(upstream.content, status_code=upstream.status_code, media_type=media)
        if upstream.headers.get(REPLAYED_HEADER) == "true":
            resp.headers[REPLAYED_HEADER] = "true"
        return resp
