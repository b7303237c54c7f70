"""Route declarations: an ``Operation`` says once what a route takes and answers — method, path, summary,
the scope its caller's token must hold, its path, query and body models, its answers and refusals, and
whether it is a command — and is bound to a handler. From the same declarations come the Starlette routes
(``starlette_routes``) and the OpenAPI document (``shared.edge.openapi``), so the two cannot drift.

A handler is ``async (Call) -> Response``: the edge has already authenticated the caller
(``request.state.principal``), parsed the path and query parameters and read the body, answering 401/403
and 415/422 problems itself; a ``ProblemError`` raised by the handler is answered as its problem.

Each route's endpoint is an ordinary Starlette endpoint (``Request -> Response``), built in layers:
``wrap`` (a service's own concern, e.g. metrics) → authentication → ``command(kind)`` for the routes
declared as commands (the state-changing requests: ``shared.commands`` records each in the audit trail
and answers a retry with the same Idempotency-Key from the first answer, for all of them at once) →
parsing and the handler. A route that forwards its owner's command (the api's /admin routes) is
documented as that command — the Idempotency-Key and its refusals — but recorded by the owner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.auth import AuthError, ForbiddenError, IssuerUnavailableError, Principal
from shared.edge.bodies import read_body
from shared.edge.params import Params, parse_params
from shared.edge.problems import FORBIDDEN, UNAUTHORIZED, UNAVAILABLE, ProblemError, problem

__all__ = [
    "JSON",
    "Answer",
    "Call",
    "CommandWrapper",
    "Endpoint",
    "Handler",
    "Operation",
    "Page",
    "Reply",
    "Wrap",
    "answer",
    "auth_problem",
    "declarer",
    "endpoint",
    "starlette_routes",
]

JSON = "application/json"
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]
CommandWrapper = Callable[[str], Callable[[Endpoint], Endpoint]]
Wrap = Callable[["Operation", Endpoint], Endpoint]


class Reply(BaseModel):
    """Base of answer models: built from the service's values (unknown keys dropped), documented closed,
    every field present in the answer."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        json_schema_serialization_defaults_required=True,
        json_schema_extra={"additionalProperties": False},
    )


class Page(Reply, Generic[T]):
    """A page of a list, in a fixed order."""

    items: list[T]
    next_cursor: str | None = Field(
        default=None, description="Pass it back as `cursor` for the next page; null on the last page."
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful answer: its body model (None: no body, or ``schema`` for one that is not a model),
    description, media type and documented headers (OpenAPI header objects)."""

    model: type[BaseModel] | None = None
    description: str = "OK"
    media_type: str = JSON
    schema: Mapping[str, Any] | None = None
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(slots=True)
class Call:
    """What a handler receives: the request, the verified caller and the parsed parameters and body."""

    request: Request
    principal: Principal | None
    path: Params | None
    query: Params | None
    body: BaseModel | None

    def path_as(self, model: type[M]) -> M:
        assert isinstance(self.path, model), f"declare path_params={model.__name__}"
        return self.path

    def query_as(self, model: type[M]) -> M:
        assert isinstance(self.query, model), f"declare query={model.__name__}"
        return self.query

    def body_as(self, model: type[M]) -> M:
        assert isinstance(self.body, model), f"declare body={model.__name__}"
        return self.body

    def optional_body(self, model: type[M]) -> M | None:
        assert self.body is None or isinstance(self.body, model), f"declare body={model.__name__}"
        return self.body

    @property
    def caller(self) -> Principal:
        assert self.principal is not None, "the route declares no scope"
        return self.principal


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Operation:
    """One route of one method. Without ``handler`` it is a contract (what an owner takes and answers, which
    the api reuses for the routes it forwards); ``bind`` gives it one."""

    method: str
    path: str
    summary: str
    answers: Mapping[int, Answer]
    scope: str | None
    open_reason: str = ""  # why a route without a scope may be called without a token
    path_params: type[Params] | None = None
    query: type[Params] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    check_body: bool = True  # False: documented, passed on unread (the api forwarding to an owner)
    refusals: Mapping[int, str] = field(default_factory=dict)  # problems the handler may answer
    command: str | None = None  # the kind of a state-changing command, e.g. "ledger.agreement.create"
    forwarded: bool = False  # True: the command is its owner's, recorded there (not wrapped here)
    description: str = ""
    tags: tuple[str, ...] = ()
    handler: Handler | None = None

    def __post_init__(self) -> None:
        if self.scope is None and not self.open_reason:
            raise ValueError(f"{self.method} {self.path}: a route without a scope must say why it is open")
        if self.command is not None and self.scope is None:
            raise ValueError(f"{self.method} {self.path}: a command must be authenticated")

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"

    def bind(self, handler: Handler) -> Operation:
        return dataclasses.replace(self, handler=handler)

    def but(self, **changes: Any) -> Operation:
        return dataclasses.replace(self, **changes)


class Declare(Protocol):
    def __call__(self, method: str, path: str, summary: str, answers: Mapping[int, Answer], **kw: Any) -> Operation: ...


def declarer(scope: str, tag: str) -> Declare:
    """A declarer of the operations of one group: each ``declare(method, path, summary, answers, **more)`` is an
    ``Operation`` with this scope and tag (every service declares its routes through one or two of these)."""

    def declare(method: str, path: str, summary: str, answers: Mapping[int, Answer], **kw: Any) -> Operation:
        return Operation(method, path, summary, answers, scope, tags=(tag,), **kw)

    return declare


def answer(model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``model`` as the JSON answer."""
    return Response(model.model_dump_json(by_alias=True), status_code=status, media_type=JSON, headers=headers)


def auth_problem(exc: Exception, realm: str) -> Response:
    """The problem document (and ``WWW-Authenticate`` challenge, RFC 6750) of an authentication failure."""
    challenge = f'Bearer realm="{realm}"'
    if isinstance(exc, AuthError):
        resp = problem(UNAUTHORIZED, exc.detail)
        resp.headers["www-authenticate"] = challenge if exc.missing else f'{challenge}, error="invalid_token"'
        return resp
    if isinstance(exc, ForbiddenError):
        resp = problem(FORBIDDEN, str(exc))
        resp.headers["www-authenticate"] = f'{challenge}, error="insufficient_scope", scope="{exc.scope}"'
        return resp
    if isinstance(exc, IssuerUnavailableError):
        resp = problem(UNAVAILABLE, "tokens cannot be verified right now; try again shortly")
        resp.headers["retry-after"] = "5"
        return resp
    raise TypeError(f"not an auth error: {exc!r}")


def _parsed(op: Operation, handler: Handler) -> Endpoint:
    """Parse the path, query and body as declared, then run the handler; problems become answers."""

    async def parse_and_handle(request: Request) -> Response:
        try:
            path = parse_params(op.path_params, request.path_params.items()) if op.path_params else None
            query = parse_params(op.query or Params, request.query_params.multi_items())
            body = None
            if op.body is not None and op.check_body:
                body = await read_body(request, op.body, required=op.body_required)
            principal = getattr(request.state, "principal", None)
            return await handler(Call(request, principal, path, query if op.query else None, body))
        except ProblemError as exc:
            return exc.response()

    return parse_and_handle


def _authenticated(op: Operation, inner: Endpoint) -> Endpoint:
    scope = op.scope
    if scope is None:
        return inner

    async def authenticate(request: Request) -> Response:
        authenticator = request.app.state.authenticator
        try:
            request.state.principal = await authenticator.principal(request, scope)
        except (AuthError, ForbiddenError, IssuerUnavailableError) as exc:
            return auth_problem(exc, authenticator.realm)
        return await inner(request)

    return authenticate


def endpoint(op: Operation, *, command: CommandWrapper | None = None, wrap: Wrap | None = None) -> Endpoint:
    """The Starlette endpoint of ``op``: wrap → authentication → command(kind) → parsing and handler. A
    command of this service needs ``command`` (never served unrecorded)."""
    if op.handler is None:
        raise ValueError(f"{op.name} has no handler")
    inner = _parsed(op, op.handler)
    if op.command is not None and not op.forwarded:
        if command is None:
            raise ValueError(f"{op.name} is a command: give the command wrapper")
        inner = command(op.command)(inner)
    outer = _authenticated(op, inner)
    return wrap(op, outer) if wrap is not None else outer


def starlette_routes(
    operations: Sequence[Operation], *, command: CommandWrapper | None = None, wrap: Wrap | None = None
) -> list[Route]:
    """One Starlette route per operation (a path with several methods has several routes)."""
    seen: set[str] = set()
    routes = []
    for op in operations:
        if op.name in seen:
            raise ValueError(f"{op.name} is declared twice")
        seen.add(op.name)
        routes.append(Route(op.path, endpoint(op, command=command, wrap=wrap), methods=[op.method]))
    return routes
