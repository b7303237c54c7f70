"""Starlette routes of the simulated Cloud Controller v3 API (and the UAA token endpoint).

Every ``/v3`` endpoint needs ``Authorization: bearer <token>`` from ``POST /oauth/token``.
Lists are paginated exactly like CF v3 (``page``, ``per_page`` 1..5000, default 50, absolute
``first``/``last``/``next``/``previous`` hrefs). The observed hour is the request's ``X-Sim-Time``
header, else the server's simulated clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.cf_resources import (
    Json,
    present_app,
    present_org,
    present_process,
    present_service_instance,
    present_service_offering,
    present_service_plan,
    present_space,
)
from simulator.gcpause import gc_paused
from simulator.responses import cf_error, json_response
from simulator.state import SimState
from simulator.uaa import uaa_routes

__all__ = ["COLLECTIONS", "cf_routes"]

DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 5000
API_VERSION = "3.180.0"


@dataclass(frozen=True)
class Collection:
    """One listable CF v3 resource type."""

    name: str  # URL segment: /v3/<name>
    label: str  # for "<label> not found"
    records: Callable[[SimState, datetime], Sequence[Any]]
    present: Callable[[str, Any], Json]
    filters: Mapping[str, str]  # query parameter -> record attribute (comma-separated values)
    required: tuple[str, ...]  # fields the malformed-resource fault may drop
    includes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # include -> included keys
    orderable: tuple[str, ...] = ("created_at", "updated_at")

    def allowed_params(self) -> set[str]:
        allowed = {"page", "per_page", "order_by", *self.filters}
        if self.includes:
            allowed.add("include")
        return allowed


COLLECTIONS: tuple[Collection, ...] = (
    Collection(
        "organizations",
        "Organization",
        lambda s, h: s.foundation.orgs(),
        present_org,
        {"guids": "guid", "names": "name"},
        ("guid", "name"),
        orderable=("created_at", "updated_at", "name"),
    ),
    Collection(
        "spaces",
        "Space",
        lambda s, h: s.foundation.spaces(),
        present_space,
        {"guids": "guid", "names": "name", "organization_guids": "org_guid"},
        ("guid", "relationships"),
        includes={"organization": ("organizations",)},
        orderable=("created_at", "updated_at", "name"),
    ),
    Collection(
        "apps",
        "App",
        lambda s, h: s.foundation.apps_at(h),
        present_app,
        {"guids": "guid", "names": "name", "space_guids": "space_guid", "organization_guids": "org_guid"},
        ("guid", "state", "relationships"),
        includes={"space": ("spaces",), "space.organization": ("spaces", "organizations")},
        orderable=("created_at", "updated_at", "name", "state"),
    ),
    Collection(
        "processes",
        "Process",
        lambda s, h: s.foundation.processes_at(h),
        present_process,
        {
            "guids": "guid",
            "types": "type",
            "app_guids": "app_guid",
            "space_guids": "space_guid",
            "organization_guids": "org_guid",
        },
        ("guid", "instances", "memory_in_mb", "links"),
    ),
    Collection(
        "service_instances",
        "Service instance",
        lambda s, h: s.foundation.service_instances_at(h),
        present_service_instance,
        {
            "guids": "guid",
            "names": "name",
            "type": "type",
            "space_guids": "space_guid",
            "organization_guids": "org_guid",
            "service_plan_guids": "plan_guid",
        },
        ("guid", "type", "relationships"),
        orderable=("created_at", "updated_at", "name"),
    ),
    Collection(
        "service_plans",
        "Service plan",
        lambda s, h: s.foundation.plans(),
        present_service_plan,
        {"guids": "guid", "names": "name", "service_offering_guids": "offering_guid"},
        ("guid", "relationships"),
        includes={"service_offering": ("service_offerings",)},
        orderable=("created_at", "updated_at", "name"),
    ),
    Collection(
        "service_offerings",
        "Service offering",
        lambda s, h: s.foundation.offerings(),
        present_service_offering,
        {"guids": "guid", "names": "name", "service_broker_guids": "broker_guid"},
        ("guid", "name"),
        orderable=("created_at", "updated_at", "name"),
    ),
)


class _BadQuery(Exception):
    pass


def _bad_query(detail: str) -> Response:
    return cf_error(400, 10005, "CF-BadQueryParameter", f"The query parameter is invalid: {detail}")


def _authenticate(request: Request, state: SimState) -> Response | None:
    header = request.headers.get("authorization")
    if not header:
        return cf_error(401, 10002, "CF-NotAuthenticated", "Authentication error")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not state.tokens.is_valid(token.strip()):
        return cf_error(401, 1000, "CF-InvalidAuthToken", "Invalid Auth Token")
    return None


def _request_hour(request: Request, state: SimState) -> datetime | Response:
    try:
        return state.clock.hour_for(request.headers)
    except ValueError:
        value = request.headers.get("x-sim-time")
        return cf_error(400, 10005, "CF-BadQueryParameter", f"Invalid X-Sim-Time header: {value!r}")


def _int_param(value: str | None, default: int, low: int, high: int, message: str) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise _BadQuery(message) from None
    if not low <= number <= high:
        raise _BadQuery(message)
    return number


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _page_href(request: Request, page: int, per_page: int) -> dict[str, str]:
    others = [(k, v) for k, v in request.query_params.multi_items() if k not in ("page", "per_page")]
    query = urlencode([("page", str(page)), ("per_page", str(per_page)), *others])
    return {"href": f"{_base_url(request)}{request.url.path}?{query}"}


def _pagination(request: Request, total: int, page: int, per_page: int) -> Json:
    total_pages = math.ceil(total / per_page)
    last = max(total_pages, 1)
    return {
        "total_results": total,
        "total_pages": total_pages,
        "first": _page_href(request, 1, per_page),
        "last": _page_href(request, last, per_page),
        "next": _page_href(request, page + 1, per_page) if page < total_pages else None,
        "previous": _page_href(request, page - 1, per_page) if page > 1 else None,
    }


def _order_key(attr: str) -> Callable[[Any], Any]:
    def key(record: Any) -> Any:
        value = getattr(record, attr, None)
        return (record.created_at if value is None else value, record.guid)

    return key


class _Lookups:
    """guid -> static record maps for the ``included`` block."""

    def __init__(self, state: SimState) -> None:
        self.spaces = {s.guid: s for s in state.foundation.spaces()}
        self.orgs = {o.guid: o for o in state.foundation.orgs()}
        self.offerings = {o.guid: o for o in state.foundation.offerings()}


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _included(keys: set[str], records: Sequence[Any], base: str, lookups: _Lookups) -> Json:
    out: Json = {}
    if "spaces" in keys:
        out["spaces"] = [present_space(base, lookups.spaces[g]) for g in _unique([r.space_guid for r in records])]
    if "organizations" in keys:
        out["organizations"] = [present_org(base, lookups.orgs[g]) for g in _unique([r.org_guid for r in records])]
    if "service_offerings" in keys:
        guids = _unique([r.offering_guid for r in records])
        out["service_offerings"] = [present_service_offering(base, lookups.offerings[g]) for g in guids]
    return out


def _list_endpoint(state: SimState, coll: Collection, lookups: _Lookups) -> Callable[[Request], Any]:
    allowed = coll.allowed_params()

    async def endpoint(request: Request) -> Response:
        denied = _authenticate(request, state)
        if denied is not None:
            return denied
        hour = _request_hour(request, state)
        if isinstance(hour, Response):
            return hour
        params = request.query_params
        unknown = [k for k in dict.fromkeys(params.keys()) if k not in allowed]
        if unknown:
            names = ", ".join(f"'{k}'" for k in unknown)
            valid = ", ".join(f"'{k}'" for k in sorted(allowed))
            return _bad_query(f"Unknown query parameter(s): {names}. Valid parameters are: {valid}")
        try:
            page = _int_param(params.get("page"), 1, 1, 2**31 - 1, "Page must be greater than 0")
            per_page = _int_param(
                params.get("per_page"), DEFAULT_PER_PAGE, 1, MAX_PER_PAGE, "Per page must be between 1 and 5000"
            )
        except _BadQuery as exc:
            return _bad_query(str(exc))
        include_keys: set[str] = set()
        if "include" in params:
            for item in params["include"].split(","):
                if item not in coll.includes:
                    valid = ", ".join(f"'{k}'" for k in coll.includes)
                    return _bad_query(f"Invalid included resource: '{item}'. Valid included resources are: {valid}")
                include_keys.update(coll.includes[item])
        order_by = params.get("order_by")
        if order_by is not None and order_by.lstrip("-+") not in coll.orderable:
            valid = ", ".join(f"'{k}'" for k in coll.orderable)
            return _bad_query(f"Order by can only be: {valid}")

        records: Sequence[Any] = coll.records(state, hour)
        for param, attr in coll.filters.items():
            if param in params:
                wanted = set(params[param].split(","))
                records = [r for r in records if getattr(r, attr) in wanted]
        if order_by is not None:
            records = sorted(records, key=_order_key(order_by.lstrip("-+")), reverse=order_by.startswith("-"))

        base = _base_url(request)
        chunk = records[(page - 1) * per_page : page * per_page]
        with gc_paused():  # thousands of small acyclic dicts: GC passes would only cost time
            resources = [coll.present(base, r) for r in chunk]
        if state.faults.config.malformed_rate > 0.0:
            for resource in resources:
                if state.faults.malformed():
                    resource.pop(state.faults.rng.choice(coll.required), None)
        body: Json = {"pagination": _pagination(request, len(records), page, per_page), "resources": resources}
        if include_keys:
            body["included"] = _included(include_keys, chunk, base, lookups)
        return json_response(body)

    return endpoint


def _show_endpoint(state: SimState, coll: Collection) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        denied = _authenticate(request, state)
        if denied is not None:
            return denied
        hour = _request_hour(request, state)
        if isinstance(hour, Response):
            return hour
        guid = request.path_params["guid"]
        for record in coll.records(state, hour):
            if record.guid == guid:
                return json_response(coll.present(_base_url(request), record))
        return cf_error(404, 10010, "CF-ResourceNotFound", f"{coll.label} not found")

    return endpoint


def cf_routes(state: SimState) -> list[Route]:
    """The CF v3 list/show routes, the API roots and the UAA token endpoint."""
    lookups = _Lookups(state)

    async def root(request: Request) -> Response:
        base = _base_url(request)
        return json_response(
            {
                "links": {
                    "self": {"href": base},
                    "cloud_controller_v2": None,
                    "cloud_controller_v3": {"href": f"{base}/v3", "meta": {"version": API_VERSION}},
                    "network_policy_v0": None,
                    "network_policy_v1": None,
                    "login": {"href": base},
                    "uaa": {"href": base},
                    "credhub": None,
                    "routing": None,
                    "logging": None,
                    "log_cache": None,
                    "log_stream": None,
                    "app_ssh": None,
                }
            }
        )

    async def v3_root(request: Request) -> Response:
        base = _base_url(request)
        links = {"self": {"href": f"{base}/v3"}}
        links.update({c.name: {"href": f"{base}/v3/{c.name}"} for c in COLLECTIONS})
        return json_response({"links": links})

    routes = [Route("/", root, methods=["GET"]), Route("/v3", v3_root, methods=["GET"])]
    for coll in COLLECTIONS:
        routes.append(Route(f"/v3/{coll.name}", _list_endpoint(state, coll, lookups), methods=["GET"]))
        routes.append(Route(f"/v3/{coll.name}/{{guid}}", _show_endpoint(state, coll), methods=["GET"]))
    return routes + uaa_routes(state)
