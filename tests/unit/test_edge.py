"""The shared HTTP edge without I/O: strict times (zone, ASCII digits, whole-string match, the window, no
OverflowError at the ends of Python's calendar), UUIDs, months and counts; query parameters parsed into a
declared model (unknown, repeated, missing); cursors bound to their query; strict JSON bodies (duplicate
keys, NUL, numbers that are not integers); and the generated OpenAPI document of a declared route."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.auth import Principal
from shared.edge import (
    INVALID_BODY,
    INVALID_CURSOR,
    INVALID_PARAMETER,
    Answer,
    Call,
    Count,
    Cursor,
    CursorText,
    Endpoint,
    Month,
    Operation,
    Params,
    ProblemError,
    Time,
    Uuid,
    answer,
    count,
    document,
    parse_month,
    parse_params,
    parse_time,
    parse_uuid,
    starlette_routes,
    strict_json,
)
from shared.http import exception_handlers

CUST = uuid.UUID("0190a000-0000-7000-8000-0000000000c1")


# ------------------------------------------------------------------------------------------ values


def test_times_need_a_zone_and_come_back_in_utc() -> None:
    assert parse_time("2026-10-01T00:00:00-04:00") == datetime(2026, 10, 1, 4, tzinfo=UTC)
    assert parse_time("2026-10-01t04:00:00z") == datetime(2026, 10, 1, 4, tzinfo=UTC)
    assert parse_time("2026-10-01T04:00:00.000000000Z") == datetime(2026, 10, 1, 4, tzinfo=UTC)
    assert parse_time(datetime(2026, 10, 1, tzinfo=UTC)) == datetime(2026, 10, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad",
    [
        "2026-10-01T04:00:00",  # no zone
        "2026-10-01",
        "yesterday",
        "2026-10-01T04:00:00 04:00",  # an unencoded + became a space
        "2026-10-01 04:00:00Z",  # RFC 3339 allows the space; the edge takes only T
        "2026-02-30T00:00:00Z",
        "2026-10-01T04:00:00.0000001Z",  # finer than a microsecond
        "2026-10-01T04:00:00Z\n",  # a trailing newline: the whole string must match
        "٢٠٢٦-10-01T04:00:00Z",  # not ASCII digits
        "2026-10-01T04:00:00+24:00",
        "0001-01-01T00:00:00+01:00",  # before the first UTC time Python has: never an OverflowError
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999-01:00",  # after the last one
        "9999-12-31T23:59:59.999999Z",
        "1999-12-31T23:59:59Z",  # before the window
        datetime(2026, 10, 1),  # noqa: DTZ001 - naive
        1790000000,
    ],
)
def test_times_outside_the_rules_or_the_window_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_time(bad)


def test_the_window_ends_ten_years_from_now() -> None:
    soon = datetime.now(UTC) + timedelta(days=365 * 9)
    assert parse_time(soon.isoformat()) == soon
    with pytest.raises(ValueError, match="ten years"):
        parse_time((datetime.now(UTC) + timedelta(days=3660)).isoformat())


def test_uuids_and_months_have_one_form() -> None:
    assert parse_uuid(str(CUST).upper()) == CUST
    for bad in (
        f"{CUST}\n", f"{{{CUST}}}", CUST.hex, f"urn:uuid:{CUST}", f"{CUST}' OR 1=1", "٠" * 8 + str(CUST)[8:]
    ):
        with pytest.raises(ValueError):
            parse_uuid(bad)
    assert parse_month("2026-02") == date(2026, 2, 1)
    for bad in ("2026-2", "2026-13", "26-01", "2026-00", "0001-01", "9999-12", "٢٠٢٦-10", "2026-10\n"):
        with pytest.raises(ValueError):
            parse_month(bad)


# ------------------------------------------------------------------------------------------ parameters


class Query(Params):
    start: Time = Field(alias="from")
    customer_id: Uuid | None = None
    month: Month | None = None
    limit: Count = count(100, 500)
    cursor: CursorText | None = None


def parse(text: str) -> Query:
    return parse_params(Query, httpx.QueryParams(text).multi_items())


def test_parameters_are_parsed_into_the_declared_model() -> None:
    q = parse("from=2026-10-01T00:00:00-04:00&customer_id=" + str(CUST) + "&month=2026-10&limit=7")
    assert (q.start, q.customer_id, q.month, q.limit, q.cursor) == (
        datetime(2026, 10, 1, 4, tzinfo=UTC), CUST, date(2026, 10, 1), 7, None,
    )
    assert parse("from=2026-10-01T04:00:00Z").limit == 100


@pytest.mark.parametrize(
    ("text", "name", "words"),
    [
        ("", "from", "is required"),
        ("from=2026-10-01T04:00:00Z&from=2026-10-01T05:00:00Z", "from", "more than once"),
        ("from=2026-10-01T04:00:00Z&x=1", "x", "unknown parameter"),
        ("from=2026-10-01T04:00:00", "from", "zone"),
        ("from=0001-01-01T00:00:00%2B01:00", "from", "between"),
        ("from=2026-10-01T04:00:00Z&limit=0", "limit", ""),
        ("from=2026-10-01T04:00:00Z&limit=501", "limit", ""),
        ("from=2026-10-01T04:00:00Z&limit=%EF%BC%91%EF%BC%90", "limit", "0-9"),  # fullwidth digits
        ("from=2026-10-01T04:00:00Z&limit=1.5", "limit", ""),
        ("from=2026-10-01T04:00:00Z&limit=+10", "limit", ""),
        ("from=2026-10-01T04:00:00Z&customer_id=" + str(CUST) + "%0A", "customer_id", "UUID"),
        ("from=2026-10-01T04:00:00Z&month=%D9%A2%D9%A0%D9%A2%D9%A6-10", "month", "YYYY-MM"),
    ],
)
def test_a_bad_parameter_is_422_invalid_parameter_naming_it(text: str, name: str, words: str) -> None:
    with pytest.raises(ProblemError) as err:
        parse(text)
    assert err.value.kind == INVALID_PARAMETER and err.value.status == 422
    assert err.value.extra["parameter"] == name and words in err.value.detail


def test_a_malformed_cursor_parameter_is_invalid_cursor() -> None:
    with pytest.raises(ProblemError) as err:
        parse("from=2026-10-01T04:00:00Z&cursor=a%20b")
    assert err.value.kind == INVALID_CURSOR and err.value.status == 422


# ------------------------------------------------------------------------------------------ cursors


def test_cursors_round_trip_only_within_their_own_query() -> None:
    scope = Cursor.scope_of("usage", CUST, "a")
    hour = datetime(2026, 10, 1, 4, tzinfo=UTC)
    token = Cursor.encode(scope, [hour, "org-1", 3, CUST])
    assert Cursor.decode(token, scope, (datetime, str, int, uuid.UUID)) == [hour, "org-1", 3, CUST]

    def forged(position: list[Any], s: str = scope) -> str:
        return base64.urlsafe_b64encode(json.dumps({"s": s, "p": position}).encode()).decode().rstrip("=")

    shape = (datetime, str, int, uuid.UUID)
    for bad_scope, bad_token in (
        (Cursor.scope_of("usage", CUST, "b"), token),
        (scope, token + "x"),
        (scope, "not base64 !"),
        (scope, forged(["2026-10-01T04:00:00Z", "a\x00", 3, str(CUST)])),
        (scope, forged(["2026-10-01T04:00:00Z", "org", "3", str(CUST)])),  # a number as text
        (scope, forged(["2026-10-01T04:00:00Z", "org", True, str(CUST)])),
        (scope, forged(["0001-01-01T00:00:00+01:00", "org", 3, str(CUST)])),  # never an OverflowError
        (scope, forged(["9999-12-31T23:59:59.999999-01:00", "org", 3, str(CUST)])),
        (scope, forged(["2026-10-01T04:00:00Z", "org", 3, f"{CUST}\n"])),
        (scope, forged(["2026-10-01T04:00:00Z", "org", 3])),
    ):
        with pytest.raises(ProblemError) as err:
            Cursor.decode(bad_token, bad_scope, shape)
        assert err.value.kind == INVALID_CURSOR and err.value.status == 422


# ------------------------------------------------------------------------------------------ bodies


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1, "a": 2}',
        b'{"a": {"b": 1, "b": 1}}',
        b'{"a": "x\\u0000y"}',
        b'{"a": ["\\u0000"]}',
        b'{"a\\u0000": 1}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 1',
        b"\xff",
        b"[" * 100_000,
    ],
)
def test_strict_json_refuses_what_a_lenient_reader_would_guess(raw: bytes) -> None:
    with pytest.raises(ValueError):
        strict_json(raw)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    at: Time


class Out(BaseModel):
    n: int


class Path(Params):
    customer_id: Uuid


async def echo(call: Call) -> Response:
    body = call.body_as(Body)
    return answer(Out(n=body.n + 1), 201)


OP = Operation(
    "POST", "/things/{customer_id}", "Make a thing", {201: Answer(Out, "Made")}, "usage.admin",
    path_params=Path, body=Body, refusals={409: "It exists."}, command="test.thing.create",
).bind(echo)


class Allow:
    realm = "test"

    async def principal(self, request: Any, scope: str) -> Principal:
        return Principal("someone", frozenset({scope}), frozenset(), 2**40, token="t")


COMMANDS: list[tuple[str, str]] = []  # (kind, subject) of each request the command wrapper saw


def recorded(kind: str) -> Callable[[Endpoint], Endpoint]:
    """A command wrapper that notes the kind and the authenticated caller, then runs the route."""

    def wrap(inner: Endpoint) -> Endpoint:
        async def wrapped(request: Request) -> Response:
            COMMANDS.append((kind, request.state.principal.subject))
            return await inner(request)

        return wrapped

    return wrap


async def post(raw: bytes, path: str = f"/things/{CUST}", ctype: str = "application/json") -> httpx.Response:
    app = Starlette(routes=starlette_routes([OP], command=recorded), exception_handlers=dict(exception_handlers))
    app.state.authenticator = Allow()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.post(path, content=raw, headers={"content-type": ctype})


async def test_a_declared_route_parses_its_body_strictly_and_answers_its_model() -> None:
    COMMANDS.clear()
    ok = await post(b'{"n": 1, "at": "2026-10-01T04:00:00Z"}')
    assert ok.status_code == 201 and ok.json() == {"n": 2}
    assert COMMANDS == [("test.thing.create", "someone")]  # a command: through the wrapper, after authentication
    for raw in (
        b'{"n": "1", "at": "2026-10-01T04:00:00Z"}',  # "1" is not an integer
        b'{"n": 1.0, "at": "2026-10-01T04:00:00Z"}',
        b'{"n": true, "at": "2026-10-01T04:00:00Z"}',
        b'{"n": 1, "n": 2, "at": "2026-10-01T04:00:00Z"}',
        b'{"n": 1, "at": "9999-12-31T23:59:59.999999Z"}',
        b'{"n": 1, "at": 1790000000}',
        b'{"n": 1, "at": "2026-10-01T04:00:00Z", "x": 1}',
    ):
        r = await post(raw)
        assert r.status_code == 422 and r.json()["type"].endswith("/invalid-body"), (raw, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    r = await post(b'{"n": 1, "at": "2026-10-01T04:00:00Z"}', ctype="text/plain")
    assert r.status_code == 415 and r.json()["type"].endswith("/unsupported-media-type")
    r = await post(b'{"n": 1, "at": "2026-10-01T04:00:00Z"}', path=f"/things/{CUST}%0A")
    assert r.status_code == 422 and r.json()["type"].endswith("/invalid-parameter")
    assert r.json()["parameter"] == "customer_id"
    assert INVALID_BODY.uri.endswith("/invalid-body")
    assert len(COMMANDS) == 10  # refused ones too: the wrapper runs before parsing


def test_a_command_is_never_served_without_the_command_wrapper() -> None:
    with pytest.raises(ValueError, match="command wrapper"):
        starlette_routes([OP])
    forwarded = OP.but(forwarded=True)  # documented as a command, recorded by its owner
    assert starlette_routes([forwarded])


def test_the_document_is_generated_from_the_declaration() -> None:
    doc = document("Test", "A test service.", [OP])
    op = doc["paths"]["/things/{customer_id}"]["post"]
    assert op["security"] == [{"bearer": ["usage.admin"]}] and op["x-command"] == "test.thing.create"
    assert op["parameters"][0] == {
        "name": "customer_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"},
        "description": "",
    }
    key = op["parameters"][1]
    assert (key["name"], key["in"], key["required"]) == ("Idempotency-Key", "header", False)
    assert key["schema"]["maxLength"] == 255
    assert len(op["parameters"]) == 2
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Body"}
    assert set(op["responses"]) == {"201", "400", "401", "403", "409", "413", "415", "422", "503"}
    assert "Idempotent-Replayed" in op["responses"]["201"]["headers"]
    assert "Idempotency-Key" in op["responses"]["400"]["description"]
    conflict = op["responses"]["409"]["description"]
    assert "It exists." in conflict and "request-in-progress" in conflict
    body = doc["components"]["schemas"]["Body"]
    assert body["properties"]["at"] == {"type": "string", "format": "date-time", "title": "At"}
    assert body["additionalProperties"] is False and set(body["required"]) == {"n", "at"}
    with pytest.raises(ValueError, match="must say why"):
        Operation("GET", "/open", "Open", {200: Answer(Out)}, None)


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (asyncpg.CannotConnectNowError("the database system is shutting down"), 503, "unavailable"),
        (ConnectionRefusedError(111, "Connection refused"), 503, "unavailable"),
        (asyncpg.NumericValueOutOfRangeError("bigint out of range"), 409, "conflict"),
        (asyncpg.DataError("invalid input for query argument $4: 9223372036854775808 (value out of int64 range)"),
         409, "conflict"),
        (TypeError("Integer exceeds 64-bit range"), 409, "conflict"),  # orjson, a sum in a stored document
        (TypeError("a bug"), 500, "internal"),
        (RuntimeError("a bug"), 500, "internal"),
    ],
)
async def test_what_escapes_a_handler_is_answered_for_what_it_is(error: Exception, status: int, kind: str) -> None:
    async def fail(request: Request) -> Response:
        raise error

    app = Starlette(routes=[Route("/x", fail)], exception_handlers=dict(exception_handlers))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://t") as client:
        r = await client.get("/x")
    assert r.status_code == status and r.json()["type"].endswith(f"/{kind}"), r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert ("retry-after" in r.headers) == (status == 503)
