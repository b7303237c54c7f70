"""The contract of ``GET /internal/completeness?from=&to=`` on the collector, the pricer and the ledger: what
each owner counts in its own schema per reading hour and meter, for the api's completeness report
(``services/api/completeness.py`` holds the rules). Counts are of distinct measurements; charges at their
latest revision. Only (hour, meter) pairs with something to count are listed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from shared.clock import as_utc
from shared.contracts import UtcDatetime
from shared.http import ORJSONResponse, ProblemError

__all__ = [
    "MAX_RANGE_HOURS",
    "CollectorCompleteness",
    "CollectorCount",
    "LedgerCompleteness",
    "LedgerCount",
    "PricerCompleteness",
    "PricerCount",
    "counts_route",
    "openapi_path",
    "parse_range",
]

# The internal routes take a little more than the api allows (31 days), never an unbounded scan.
MAX_RANGE_HOURS = 32 * 24

Count = Annotated[int, Field(ge=0, strict=True)]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Item(_Answer):
    hour: UtcDatetime = Field(description="The reading hour (UTC hour start).")
    meter: Annotated[str, Field(max_length=64)]


class CollectorCount(_Item):
    read: Count = Field(default=0, description="Measurements read from Cloud Foundry.")
    estimated: Count = Field(default=0, description="Measurements estimated for a missed hour.")
    published: Count = Field(default=0, description="Of both, those of readings the outbox marks published.")
    meter_run: Literal["ok", "failed"] | None = Field(
        default=None, description="This meter's run in the hour's reading."
    )


class CollectorCompleteness(_Answer):
    meters: list[str] = Field(description="The meters the collector runs.")
    expected_since: dict[str, UtcDatetime | None] = Field(
        description="Per meter, the first hour that must have a reading (null: none expected yet)."
    )
    due_before: UtcDatetime = Field(description="Hours before this one have ended by the collector's clock.")
    items: list[CollectorCount]


class PricerCount(_Item):
    priced: Count = 0
    unpriced: Count = 0
    revisions: Count = Field(default=0, description="Sum of the latest revisions of these charges.")


class PricerCompleteness(_Answer):
    items: list[PricerCount]


class LedgerCount(_Item):
    posted: Count = Field(default=0, description="Charges applied to a customer's month (the ledger's shard_state).")
    held: Count = Field(default=0, description="Charges held: their org had no customer at that hour.")
    revisions: Count = Field(default=0, description="Sum of the revisions applied or held.")


class LedgerCompleteness(_Answer):
    items: list[LedgerCount]


def _time(query: Mapping[str, str], name: str) -> datetime:
    raw = query.get(name)
    if not raw:
        raise ProblemError(422, "Invalid query parameter", f"{name}: is required")
    try:
        # A '+' of an offset sent unencoded arrives as a space.
        value = datetime.fromisoformat(raw.strip().replace(" ", "+"))
    except ValueError:
        raise ProblemError(422, "Invalid query parameter", f"{name}: not an ISO-8601 time") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ProblemError(422, "Invalid query parameter", f"{name}: give a time zone (e.g. Z)")
    try:
        return as_utc(value)
    except (ValueError, OverflowError):  # e.g. 0001-01-01T00:00+01:00 has no UTC datetime
        raise ProblemError(422, "Invalid query parameter", f"{name}: out of the range of UTC times") from None


def parse_range(query: Mapping[str, str]) -> tuple[datetime, datetime]:
    """``from`` and ``to`` of an internal completeness query; 422 problem when missing, naive, empty or
    longer than MAX_RANGE_HOURS."""
    since, until = _time(query, "from"), _time(query, "to")
    if since >= until:
        raise ProblemError(422, "Invalid query parameter", "to: must be after from")
    if (until - since).total_seconds() > MAX_RANGE_HOURS * 3600:
        raise ProblemError(422, "Invalid query parameter", f"to: at most {MAX_RANGE_HOURS} hours after from")
    return since, until


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"$ref"} and node["$ref"].startswith("#/$defs/"):
            return _inline(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def openapi_path(answer: type[BaseModel], owner: str) -> dict[str, Any]:
    """The OpenAPI path item of ``GET /internal/completeness`` answering ``answer`` (its JSON Schema as
    pydantic writes it, inlined), for the owning service's document."""
    schema = answer.model_json_schema()
    body = _inline({k: v for k, v in schema.items() if k != "$defs"}, schema.get("$defs", {}))
    time = {"type": "string", "format": "date-time"}
    problem = {"content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    return {
        "/internal/completeness": {
            "get": {
                "summary": f"What the {owner} holds per reading hour and meter, for the api's completeness report",
                "parameters": [
                    {"name": n, "in": "query", "required": True, "schema": time, "description": d}
                    for n, d in (
                        ("from", "Start (inclusive), with its zone."),
                        ("to", "End (exclusive), with its zone."),
                    )
                ],
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": body}}},
                    "422": {
                        "description": "from or to missing, without a zone, not before to, or more than "
                        f"{MAX_RANGE_HOURS} hours apart.",
                        **problem,
                    },
                },
            }
        }
    }


def counts_route(
    counts: Callable[[Any, datetime, datetime], Awaitable[Sequence[Mapping[str, Any]]]],
    answer: type[PricerCompleteness] | type[LedgerCompleteness],
    item: type[PricerCount] | type[LedgerCount],
) -> Callable[[Request], Awaitable[Response]]:
    """The route of an owner whose counts are the rows of one query, ``counts(conn, since, until)``, each
    row holding exactly the fields of ``item`` (the pricer and the ledger)."""

    async def completeness(request: Request) -> Response:
        since, until = parse_range(request.query_params)
        async with request.app.state.runtime.pool.acquire() as conn:
            rows = await counts(conn, since, until)
        return ORJSONResponse(answer(items=[item(**r) for r in rows]).model_dump(mode="json"))  # type: ignore[arg-type]

    return completeness
