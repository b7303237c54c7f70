"""``GET /internal/completeness?from=&to=``: per reading hour and meter, the measurements whose latest
charge revision is priced or unpriced, and the sum of those revisions, for the api's completeness report
(contract: ``shared.completeness``; rules: ``services/api/completeness.py``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from services.pricer import repository
from shared.completeness import PricerCompleteness, PricerCount, parse_range
from shared.http import ORJSONResponse

__all__ = ["completeness"]


async def completeness(request: Request) -> Response:
    since, until = parse_range(request.query_params)
    async with request.app.state.runtime.pool.acquire() as conn:
        rows = await repository.completeness_counts(conn, since, until)
    answer = PricerCompleteness(
        items=[
            PricerCount(
                hour=r["hour"], meter=r["meter"], priced=r["priced"], unpriced=r["unpriced"], revisions=r["revisions"]
            )
            for r in rows
        ]
    )
    return ORJSONResponse(answer.model_dump(mode="json"))
