"""``GET /internal/completeness?from=&to=``: per reading hour and meter, the charges the ledger posted
(applied to a customer's exact month sum; zero-amount and unpriced ones included) and held (org without
a customer at that hour), with the sum of their revisions, for the api's completeness report (contract:
``shared.completeness``; rules: ``services/api/completeness.py``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from services.ledger import repository as repo
from shared.completeness import LedgerCompleteness, LedgerCount, parse_range
from shared.http import ORJSONResponse

__all__ = ["completeness"]


async def completeness(request: Request) -> Response:
    since, until = parse_range(request.query_params)
    async with request.app.state.runtime.pool.acquire() as conn:
        rows = await repo.completeness_counts(conn, since, until)
    answer = LedgerCompleteness(
        items=[
            LedgerCount(hour=r["hour"], meter=r["meter"], posted=r["posted"], held=r["held"], revisions=r["revisions"])
            for r in rows
        ]
    )
    return ORJSONResponse(answer.model_dump(mode="json"))
