"""What the api's message factories (tests/support/api_factories.py) make is what the contracts accept."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from fractions import Fraction

from shared import ids
from shared.contracts import ChargeComputed, StatementIssued, TransactionPosted
from shared.kafka import encode
from tests.support.api_factories import charge, statement, txn


def test_factories_make_valid_messages_with_the_design_ids():
    h = datetime(2026, 10, 5, 14, tzinfo=UTC)
    c = charge(h, "app-1", org="org-1", amount=Fraction(3, 7), revision=2)
    assert c.measurement_id == ids.measurement_id(h, "cfapps", "app-1")
    assert c.id == ids.charge_id(c.measurement_id, 2)
    assert ChargeComputed.model_validate_json(encode(c)) == c
    t = txn(uuid.uuid4(), "usage", 10, occurred_at=h, reading_hour=h, orgs=["org-1"])
    assert sum(e.amount for e in t.entries if e.side == "debit") == sum(e.amount for e in t.entries if e.side == "credit") == 10
    assert TransactionPosted.model_validate_json(encode(t)) == t
    s = statement(uuid.uuid4(), "2026-10", used=5)
    assert StatementIssued.model_validate_json(encode(s)).used == 5
