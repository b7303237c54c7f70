"""``GET /internal/completeness?from=&to=``: per reading hour and meter, the charges the ledger posted
(applied to a customer's exact month sum; zero-amount and unpriced ones included) and held (org without
a customer at that hour), with the sum of their revisions, for the api's completeness report (contract:
``shared.completeness``; rules: ``services/api/completeness.py``)."""

from __future__ import annotations

from services.ledger import repository as repo
from shared.completeness import LedgerCompleteness, LedgerCount, counts_handler

__all__ = ["handler"]

handler = counts_handler(repo.completeness_counts, LedgerCompleteness, LedgerCount)
