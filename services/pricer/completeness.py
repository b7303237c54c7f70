"""``GET /internal/completeness?from=&to=``: per reading hour and meter, the measurements whose latest
charge revision is priced or unpriced, and the sum of those revisions, for the api's completeness report
(contract: ``shared.completeness``; rules: ``services/api/completeness.py``)."""

from __future__ import annotations

from services.pricer import repository
from shared.completeness import PricerCompleteness, PricerCount, counts_route

__all__ = ["completeness"]

completeness = counts_route(repository.completeness_counts, PricerCompleteness, PricerCount)
