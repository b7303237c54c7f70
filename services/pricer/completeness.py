"""``GET /internal/completeness?from=&to=``: per reading hour and meter, the measurements whose latest
charge revision is priced or unpriced, and the sum of those revisions, for the api's completeness report
(contract: ``shared.completeness``; rules: ``services/api/completeness.py``)."""

from __future__ import annotations

from services.pricer import repository
from shared.completeness import PricerCompleteness, PricerCount, counts_handler

__all__ = ["handler"]

handler = counts_handler(repository.completeness_counts, PricerCompleteness, PricerCount)
