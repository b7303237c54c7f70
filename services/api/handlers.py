"""Routes and subscribers of the api: thin — the edge authenticates and parses (shared.edge), a handler
asks the repository or the forwarder and answers. The logic lives in service.py and projector.py; the
routes are declared in schemas.py (the api's own) and forward.py (the admin commands of the owners).

Over 400 lines: the ``Api`` class still holds the read model's two consumers and the handlers of its nine
own routes, which ask the repository directly; moving those queries into use cases of their own (the
ledger's service.py shape) is the next split."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from datetime import date, datetime
from fractions import Fraction
from typing import Any
from uuid import UUID

import httpx
import orjson
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from services.api import audit, completeness, dead_letters, projector, schemas
from services.api import repository as repo
from services.api.cache import SingleFlight, TtlCache
from services.api.charges import MONTHLY
from services.api.forward import Forwarder, UpstreamError, admin_operations
from services.api.freshness import Freshness
from services.api.schemas import (
    Balance,
    BalanceQuery,
    CustomerItem,
    CustomerPage,
    CustomerPath,
    Effect,
    Entitlement,
    EntitlementIn,
    EntitlementKey,
    EntitlementPage,
    EntitlementsQuery,
    PageQuery,
    Statement,
    StatementPath,
    StatementQuery,
    StatementVersion,
    Transaction,
    TransactionPage,
    TransactionsQuery,
    UsageQuery,
)
from services.api.service import (
    UsageRange,
    UsageRangeError,
    amount_fields,
    balance_from_buckets,
    iso,
    period_of,
    usage_range,
)
from services.api.settings import ApiSettings
from services.api.webhooks import Webhooks
from shared.auth import Principal, TokenVerifier
from shared.batches import BatchRejected, Charges, decode_charges, encode_charges, subset
from shared.clock import utcnow
from shared.completeness import RangeQuery
from shared.contracts import AlertRaised, ChargesComputed, ChargesComputedV2
from shared.db import Conn
from shared.edge import (
    BAD_GATEWAY,
    GATEWAY_TIMEOUT,
    INVALID_CURSOR,
    INVALID_PARAMETER,
    NOT_FOUND,
    Call,
    Cursor,
    Endpoint,
    Operation,
    ProblemError,
    answer,
    parse_time,
)
from shared.http import ORJSONResponse
from shared.kafka import Received, model_decoder
from shared.runtime import Runtime
from shared.topics import ALERTS, CHARGES, CHARGES_V2, TRANSACTIONS, dlq

__all__ = ["Api"]

REQUESTS = Counter("billing_api_requests_total", "Requests answered by the api", ["route", "method", "status"])
LATENCY = Histogram(
    "billing_api_request_seconds",
    "Time to answer a request",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class Api:
    """The api's service objects (built at start by the lifespan) and its routes."""

    def __init__(self, settings: ApiSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.forwarder: Forwarder | None = None
        self._clients: list[httpx.AsyncClient] = []
        self.access_cache: TtlCache[tuple[bool, bool]] = TtlCache(settings.query_cache_seconds)
        self.usage_cache: TtlCache[bytes] = TtlCache(settings.query_cache_seconds, max_entries=2_000)
        self.usage_flights: SingleFlight[bytes] = SingleFlight()  # identical usage queries computed once
        self.projector: projector.Projector | None = None
        self.webhooks = Webhooks(
            lambda: runtime.pool,
            self._known_customer,
            poll_seconds=settings.webhook_poll_seconds,
            timeout_seconds=settings.webhook_timeout_seconds,
            https_only=settings.billing_env == "production" and not settings.webhook_allow_http,
        )
        self.declare(runtime)
        self.freshness = Freshness()

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self, runtime: Runtime) -> None:
        s = self.settings
        upstream = httpx.AsyncClient(
            timeout=httpx.Timeout(s.upstream_timeout_seconds, connect=3.0),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
            follow_redirects=False,
        )
        self._clients = [upstream]
        owners = {"ledger": s.ledger_url, "pricer": s.pricer_url, "collector": s.collector_url}
        self.forwarder = Forwarder(upstream, owners)
        await self.webhooks.start()

    async def stop(self, runtime: Runtime) -> None:
        await self.webhooks.stop()
        if self.projector is not None:
            await self.projector.vacuumed()
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
        # The previous version, still read until what it retains is drained: the same handler, whose dedup is
        # per (measurement, revision) in the shard's document, so a charge seen on both topics counts once.
        runtime.consume(
            CHARGES_V2, ChargesComputedV2, decode, self.on_charges,
            description="Charges of flat prices from before usage.charges.v3, drained (the same handler: a charge "
            "seen on both topics counts once).",
        )
        runtime.consume(
            TRANSACTIONS, projector.LedgerMessage,
            model_decoder(projector.LedgerMessage.model_validate_json, projector.LedgerMessage), self.on_ledger,
            description="Ledger transactions and statements: balances, statements, and which customer each org "
            "belonged to in each hour (its usage lines).",
        )
        runtime.consume(
            ALERTS, AlertRaised, model_decoder(AlertRaised.model_validate_json, AlertRaised), self.webhooks.on_alerts,
            description="Alerts (50/75/90/100% of funded credits used): delivered to the customer's webhooks.",
        )
        for topic in (CHARGES, CHARGES_V2, TRANSACTIONS, ALERTS):
            runtime.publishes(dlq(topic), None, f"What the api's read model could not process from {topic}.")

    def _projector(self) -> projector.Projector:
        if self.projector is None:
            self.projector = projector.Projector(self.runtime.pool)
            self.projector.on_statements = self.webhooks.enqueue_statements  # statements to webhooks, same txn
        return self.projector

    async def on_charges(self, batch: list[Received[Charges]]) -> list[tuple[Received[Charges], BatchRejected]]:
        conflicts: list[tuple[int, int, str]] = []  # items of a stored revision with other content: to the DLQ
        await self._projector().apply_charges([r.message for r in batch], conflicts)
        self.freshness.applied("charges")
        return [
            (batch[n], BatchRejected(why, (i,), encode_charges(subset(batch[n].message, [i]))))
            for n, i, why in conflicts
        ]

    async def on_ledger(self, batch: list[Received[projector.LedgerMessage]]) -> None:
        await self._projector().apply_ledger([r.message.root for r in batch])
        self.freshness.applied("transactions")

    # ------------------------------------------------------------------------------------ routing

    def operations(self) -> list[Operation]:
        """The api's routes: its own (declared in schemas.py) and the admin commands it forwards."""
        own = (
            schemas.CUSTOMERS.bind(self.customers),
            schemas.BALANCE.bind(self.balance),
            schemas.USAGE.bind(self.usage),
            schemas.TRANSACTIONS.bind(self.transactions),
            schemas.STATEMENT.bind(self.statement),
            schemas.ENTITLEMENTS.bind(self.list_entitlements),
            schemas.GRANT.bind(self.grant),
            schemas.REVOKE.bind(self.revoke),
            schemas.COMPLETENESS.bind(self.completeness_report),
            schemas.AUDIT.bind(functools.partial(audit.admin_audit, self)),
        )
        return [*own, *self.webhooks.operations(), *admin_operations(lambda call: self._forwarder())]

    def wrap(self, op: Operation, endpoint: Endpoint) -> Endpoint:
        """Metrics of the api's JSON routes, and how fresh the read model is on every read answered."""
        if not op.path.startswith(("/v1/", "/admin/")):
            return endpoint
        name, read = op.path, op.path.startswith("/v1/")

        async def observed(request: Request) -> Response:
            started = time.perf_counter()
            status = 500
            try:
                resp = await endpoint(request)
                status = resp.status_code
                if read and status < 400:
                    resp.headers.update(self.freshness.header())  # how old the read model's answer may be
                return resp
            finally:
                REQUESTS.labels(name, request.method, str(status)).inc()
                LATENCY.labels(name).observe(time.perf_counter() - started)

        return observed

    def _forwarder(self) -> Forwarder:
        assert self.forwarder is not None, "the api has not started"
        return self.forwarder

    @property
    def verifier(self) -> TokenVerifier:
        """The token verifier the routes use (the dashboard verifies its cookie with it too)."""
        return self.runtime.auth.verifier

    async def _ensure_visible(self, conn: Conn | None, principal: Principal, customer_id: UUID) -> None:
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
            raise ProblemError(NOT_FOUND, "no such customer")

    # ------------------------------------------------------------------------------------ public

    async def customers(self, call: Call) -> Response:
        q, principal = call.query_as(PageQuery), call.caller
        scope = Cursor.scope_of("customers", principal.subject)
        pos = Cursor.decode(q.cursor, scope, (UUID,))
        async with self.runtime.pool.acquire() as conn:
            rows = await repo.visible_customers(
                conn,
                everyone=principal.is_admin,
                subject=principal.subject,
                claimed=sorted(principal.customers),
                after=pos[0] if pos else None,
                limit=q.limit + 1,
            )
        page, more = rows[:q.limit], len(rows) > q.limit
        return answer(
            CustomerPage(
                items=[CustomerItem(customer_id=r["customer_id"], first_seen_at=r["first_seen_at"]) for r in page],
                next_cursor=Cursor.encode(scope, [page[-1]["customer_id"]]) if more else None,
            )
        )

    async def balance(self, call: Call) -> Response:
        customer_id = call.path_as(CustomerPath).customer_id
        as_of = call.query_as(BalanceQuery).as_of or utcnow()
        async with self.runtime.pool.acquire() as conn:
            await self._ensure_visible(conn, call.caller, customer_id)
            sums = await repo.bucket_sums(conn, customer_id, as_of)
        body = {"customer_id": customer_id, "as_of": as_of, **balance_from_buckets(sums).as_json()}
        return answer(Balance.model_validate(body))

    async def usage(self, call: Call) -> Response:
        customer_id = call.path_as(CustomerPath).customer_id
        # Only answers that passed validation are cached: the query string is the key.
        cache_key = (customer_id, call.request.scope["query_string"])
        if self.usage_cache.seconds > 0 and (cached := self.usage_cache.get(cache_key)) is not None:
            await self._ensure_visible(None, call.caller, customer_id)
            return Response(cached, media_type="application/json")
        q = call.query_as(UsageQuery)
        try:
            rng = usage_range(q.start, q.end, q.granularity)
        except UsageRangeError as exc:
            raise ProblemError(INVALID_PARAMETER, str(exc)) from None
        scope = Cursor.scope_of("usage", customer_id, iso(q.start), iso(q.end), q.granularity, q.group_by)
        pos = Cursor.decode(q.cursor, scope, (str, str, str, str))
        after = (_cursor_period(q.granularity, pos[0]), pos[1], pos[2], pos[3]) if pos else None
        await self._ensure_visible(None, call.caller, customer_id)
        body = await self.usage_flights.run(
            cache_key, lambda: self._usage_body(customer_id, q, rng, scope, after, cache_key)
        )
        return Response(body, media_type="application/json")

    async def _usage_body(
        self,
        customer_id: UUID,
        q: UsageQuery,
        rng: UsageRange,
        scope: str,
        after: tuple[date | datetime, str, str, str] | None,
        cache_key: tuple[UUID, bytes],
    ) -> bytes:
        """The usage answer's bytes (computed once for identical queries that arrive together, then cached)."""
        async with self.runtime.pool.acquire() as conn:
            rows = await repo.usage_page(
                conn,
                customer_id,
                granularity=q.granularity,
                dim=q.group_by,
                first=rng.first,
                stop=rng.stop,
                after=after,
                limit=q.limit + 1,
            )
            page, more = rows[:q.limit], len(rows) > q.limit
            ledger: dict[tuple[Any, str, str], int] = {}
            if any(r.priced == MONTHLY for r in page):
                ledger = await repo.monthly_money(conn, customer_id, q.granularity, q.group_by, rng.first, rng.stop)
        # Built as plain data (the hot path; tests hold the answers against UsagePage's schema).
        items = [
            {
                **period_of(q.granularity, r.period),
                "group": _group(q.group_by, r.key, r.key2, r.attrs),
                "quantities": [{"unit": u, "value": v} for u, v in sorted(r.values.items())],
                "priced": r.priced,
                **_money(q.group_by, r, ledger),
            }
            for r in page
        ]
        next_cursor = None
        if more:
            last = page[-1]
            next_cursor = Cursor.encode(scope, [_period_text(last.period), last.key, last.key2, last.priced])
        body = orjson.dumps(
            {
                "customer_id": str(customer_id),
                "from": iso(q.start),
                "to": iso(q.end),
                "granularity": q.granularity,
                "group_by": q.group_by,
                "time_zone": "America/New_York",
                "items": items,
                "next_cursor": next_cursor,
            }
        )
        self.usage_cache.put(cache_key, body)
        return body

    async def transactions(self, call: Call) -> Response:
        customer_id = call.path_as(CustomerPath).customer_id
        q = call.query_as(TransactionsQuery)
        types = [q.type] if q.type else None
        scope = Cursor.scope_of("transactions", customer_id, q.type, q.start and iso(q.start), q.end and iso(q.end))
        pos = Cursor.decode(q.cursor, scope, (datetime, UUID))
        before = (pos[0], pos[1]) if pos else None
        async with self.runtime.pool.acquire() as conn:
            await self._ensure_visible(conn, call.caller, customer_id)
            rows = await repo.transactions_page(
                conn, customer_id, before=before, limit=q.limit + 1, types=types, start=q.start, end=q.end
            )
        page, more = rows[:q.limit], len(rows) > q.limit
        items = [
            Transaction(
                id=r["transaction_id"],
                type=r["type"],
                occurred_at=r["occurred_at"],
                posted_at=r["posted_at"],
                reading_hour=r["reading_hour"],
                description=r["description"],
                amount=r["amount"],
                effect=Effect(bucket=r["bucket"], microcredits=r["signed_amount"]),
                reverses=r["reverses"],
                entries=repo.json_value(r["entries"]),
                usage=repo.json_value(r["usage"]),
                corrects_month=f"{r['corrects_month']:%Y-%m}" if r["corrects_month"] else None,
            )
            for r in page
        ]
        next_cursor = None
        if more:
            last = page[-1]
            next_cursor = Cursor.encode(scope, [last["occurred_at"], last["transaction_id"]])
        return answer(TransactionPage(customer_id=customer_id, items=items, next_cursor=next_cursor))

    async def statement(self, call: Call) -> Response:
        path = call.path_as(StatementPath)
        version = call.query_as(StatementQuery).version
        async with self.runtime.pool.acquire() as conn:
            await self._ensure_visible(conn, call.caller, path.customer_id)
            versions = await repo.statement_versions(conn, path.customer_id, path.month)
            row = await repo.statement(conn, path.customer_id, path.month, version) if versions else None
        if row is None:
            if versions:
                detail = (
                    f"no version {version} of the statement for {path.month:%Y-%m}: versions "
                    + ", ".join(str(v["version"]) for v in versions)
                )
            else:
                detail = f"no statement for {path.month:%Y-%m} yet (months are closed by the ledger)"
            raise ProblemError(NOT_FOUND, detail)
        return answer(
            Statement(
                customer_id=path.customer_id,
                month=f"{path.month:%Y-%m}",
                statement_id=row["statement_id"],
                version=row["version"],
                opening_balance=row["opening_balance"],
                funded=row["funded"],
                used=row["used"],
                original_used=row["original_used"],
                correction=row["correction"],
                expired=row["expired"],
                closing_balance=row["closing_balance"],
                used_by_kind=repo.json_value(row["used_by_kind"]),
                reasons=repo.json_value(row["reasons"]) or [],
                issued_at=row["issued_at"],
                versions=[StatementVersion.model_validate(dict(v)) for v in versions],
            )
        )

    # ------------------------------------------------------------------------------------ admin

    async def _known_customer(self, call: Call, customer_id: UUID) -> None:
        """404 unless the customer exists: the read model may not have seen a new one yet, so the ledger (its
        owner) is asked when the read model does not know it (502/504 when it cannot say)."""
        async with self.runtime.pool.acquire() as conn:
            known, _ = await repo.access(conn, customer_id, call.caller.subject)
        if not known:
            try:
                path = f"/internal/customers/{customer_id}"
                known = await self._forwarder().exists("ledger", path, token=call.caller.token)
            except UpstreamError as exc:
                raise ProblemError(GATEWAY_TIMEOUT if exc.status == 504 else BAD_GATEWAY, exc.detail) from None
            if not known:
                raise ProblemError(NOT_FOUND, f"no such customer: {customer_id}")

    async def grant(self, call: Call) -> Response:
        body = call.body_as(EntitlementIn)
        await self._known_customer(call, body.customer_id)  # only to a customer that exists
        async with self.runtime.pool.acquire() as conn:
            row, created = await repo.grant_entitlement(conn, body.subject, body.customer_id, call.caller.subject)
        self.access_cache.clear()  # at once on this instance; others within query_cache_seconds
        return answer(Entitlement.model_validate(dict(row)), 201 if created else 200)

    async def revoke(self, call: Call) -> Response:
        q = call.query_as(EntitlementKey)
        async with self.runtime.pool.acquire() as conn:
            removed = await repo.revoke_entitlement(conn, q.subject, q.customer_id)
        self.access_cache.clear()
        if not removed:
            raise ProblemError(NOT_FOUND, "no such entitlement")
        return Response(status_code=204)

    async def list_entitlements(self, call: Call) -> Response:
        q = call.query_as(EntitlementsQuery)
        scope = Cursor.scope_of("entitlements", q.subject, q.customer_id)
        pos = Cursor.decode(q.cursor, scope, (str, UUID))
        after = (pos[0], pos[1]) if pos else None
        async with self.runtime.pool.acquire() as conn:
            rows = await repo.entitlements_page(
                conn, subject=q.subject, customer_id=q.customer_id, after=after, limit=q.limit + 1
            )
        page, more = rows[:q.limit], len(rows) > q.limit
        return answer(
            EntitlementPage(
                items=[Entitlement.model_validate(dict(r)) for r in page],
                next_cursor=Cursor.encode(scope, [page[-1]["subject"], page[-1]["customer_id"]]) if more else None,
            )
        )

    async def completeness_report(self, call: Call) -> Response:
        """Per hour and meter, what each stage has and where it does not add up (services/api/completeness.py)."""
        start, end = completeness.whole_hours(call.query_as(RangeQuery))
        forwarder, s, token = self._forwarder(), self.settings, call.caller.token

        async def dlqs() -> tuple[list[completeness.DeadLetterCounts], list[completeness.DeadLetterCounts]]:
            return await dead_letters.count_for_report(s.kafka_bootstrap_servers, s.topic, start, end)

        async def get_json(service: str, path: str, params: Mapping[str, str]) -> Any:
            return await forwarder.get_json(service, path, params, token=token)

        try:
            body = await completeness.build_report(get_json, dlqs, start, end)
        except UpstreamError as exc:
            kind = GATEWAY_TIMEOUT if exc.status == 504 else BAD_GATEWAY
            raise ProblemError(kind, exc.detail) from None
        except completeness.UpstreamAnswerError as exc:
            raise ProblemError(BAD_GATEWAY, str(exc)) from None
        return ORJSONResponse(body)


# ---------------------------------------------------------------------------------------- helpers


_NO_MONEY: dict[str, object] = {"microcredits": None, "microcredits_exact": None, "credits": None}


def _money(dim: str, r: repo.UsageRow, ledger: Mapping[tuple[Any, str, str], int]) -> dict[str, object]:
    """An item's money: the exact sum of its charges; for usage of graduated and volume prices (``priced``
    monthly, no amount of its own) what the ledger posted for it per org, meter or kind, and none (null) per
    space or resource, which the ledger does not price on their own."""
    if r.priced != MONTHLY:
        return amount_fields(r.amount)
    if dim in ("space", "resource"):
        return _NO_MONEY
    return amount_fields(Fraction(ledger.get((r.period, r.key, r.key2), 0)))


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


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _cursor_period(granularity: str, text: str) -> date | datetime:
    """The period key a usage cursor holds: a UTC hour, or the first day of a day or month."""
    try:
        if granularity == "hour":
            return parse_time(text)
        if not _DAY.fullmatch(text):
            raise ValueError("not a day")
        return date.fromisoformat(text)
    except ValueError:
        raise ProblemError(INVALID_CURSOR, "cursor: not a cursor of this query; start again without it") from None


def _period_text(period: date | datetime) -> str:
    return iso(period) if isinstance(period, datetime) else period.isoformat()
