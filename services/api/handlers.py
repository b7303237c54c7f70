"""Routes and subscribers of the api: thin — authenticate, validate, call the repository or the
forwarder, answer JSON. The logic lives in service.py and projector.py."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg
import httpx
import orjson
from prometheus_client import Counter, Histogram
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.api import audit, completeness, dead_letters, projector
from services.api import repository as repo
from services.api.auth import (
    SCOPE_ADMIN,
    SCOPE_READ,
    AuthError,
    ForbiddenError,
    IssuerUnavailableError,
    JwksCache,
    Principal,
    TokenVerifier,
    auth_error_response,
    bearer_token,
)
from services.api.cache import TtlCache
from services.api.forward import ADMIN_ROUTES, AdminRoute, Forwarder, UpstreamError
from services.api.freshness import Freshness
from services.api.openapi import openapi_bytes
from services.api.params import (
    Cursor,
    invalid,
    only_known,
    parse_enum,
    parse_limit,
    parse_month,
    parse_time,
    parse_uuid,
)
from services.api.schemas import EntitlementIn, Subject
from services.api.service import (
    GRANULARITIES,
    GROUP_BYS,
    TRANSACTION_TYPES,
    UsageRangeError,
    amount_fields,
    balance_from_buckets,
    iso,
    period_of,
    usage_range,
)
from services.api.settings import ApiSettings
from shared.batches import Charges, decode_charges
from shared.clock import utcnow
from shared.contracts import ChargesComputed
from shared.http import ORJSONResponse, ProblemError, problem, read_json
from shared.kafka import Received, model_decoder
from shared.runtime import Runtime
from shared.topics import CHARGES, TRANSACTIONS, dlq

__all__ = ["Api"]

REQUESTS = Counter("billing_api_requests_total", "Requests answered by the api", ["route", "method", "status"])
LATENCY = Histogram(
    "billing_api_request_seconds",
    "Time to answer a request",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

Need = Literal["read", "admin"]
Endpoint = Callable[[Request, Principal], Awaitable[Response]]
_SUBJECT = TypeAdapter(Subject)
NOT_FOUND = ("Not Found", "no such customer")


class Api:
    """The api's service objects (built at start by the lifespan) and its routes."""

    def __init__(self, settings: ApiSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.verifier: TokenVerifier | None = None
        self.forwarder: Forwarder | None = None
        self._clients: list[httpx.AsyncClient] = []
        self.access_cache: TtlCache[tuple[bool, bool]] = TtlCache(settings.query_cache_seconds)
        self.usage_cache: TtlCache[bytes] = TtlCache(settings.query_cache_seconds, max_entries=2_000)
        self.projector: projector.Projector | None = None
        self.declare(runtime)
        self.freshness = Freshness()

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self, runtime: Runtime) -> None:
        s = self.settings
        oidc = httpx.AsyncClient(timeout=s.oidc_timeout_seconds, follow_redirects=False)
        upstream = httpx.AsyncClient(
            timeout=httpx.Timeout(s.upstream_timeout_seconds, connect=3.0),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
            follow_redirects=False,
        )
        self._clients = [oidc, upstream]
        jwks = JwksCache(
            s.oidc_issuer,
            oidc,
            ttl_seconds=s.jwks_cache_seconds,
            refetch_min_interval_seconds=s.jwks_refetch_min_interval_seconds,
        )
        self.verifier = TokenVerifier(
            jwks,
            issuer=s.oidc_issuer,
            audience=s.oidc_audience,
            leeway_seconds=s.clock_skew_seconds,
            cache_size=s.token_cache_size,
            cache_seconds=s.token_cache_seconds,
        )
        self.forwarder = Forwarder(upstream, {"ledger": s.ledger_url, "pricer": s.pricer_url, "collector": s.collector_url})

    async def stop(self, runtime: Runtime) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients = []

    # ------------------------------------------------------------------------------------ consumers

    def declare(self, runtime: Runtime) -> None:
        """The read model's topics (its two consumers in group ``api``)."""

        def decode(raw: bytes) -> tuple[Any, list[Any]]:
            decoded = decode_charges(raw)
            return decoded.message, decoded.rejected

        runtime.consume(
            CHARGES, ChargesComputed, decode, self.on_charges,
            description="Charges in batches: the usage the api answers from (per group and resource, exactly).",
        )
        runtime.consume(
            TRANSACTIONS, projector.LedgerMessage,
            model_decoder(projector.LedgerMessage.model_validate_json, projector.LedgerMessage), self.on_ledger,
            description="Ledger transactions and statements: balances, statements, and which customer each org "
            "belonged to in each hour (its usage lines).",
        )
        for topic in (CHARGES, TRANSACTIONS):
            runtime.publishes(dlq(topic), None, f"What the api's read model could not process from {topic}.")

    def _projector(self) -> projector.Projector:
        if self.projector is None:
            self.projector = projector.Projector(self.runtime.pool)
        return self.projector

    async def on_charges(self, batch: list[Received[Charges]]) -> None:
        await self._projector().apply_charges([r.message for r in batch])
        self.freshness.applied("charges")

    async def on_ledger(self, batch: list[Received[projector.LedgerMessage]]) -> None:
        await self._projector().apply_ledger([r.message.root for r in batch])
        self.freshness.applied("transactions")

    # ------------------------------------------------------------------------------------ routing

    def routes(self) -> list[BaseRoute]:
        out: list[BaseRoute] = [
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/v1/customers", self._guard("read", "customers", self.customers), methods=["GET"]),
            Route("/v1/customers/{customer_id}/balance", self._guard("read", "balance", self.balance), methods=["GET"]),
            Route("/v1/customers/{customer_id}/usage", self._guard("read", "usage", self.usage), methods=["GET"]),
            Route(
                "/v1/customers/{customer_id}/transactions",
                self._guard("read", "transactions", self.transactions),
                methods=["GET"],
            ),
            Route(
                "/v1/customers/{customer_id}/statements/{month}",
                self._guard("read", "statement", self.statement),
                methods=["GET"],
            ),
            Route(
                "/admin/entitlements",
                self._guard("admin", "entitlements", self.entitlements),
                methods=["GET", "POST", "DELETE"],
            ),
            Route(
                "/admin/completeness", self._guard("admin", "completeness", self.completeness_report), methods=["GET"]
            ),
            Route("/admin/audit", self._guard("admin", "audit", functools.partial(audit.admin_audit, self)), methods=["GET"]),
        ]
        for admin in ADMIN_ROUTES:
            out.append(
                Route(admin.path, self._guard("admin", admin.path, functools.partial(self.forward, admin)), methods=list(admin.methods))
            )
        return out

    def _guard(self, need: Need, name: str, fn: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        """Authenticate (401), check the scope (403), run ``fn``; problems become problem+json."""

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            status = 500
            try:
                try:
                    principal = await self._principal(request, need)
                    resp = await fn(request, principal)
                except (AuthError, ForbiddenError, IssuerUnavailableError) as exc:
                    resp = auth_error_response(exc)
                except ProblemError as exc:
                    resp = problem(exc.status, exc.title, exc.detail, **exc.extra)
                status = resp.status_code
                if need == "read" and status < 400:
                    resp.headers.update(self.freshness.header())  # how old the read model's answer may be
                return resp
            finally:
                REQUESTS.labels(name, request.method, str(status)).inc()
                LATENCY.labels(name).observe(time.perf_counter() - started)

        endpoint.__name__ = f"api_{name}"
        return endpoint

    async def _principal(self, request: Request, need: Need) -> Principal:
        assert self.verifier is not None, "the api has not started"
        principal = await self.verifier.verify(bearer_token(request))
        if need == "admin" and not principal.is_admin:
            raise ForbiddenError(SCOPE_ADMIN)
        if need == "read" and not principal.can_read:
            raise ForbiddenError(SCOPE_READ)
        return principal

    async def _ensure_visible(self, conn: asyncpg.Connection | None, principal: Principal, customer_id: UUID) -> None:
        """404 — the same answer — whether the customer does not exist or the caller may not see it.
        With ``conn`` None, a connection is taken only if the decision is not cached."""
        key = (customer_id, principal.subject)
        decision = self.access_cache.get(key)
        if decision is None:
            if conn is None:
                async with self.runtime.pool.acquire() as own:
                    decision = await repo.access(own, customer_id, principal.subject)
            else:
                decision = await repo.access(conn, customer_id, principal.subject)
            self.access_cache.put(key, decision)
        known, granted = decision
        if not known or not (principal.is_admin or granted or customer_id in principal.customers):
            raise ProblemError(404, *NOT_FOUND)

    # ------------------------------------------------------------------------------------ public

    async def openapi(self, request: Request) -> Response:
        only_known(request.query_params, ())
        return Response(openapi_bytes(), media_type="application/json")

    async def customers(self, request: Request, principal: Principal) -> Response:
        q = only_known(request.query_params, ("limit", "cursor"))
        limit = parse_limit(q.get("limit"))
        scope = Cursor.scope_of("customers", principal.subject)
        pos = Cursor.decode(q.get("cursor"), scope, (str,))
        after = _cursor_uuid(pos[0]) if pos else None
        async with self.runtime.pool.acquire() as conn:
            rows = await repo.visible_customers(
                conn,
                everyone=principal.is_admin,
                subject=principal.subject,
                claimed=sorted(principal.customers),
                after=after,
                limit=limit + 1,
            )
        page, more = rows[:limit], len(rows) > limit
        return ORJSONResponse(
            {
                "items": [{"customer_id": str(r["customer_id"]), "first_seen_at": iso(r["first_seen_at"])} for r in page],
                "next_cursor": Cursor.encode(scope, [str(page[-1]["customer_id"])]) if more else None,
            }
        )

    async def balance(self, request: Request, principal: Principal) -> Response:
        customer_id = parse_uuid("customer_id", request.path_params["customer_id"])
        q = only_known(request.query_params, ("as_of",))
        as_of = parse_time("as_of", q["as_of"]) if "as_of" in q else utcnow()
        async with self.runtime.pool.acquire() as conn:
            await self._ensure_visible(conn, principal, customer_id)
            sums = await repo.bucket_sums(conn, customer_id, as_of)
        return ORJSONResponse({"customer_id": str(customer_id), "as_of": iso(as_of), **balance_from_buckets(sums).as_json()})

    async def usage(self, request: Request, principal: Principal) -> Response:
        customer_id = parse_uuid("customer_id", request.path_params["customer_id"])
        # Only answers that passed validation are cached, so a hit on the raw query string may skip it.
        cache_key = (customer_id, request.scope["query_string"])
        if self.usage_cache.seconds > 0 and (cached := self.usage_cache.get(cache_key)) is not None:
            await self._ensure_visible(None, principal, customer_id)
            return Response(cached, media_type="application/json")
        q = only_known(request.query_params, ("from", "to", "granularity", "group_by", "limit", "cursor"))
        for required in ("from", "to"):
            if required not in q:
                raise invalid(required, "is required")
        start, end = parse_time("from", q["from"]), parse_time("to", q["to"])
        granularity = parse_enum("granularity", q.get("granularity", "day"), GRANULARITIES)
        group_by = parse_enum("group_by", q.get("group_by", "org"), GROUP_BYS)
        limit = parse_limit(q.get("limit"))
        try:
            rng = usage_range(start, end, granularity)
        except UsageRangeError as exc:
            raise ProblemError(422, "Invalid parameter", str(exc)) from None
        scope = Cursor.scope_of("usage", customer_id, iso(start), iso(end), granularity, group_by)
        pos = Cursor.decode(q.get("cursor"), scope, (str, str, str))
        after = (_cursor_period(granularity, pos[0]), pos[1], pos[2]) if pos else None
        await self._ensure_visible(None, principal, customer_id)
        async with self.runtime.pool.acquire() as conn:
            rows = await repo.usage_page(
                conn,
                customer_id,
                granularity=granularity,
                dim=group_by,
                first=rng.first,
                stop=rng.stop,
                after=after,
                limit=limit + 1,
            )
        page, more = rows[:limit], len(rows) > limit
        items = [
            {
                **period_of(granularity, r.period),
                "group": _group(group_by, r.key, r.key2, r.attrs),
                "quantities": [{"unit": u, "value": v} for u, v in sorted(r.values.items())],
                **amount_fields(r.amount),
            }
            for r in page
        ]
        next_cursor = None
        if more:
            last = page[-1]
            next_cursor = Cursor.encode(scope, [_period_text(last.period), last.key, last.key2])
        body = orjson.dumps(
            {
                "customer_id": str(customer_id),
                "from": iso(start),
                "to": iso(end),
                "granularity": granularity,
                "group_by": group_by,
                "time_zone": "America/New_York",
                "items": items,
                "next_cursor": next_cursor,
            }
        )
        self.usage_cache.put(cache_key, body)
        return Response(body, media_type="application/json")

    async def transactions(self, request: Request, principal: Principal) -> Response:
        customer_id = parse_uuid("customer_id", request.path_params["customer_id"])
        q = only_known(request.query_params, ("limit", "cursor", "type", "from", "to"))
        limit = parse_limit(q.get("limit"))
        types = [parse_enum("type", q["type"], TRANSACTION_TYPES)] if "type" in q else None
        start = parse_time("from", q["from"]) if "from" in q else None
        end = parse_time("to", q["to"]) if "to" in q else None
        scope = Cursor.scope_of("transactions", customer_id, q.get("type"), start and iso(start), end and iso(end))
        pos = Cursor.decode(q.get("cursor"), scope, (str, str))
        before = (_cursor_time(pos[0]), _cursor_uuid(pos[1])) if pos else None
        async with self.runtime.pool.acquire() as conn:
            await self._ensure_visible(conn, principal, customer_id)
            rows = await repo.transactions_page(conn, customer_id, before=before, limit=limit + 1, types=types, start=start, end=end)
        page, more = rows[:limit], len(rows) > limit
        items = [
            {
                "id": str(r["transaction_id"]),
                "type": r["type"],
                "occurred_at": iso(r["occurred_at"]),
                "posted_at": iso(r["posted_at"]),
                "reading_hour": iso(r["reading_hour"]) if r["reading_hour"] else None,
                "description": r["description"],
                "amount": r["amount"],
                "effect": {"bucket": r["bucket"], "microcredits": r["signed_amount"]},
                "reverses": str(r["reverses"]) if r["reverses"] else None,
                "entries": repo.json_value(r["entries"]),
                "usage": repo.json_value(r["usage"]),
            }
            for r in page
        ]
        next_cursor = None
        if more:
            last = page[-1]
            next_cursor = Cursor.encode(scope, [iso(last["occurred_at"]), str(last["transaction_id"])])
        return ORJSONResponse({"customer_id": str(customer_id), "items": items, "next_cursor": next_cursor})

    async def statement(self, request: Request, principal: Principal) -> Response:
        customer_id = parse_uuid("customer_id", request.path_params["customer_id"])
        month = parse_month("month", request.path_params["month"])
        only_known(request.query_params, ())
        async with self.runtime.pool.acquire() as conn:
            await self._ensure_visible(conn, principal, customer_id)
            row = await repo.statement(conn, customer_id, month)
        if row is None:
            raise ProblemError(404, "Not Found", f"no statement for {month:%Y-%m} yet (months are closed by the ledger)")
        return ORJSONResponse(
            {
                "customer_id": str(customer_id),
                "month": f"{month:%Y-%m}",
                "statement_id": str(row["statement_id"]),
                "opening_balance": row["opening_balance"],
                "funded": row["funded"],
                "used": row["used"],
                "expired": row["expired"],
                "closing_balance": row["closing_balance"],
                "used_by_kind": repo.json_value(row["used_by_kind"]),
                "issued_at": iso(row["issued_at"]),
            }
        )

    # ------------------------------------------------------------------------------------ admin

    async def entitlements(self, request: Request, principal: Principal) -> Response:
        if request.method == "POST":
            only_known(request.query_params, ())
            body: EntitlementIn = await read_json(request, EntitlementIn)
            async with self.runtime.pool.acquire() as conn:
                row, created = await repo.grant_entitlement(conn, body.subject, body.customer_id, principal.subject)
            self.access_cache.clear()  # at once on this instance; others within query_cache_seconds
            return ORJSONResponse(_entitlement(row), status_code=201 if created else 200)
        if request.method == "DELETE":
            q = only_known(request.query_params, ("subject", "customer_id"))
            for required in ("subject", "customer_id"):
                if required not in q:
                    raise invalid(required, "is required")
            subject, customer_id = _subject(q["subject"]), parse_uuid("customer_id", q["customer_id"])
            async with self.runtime.pool.acquire() as conn:
                removed = await repo.revoke_entitlement(conn, subject, customer_id)
            self.access_cache.clear()
            if not removed:
                raise ProblemError(404, "Not Found", "no such entitlement")
            return Response(status_code=204)
        q = only_known(request.query_params, ("subject", "customer_id", "limit", "cursor"))
        subject_f = _subject(q["subject"]) if "subject" in q else None
        customer_f = parse_uuid("customer_id", q["customer_id"]) if "customer_id" in q else None
        limit = parse_limit(q.get("limit"))
        scope = Cursor.scope_of("entitlements", subject_f, customer_f)
        pos = Cursor.decode(q.get("cursor"), scope, (str, str))
        after = (pos[0], _cursor_uuid(pos[1])) if pos else None
        async with self.runtime.pool.acquire() as conn:
            rows = await repo.entitlements_page(conn, subject=subject_f, customer_id=customer_f, after=after, limit=limit + 1)
        page, more = rows[:limit], len(rows) > limit
        return ORJSONResponse(
            {
                "items": [_entitlement(r) for r in page],
                "next_cursor": Cursor.encode(scope, [page[-1]["subject"], str(page[-1]["customer_id"])]) if more else None,
            }
        )

    async def completeness_report(self, request: Request, principal: Principal) -> Response:
        """Per hour and meter, what each stage has and where it does not add up (services/api/completeness.py)."""
        start, end = completeness.parse_range(request.query_params)
        assert self.forwarder is not None, "the api has not started"
        s = self.settings

        async def dlqs() -> tuple[completeness.DeadLetterCounts, completeness.DeadLetterCounts]:
            return await dead_letters.count_for_report(s.kafka_bootstrap_servers, s.topic, start, end)

        try:
            body = await completeness.build_report(self.forwarder.get_json, dlqs, start, end)
        except UpstreamError as exc:
            raise ProblemError(exc.status, exc.title, exc.detail) from None
        except completeness.UpstreamAnswerError as exc:
            raise ProblemError(502, "Bad Gateway", str(exc)) from None
        return ORJSONResponse(body)

    async def forward(self, route: AdminRoute, request: Request, principal: Principal) -> Response:
        assert self.forwarder is not None, "the api has not started"
        return await self.forwarder.forward(request, route, principal.subject)


# ---------------------------------------------------------------------------------------- helpers


def _group(dim: str, key: str, key2: str, attrs: dict[str, str]) -> dict[str, str]:
    if dim == "meter":
        return {"meter": key}
    if dim == "kind":
        return {"meter": key, "resource_kind": key2}
    if dim == "org":
        return {"org_id": key, "org_name": attrs.get("org_name", "")}
    if dim == "space":
        return {
            "space_id": key,
            "space_name": attrs.get("space_name", ""),
            "org_id": attrs.get("org_id", ""),
            "org_name": attrs.get("org_name", ""),
        }
    return {
        "resource_id": key,
        "resource_name": attrs.get("resource_name", ""),
        "meter": attrs.get("meter", ""),
        "resource_kind": attrs.get("resource_kind", ""),
        "space_id": attrs.get("space_id", ""),
        "space_name": attrs.get("space_name", ""),
        "org_id": attrs.get("org_id", ""),
        "org_name": attrs.get("org_name", ""),
    }


def _entitlement(r: Any) -> dict[str, str]:
    return {
        "subject": r["subject"],
        "customer_id": str(r["customer_id"]),
        "granted_by": r["granted_by"],
        "granted_at": iso(r["granted_at"]),
    }


def _subject(text: str) -> str:
    try:
        return _SUBJECT.validate_python(text)
    except ValidationError:
        raise invalid("subject", "must be 1 to 256 of A-Z a-z 0-9 . _ @ : + | / = ~ -") from None


def _bad_cursor() -> ProblemError:
    return ProblemError(400, "Invalid cursor", "cursor: not a cursor of this query; start again without it", parameter="cursor")


def _cursor_uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise _bad_cursor() from None


def _cursor_time(text: str) -> datetime:
    try:
        return parse_time("cursor", text)
    except ProblemError:
        raise _bad_cursor() from None


def _cursor_period(granularity: str, text: str) -> date | datetime:
    if granularity == "hour":
        return _cursor_time(text)
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _bad_cursor() from None


def _period_text(period: date | datetime) -> str:
    return iso(period) if isinstance(period, datetime) else period.isoformat()
