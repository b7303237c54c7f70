"""The customer usage dashboard: HTML pages served by the api under ``/dashboard`` (Jinja2 templates,
server-side SVG charts from ``charts.py``, one served stylesheet; no JavaScript, nothing from elsewhere).

It answers from the api's own read model through the same repository and service functions as the JSON
routes (``repository.bucket_sums`` + ``service.balance_from_buckets`` for balances, ``usage_page`` for
usage, ``statement``, ``transactions_page``), the same token verifier and the same visibility rule
(``Api._ensure_visible``: 404 alike for a customer that does not exist and one the caller may not see),
and the same admin forwarder for the unpriced and unassigned lists — so it shows the JSON API's numbers.
It is not part of ``/openapi.json``, which describes the JSON API only.

Sign-in: the caller pastes a bearer token (in development ``billing token --scope usage.admin``, or
``--scope usage.read --customer ID``); once verified it is kept in an HttpOnly, SameSite=Strict cookie
(Secure over https) scoped to ``/dashboard``, and verified again on every request. POSTs (sign-in,
sign-out) are refused from another origin.

What a page shows is computed in ``views.py`` (burn rate, run-out, the charts' data); this module, over 400
lines, is the pages of one small HTML application (session, sign-in and out, the customer pages, the CSV,
the admin lists), which share its rendering, session and error handling.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import date, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode
from uuid import UUID

import orjson
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from services.api import audit
from services.api import repository as repo
from services.api.charges import MONTHLY
from services.api.charts import format_credits
from services.api.forward import ADMIN_ROUTES, render
from services.api.service import balance_from_buckets, iso, ny_month, usage_range
from services.api.views import (
    LedgerFact,
    burn_rate,
    burn_view,
    burn_window,
    corrections_view,
    days_text,
    next_month,
    ny_text,
    previous_month,
    run_out,
    statement_view,
    usage_view,
    versions_view,
)
from shared.auth import AuthError, IssuerUnavailableError, Principal
from shared.clock import BUSINESS_TZ, month_bounds, utcnow
from shared.db import Conn
from shared.edge import (
    EARLIEST,
    INVALID_PARAMETER,
    NOT_FOUND,
    Params,
    ProblemError,
    latest,
    parameter,
    parse_month,
    parse_params,
    parse_uuid,
)

if TYPE_CHECKING:
    from services.api.handlers import Api

__all__ = ["COOKIE", "Dashboard"]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "billing_dashboard_token"
PAGE = 100  # customers per page
ROWS = 5000  # rows per repository call when reading a whole range
MAX_FORM_BYTES = 32_768
_ORG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a Cloud Foundry guid, as the admin routes accept it
_CSV_NAME = re.compile(r"^(\d{4}-\d{2})\.csv$")


def _parse_version(text: object) -> int:
    """A statement version: a positive integer (as the JSON API's ``version``)."""
    if not isinstance(text, str) or not re.fullmatch(r"[1-9][0-9]{0,8}", text):
        raise ValueError("must be a positive integer")
    return int(text)
SIGN_IN_REASONS = {
    "expired": "Your session ended: the token has expired. Sign in with a new token.",
    "invalid": "Your session ended: the token is no longer accepted. Sign in with a new token.",
    "scope": "That token grants neither usage.read nor usage.admin.",
    "signed-out": "You are signed out.",
}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # "no-referrer" would make the browser send `Origin: null` on our own forms
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}

PAGES = Counter("billing_api_dashboard_requests_total", "Dashboard pages answered by the api", ["page", "status"])

_ENV = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["credits"] = format_credits
_ENV.filters["micro"] = lambda microcredits: f"{int(microcredits):,}"
_CSS_VERSION = hashlib.sha256((HERE / "static" / "dashboard.css").read_bytes()).hexdigest()[:12]
_ADMIN = {r.path: r for r in ADMIN_ROUTES if r.method == "GET"}
# The fields the admin list pages show (of the pricer's unpriced charges and the ledger's held ones).
_LIST_FIELDS = (
    "measurement_id",
    "reading_hour",
    "org_id",
    "org_name",
    "space_id",
    "space_name",
    "resource_id",
    "resource_name",
    "meter",
    "resource_kind",
    "value",
    "unit",
    "credits",
)


# ------------------------------------------------------------------------------------------- pages


class _SignIn(Exception):
    """No usable session: back to the sign-in page (with a reason, and the cookie cleared)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


Page = Callable[[Request, Principal], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """The dashboard's routes, built on the running :class:`services.api.handlers.Api`."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def routes(self) -> list[BaseRoute]:
        """One mount (and its bare path): none of its routes is a JSON route of the OpenAPI document."""
        return [
            # Without the slash: a relative redirect (the router's own would name the request's Host).
            Route("/dashboard", self._plain("home", self.home), methods=["GET"]),
            Mount(
                "/dashboard",
                routes=[
                    Route("/", self._plain("home", self.home), methods=["GET"]),
                    Route("/sign-in", self._plain("sign_in", self.sign_in), methods=["GET", "POST"]),
                    Route("/sign-out", self._plain("sign_out", self.sign_out), methods=["POST"]),
                    Route("/customers", self._page("customers", self.customers), methods=["GET"]),
                    Route("/customers/{customer_id}", self._page("customer", self.customer), methods=["GET"]),
                    Route(
                        "/customers/{customer_id}/statements/{name}",
                        self._page("statement_csv", self.statement_csv),
                        methods=["GET"],
                    ),
                    Route("/admin/unpriced", self._page("unpriced", self.unpriced, admin=True), methods=["GET"]),
                    Route("/admin/unassigned", self._page("unassigned", self.unassigned, admin=True), methods=["GET"]),
                    Route(
                        "/admin/audit",
                        self._page("audit", functools.partial(audit.audit_page, self), admin=True),
                        methods=["GET"],
                    ),
                    Mount("/static", app=StaticFiles(directory=HERE / "static"), name="dashboard-static"),
                    Route("/{rest:path}", self._plain("not_found", self.not_found), methods=["GET"]),
                ],
            )
        ]

    # ---------------------------------------------------------------------------------- plumbing

    @staticmethod
    def _base(request: Request) -> str:
        """The dashboard's own path prefix (``/dashboard``, under whatever root the app is served)."""
        return str(request.scope.get("root_path", "")).rstrip("/")

    def _render(
        self, request: Request, template: str, status: int = 200, principal: Principal | None = None, **ctx: Any
    ) -> Response:
        nav = "customers" if template.startswith("customer") else template.removesuffix(".html")
        body = _ENV.get_template(template).render(
            base=self._base(request), css_version=_CSS_VERSION, principal=principal, nav=nav, **ctx
        )
        return HTMLResponse(body, status_code=status)

    def _error(
        self, request: Request, status: int, title: str, detail: str, principal: Principal | None = None
    ) -> Response:
        return self._render(request, "error.html", status, principal, status_code=status, title=title, detail=detail)

    def _finish(self, name: str, resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        PAGES.labels(name, str(resp.status_code)).inc()
        return resp

    def _plain(self, name: str, fn: Endpoint) -> Endpoint:
        """A page that needs no session (sign-in, sign-out, not found)."""

        async def endpoint(request: Request) -> Response:
            try:
                resp = await fn(request)
            except ProblemError as exc:
                resp = self._error(request, exc.status, exc.title, exc.detail)
            except IssuerUnavailableError:
                resp = self._error(
                    request, 503, "Service Unavailable", "Tokens cannot be verified right now; try again shortly."
                )
                resp.headers["retry-after"] = "5"
            except Exception:  # a page never answers with a traceback; the error is logged
                log.exception("dashboard page failed", extra={"page": name})
                resp = self._error(request, 500, "Something went wrong", "The error was logged. Try again later.")
            return self._finish(name, resp)

        endpoint.__name__ = f"dashboard_{name}"
        return endpoint

    def _page(self, name: str, fn: Page, *, admin: bool = False) -> Endpoint:
        """A page for a signed-in caller with usage.read (or usage.admin when ``admin``)."""

        async def signed_in(request: Request) -> Response:
            principal = await self._session(request)
            if admin and not principal.is_admin:
                return self._error(request, 403, "Forbidden", "This page needs the scope usage.admin.", principal)
            try:
                return await fn(request, principal)
            except ProblemError as exc:
                return self._error(request, exc.status, exc.title, _sentence(exc.detail), principal)

        async def endpoint(request: Request) -> Response:
            try:
                return await signed_in(request)
            except _SignIn as exc:
                target = f"{self._base(request)}/sign-in" + (f"?reason={exc.reason}" if exc.reason else "")
                resp = RedirectResponse(target, status_code=303)
                if exc.reason:
                    resp.delete_cookie(COOKIE, path=self._base(request) or "/")
                return resp

        return self._plain(name, endpoint)

    async def _session(self, request: Request) -> Principal:
        token = request.cookies.get(COOKIE)
        if not token:
            raise _SignIn()
        try:
            principal = await self.api.verifier.verify(token)
        except AuthError as exc:
            raise _SignIn("expired" if "expired" in exc.detail else "invalid") from None
        if not principal.can_read:
            raise _SignIn("scope")
        return principal

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """A form POST from this dashboard, not from another site (SameSite covers the cookie, not a
        forged sign-in)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"

    async def _admin_get(
        self, path: str, principal: Principal, query: dict[str, str] | None = None, **params: str
    ) -> tuple[int, Any]:
        """GET an admin route through the api's own forwarder with the caller's token: its parameters are
        checked with the owner's models first, as the JSON route checks them."""
        assert self.api.forwarder is not None, "the api has not started"
        route = _ADMIN[path]
        contract = route.contract
        try:
            path_params = parse_params(contract.path_params, params.items()) if contract.path_params else None
            query_params = parse_params(contract.query or Params, (query or {}).items())
        except ProblemError as exc:
            return exc.status, {"title": exc.title, "detail": exc.detail}
        resp = await self.api.forwarder.send(
            route.service,
            "GET",
            contract.path.format(**render(path_params)),
            token=principal.token,
            query=render(query_params),
        )
        try:
            body = orjson.loads(resp.body) if resp.body else None
        except orjson.JSONDecodeError:
            body = None
        return resp.status_code, body

    # ------------------------------------------------------------------------------- sign in/out

    async def home(self, request: Request) -> Response:
        # Mounted (/dashboard/), root_path is the dashboard's; at the bare /dashboard, the app's.
        mounted = request.url.path.endswith("/")
        prefix = self._base(request) if mounted else f"{request.scope.get('root_path', '')}/dashboard"
        return RedirectResponse(f"{prefix.rstrip('/')}/customers", status_code=303)

    async def not_found(self, request: Request) -> Response:
        return self._error(request, 404, "Not Found", "There is no such page.")

    async def sign_in(self, request: Request) -> Response:
        if request.method == "GET":
            reason = request.query_params.get("reason", "")
            return self._render(request, "sign_in.html", message=SIGN_IN_REASONS.get(reason, ""), error="")
        if not self._same_origin(request):
            return self._error(request, 403, "Forbidden", "Sign in from the dashboard's own page.")
        if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
            return self._error(request, 415, "Unsupported Media Type", "Send the sign-in form.")
        raw = await request.body()
        if len(raw) > MAX_FORM_BYTES:
            return self._error(request, 413, "Content Too Large", "That is not a token.")
        try:
            fields = parse_qs(raw.decode("utf-8", errors="replace"), max_num_fields=4)
        except ValueError:  # more fields than the form has
            return self._render(request, "sign_in.html", 400, message="", error="Send the sign-in form only.")
        token = (fields.get("token") or [""])[-1].strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token:
            return self._render(request, "sign_in.html", 400, message="", error="Paste a bearer token.")
        try:
            principal = await self.api.verifier.verify(token)
        except AuthError as exc:
            error = f"The token was refused: {_sentence(exc.detail)}"
            resp = self._render(request, "sign_in.html", 401, message="", error=error)
            resp.headers["www-authenticate"] = 'Bearer realm="billing-dashboard"'
            return resp
        if not principal.can_read:
            return self._render(request, "sign_in.html", 403, message="", error=SIGN_IN_REASONS["scope"])
        resp = RedirectResponse(f"{self._base(request)}/customers", status_code=303)
        resp.set_cookie(
            COOKIE,
            token,
            max_age=max(1, principal.expires_at - int(time.time())),
            path=self._base(request) or "/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return resp

    async def sign_out(self, request: Request) -> Response:
        if not self._same_origin(request):
            return self._error(request, 403, "Forbidden", "Sign out from the dashboard's own page.")
        resp = RedirectResponse(f"{self._base(request)}/sign-in?reason=signed-out", status_code=303)
        resp.delete_cookie(
            COOKIE,
            path=self._base(request) or "/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return resp

    # ------------------------------------------------------------------------------- customers

    async def _names(self, principal: Principal, ids: Iterable[UUID]) -> dict[UUID, str]:
        """Customer names for an admin, from the ledger through the forwarder; none when it is away."""
        wanted, names = set(ids), {}
        if not principal.is_admin or not wanted:
            return {}
        query: dict[str, str] = {"limit": "500"}
        for _ in range(20):
            status, body = await self._admin_get("/admin/customers", principal, query)
            if status != 200 or not isinstance(body, dict):
                break
            for c in body.get("items", []):
                try:
                    names[UUID(str(c["id"]))] = str(c.get("name", ""))
                except (KeyError, ValueError):
                    continue
            if wanted <= names.keys() or not body.get("next_cursor"):
                break
            query["cursor"] = str(body["next_cursor"])
        return {k: v for k, v in names.items() if k in wanted}

    async def _name(self, principal: Principal, customer_id: UUID) -> str:
        if not principal.is_admin:
            return ""
        status, body = await self._admin_get("/admin/customers/{customer_id}", principal, customer_id=str(customer_id))
        return str(body.get("name", "")) if status == 200 and isinstance(body, dict) else ""

    async def customers(self, request: Request, principal: Principal) -> Response:
        q = request.query_params
        after = parameter("after", parse_uuid, q["after"]) if "after" in q else None
        now = utcnow()
        async with self.api.runtime.pool.acquire() as conn:
            rows = await repo.visible_customers(
                conn,
                everyone=principal.is_admin,
                subject=principal.subject,
                claimed=sorted(principal.customers),
                after=after,
                limit=PAGE + 1,
            )
            page = rows[:PAGE]
            balances = {
                r["customer_id"]: balance_from_buckets(await repo.bucket_sums(conn, r["customer_id"], now))
                for r in page
            }
        names = await self._names(principal, balances)
        items = [
            {
                "id": str(r["customer_id"]),
                "name": names.get(r["customer_id"], ""),
                "balance": balances[r["customer_id"]],
            }
            for r in page
        ]
        more = str(page[-1]["customer_id"]) if len(rows) > PAGE else None
        return self._render(
            request, "customers.html", principal=principal, items=items, next_after=more, as_of=iso(now)
        )

    async def _facts(self, conn: Conn, customer_id: UUID, start: datetime, end: datetime) -> list[LedgerFact]:
        """The customer's transactions that occurred in [start, end) (the burn-down's window)."""
        facts: list[LedgerFact] = []
        before: tuple[datetime, UUID] | None = None
        while True:
            rows = await repo.transactions_page(
                conn, customer_id, before=before, limit=ROWS, types=None, start=start, end=end
            )
            facts.extend(LedgerFact(r["occurred_at"], r["type"], r["bucket"], r["signed_amount"]) for r in rows)
            if len(rows) < ROWS:
                return facts
            before = (rows[-1]["occurred_at"], rows[-1]["transaction_id"])

    async def _usage(self, conn: Conn, customer_id: UUID, month: date, dim: str) -> list[repo.UsageRow]:
        start, end = month_bounds(month)
        rng = usage_range(start, end, "day")
        out: list[repo.UsageRow] = []
        after: tuple[date | datetime, str, str, str] | None = None
        while True:
            rows = await repo.usage_page(
                conn, customer_id, granularity="day", dim=dim, first=rng.first, stop=rng.stop, after=after, limit=ROWS
            )
            out.extend(rows)
            if len(rows) < ROWS:
                break
            after = (rows[-1].period, rows[-1].key, rows[-1].key2, rows[-1].priced)
        if dim == "org" and any(r.priced == MONTHLY for r in out):
            # Usage of graduated and volume prices: per org, the money the ledger posted for it (as the API).
            posted = await repo.monthly_money(conn, customer_id, "day", dim, rng.first, rng.stop)
            out = [
                replace(r, amount=Fraction(posted.get((r.period, r.key, r.key2), 0))) if r.priced == MONTHLY else r
                for r in out
            ]
        return out

    async def customer(self, request: Request, principal: Principal) -> Response:
        customer_id = parameter("customer_id", parse_uuid, request.path_params["customer_id"])
        q = request.query_params
        month_arg = parameter("month", parse_month, q["month"]) if "month" in q else None
        version = parameter("version", _parse_version, q["version"]) if "version" in q else None
        org = q.get("org") or None
        if org is not None and not _ORG.match(org):
            raise ProblemError(INVALID_PARAMETER, "org: must be a Cloud Foundry org guid", parameter="org")
        now = utcnow()
        async with self.api.runtime.pool.acquire() as conn:
            await self.api._ensure_visible(conn, principal, customer_id)
            balance = balance_from_buckets(await repo.bucket_sums(conn, customer_id, now))
            # Bounded work: only the burn-down's window is read row by row; what came before is summed.
            window_start, window_end = burn_window(now)
            facts = await self._facts(conn, customer_id, window_start, window_end)
            opening = await repo.bucket_sums(conn, customer_id, window_start - timedelta(microseconds=1))
            usage_times = [f.occurred_at for f in facts if f.type in ("usage", "late_usage")]
            month = month_arg or (ny_month(max(usage_times)) if usage_times else ny_month(now))
            rows = await self._usage(conn, customer_id, month, "space" if org else "org")
            statement = await repo.statement(conn, customer_id, month, version)
            versions = await repo.statement_versions(conn, customer_id, month)
            corrections = await repo.corrections_of(conn, customer_id, month)
        if statement is None and version is not None and versions:
            raise ProblemError(NOT_FOUND, f"no version {version} of the statement for {month:%Y-%m}")
        name = await self._name(principal, customer_id)
        rate = burn_rate(facts)
        runout = run_out(balance.remaining, rate, now)
        link_query = {"org": org} if org else {}
        return self._render(
            request,
            "customer.html",
            principal=principal,
            customer_id=str(customer_id),
            name=name,
            as_of=iso(now),
            balance=balance,
            rate=rate,
            rate_end=ny_text(rate.end) if rate else "",
            rate_days=days_text(rate.days) if rate else "",
            runout=runout.astimezone(BUSINESS_TZ).date().isoformat() if runout else "",
            burn=burn_view(facts, balance, rate, runout, now, opening),
            month=month,
            month_text=f"{month:%B %Y}",
            month_code=f"{month:%Y-%m}",
            default_month=month_arg is None,
            previous_query=urlencode({"month": f"{previous_month(month):%Y-%m}", **link_query}),
            next_query=urlencode({"month": f"{next_month(month):%Y-%m}", **link_query}),
            has_previous=month > EARLIEST.date(),
            has_next=month < latest().date().replace(day=1),
            org=org,
            **usage_view(rows, month, org),
            statement=statement_view(statement),
            versions=versions_view(versions, month, org),
            corrections=corrections_view(corrections),
        )

    async def statement_csv(self, request: Request, principal: Principal) -> Response:
        customer_id = parameter("customer_id", parse_uuid, request.path_params["customer_id"])
        m = _CSV_NAME.match(request.path_params["name"])
        if not m:
            raise ProblemError(NOT_FOUND, "statements download as <YYYY-MM>.csv")
        month = parameter("month", parse_month, m.group(1))
        async with self.api.runtime.pool.acquire() as conn:
            await self.api._ensure_visible(conn, principal, customer_id)
            row = await repo.statement(conn, customer_id, month)
        if row is None:
            raise ProblemError(NOT_FOUND, f"no statement for {month:%Y-%m} yet (months are closed by the ledger)")
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\r\n")
        w.writerow(["customer_id", "month", "line", "meter", "resource_kind", "microcredits", "credits"])
        cid, mtext = str(customer_id), f"{month:%Y-%m}"

        def line(name: str, amount: int, meter: str = "", kind: str = "") -> None:
            w.writerow([cid, mtext, name, meter, kind, amount, format_credits(amount).replace(",", "")])

        line("opening_balance", row["opening_balance"])
        line("funded", row["funded"])
        line("used", row["used"])
        for u in repo.json_value(row["used_by_kind"]) or []:
            line("used_by_kind", int(u["microcredits"]), str(u.get("meter", "")), str(u.get("resource_kind", "")))
        line("expired", row["expired"])
        line("closing_balance", row["closing_balance"])
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="statement-{cid}-{mtext}.csv"'},
        )

    # ----------------------------------------------------------------------------------- admin

    async def _admin_list(self, request: Request, principal: Principal, path: str, template: str) -> Response:
        query = {"limit": "100"}
        if "cursor" in request.query_params:
            query["cursor"] = request.query_params["cursor"]
        status, body = await self._admin_get(path, principal, query)
        if status != 200 or not isinstance(body, dict):
            # the owner's own 4xx (a stale cursor, say) is the caller's; anything else is a bad gateway
            detail = str(body.get("detail", "")) if isinstance(body, dict) else ""
            shown = status if 400 <= status < 500 or status in (502, 503, 504) else 502
            return self._error(
                request,
                shown,
                "The list is not available",
                _sentence(detail or f"the service answered {status}"),
                principal,
            )
        items = []
        for raw in body.get("items", []):
            it = {k: str(raw.get(k) if raw.get(k) is not None else "") for k in _LIST_FIELDS}
            num, den = raw.get("amount_numerator"), raw.get("amount_denominator")
            if isinstance(num, int) and isinstance(den, int) and den > 0:
                it["credits"] = format_credits(Fraction(num, den))
            items.append(it)
        return self._render(
            request,
            template,
            principal=principal,
            items=items,
            next_cursor=body.get("next_cursor"),
            first_page="cursor" not in request.query_params,
        )

    async def unpriced(self, request: Request, principal: Principal) -> Response:
        return await self._admin_list(request, principal, "/admin/unpriced", "unpriced.html")

    async def unassigned(self, request: Request, principal: Principal) -> Response:
        return await self._admin_list(request, principal, "/admin/unassigned", "unassigned.html")


# ---------------------------------------------------------------------------------------- helpers


def _sentence(text: str) -> str:
    text = text.strip()
    return text.rstrip(".") + "." if text else ""


