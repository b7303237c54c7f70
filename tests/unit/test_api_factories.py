"""What the api's message factories (tests/support/api_factories.py) make is what the contracts accept: charges
dealt into batches as the pricer publishes them (one per reading hour, meter and shard, never a resource
twice), which the consumers' decoder takes whole."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from shared.batches import decode_charges, encode_charges, shard_key, shard_of
from shared.contracts import ChargesComputed, StatementIssued, TransactionPosted
from shared.kafka import encode
from tests.support.api_factories import batches, charge, outgoing, statement, txn


def test_charges_are_dealt_into_batches_per_hour_meter_and_shard_that_decode_whole() -> None:
    h = datetime(2026, 10, 5, 14, tzinfo=UTC)
    items = [charge(h, f"app-{i}", org=f"org-{i % 3}", amount=Fraction(i, 7)) for i in range(40)]
    items += [
        charge(h + timedelta(hours=1), "app-1", org="org-1"),
        charge(h, "svc-1", org="org-1", meter="cfservices", unit="instance", kind="plan", value=1, amount=Fraction(3)),
        charge(h, "app-2", org="org-2", revision=2, priced=False),  # another revision: a batch after the first
    ]
    out = batches(items)
    for b in out:
        assert ChargesComputed.model_validate_json(encode_charges(b)).resource_id == b.resource_id
        decoded = decode_charges(encode_charges(b))
        assert decoded.rejected == [] and decoded.message == b
        assert {shard_of(r) for r in b.resource_id} == {b.shard}
        assert len(set(b.resource_id)) == len(b.resource_id)
        assert outgoing(b).key == shard_key(b.shard)
    # every item in exactly one batch, with its facts and its exact amount
    dealt = sorted(
        (b.reading_hour, b.meter, r, b.orgs[b.org[i]].id, b.value[i], b.revision[i], b.price[i] >= 0,
         Fraction(b.amount_numerator[i], b.amount_denominator[i]))
        for b in out for i, r in enumerate(b.resource_id)
    )
    assert dealt == sorted(
        (c.reading_hour, c.meter, c.resource_id, c.org_id, c.value, c.revision, c.priced, c.amount) for c in items
    )
    second = [b for b in out if "app-2" in b.resource_id]
    assert [b.revision[b.resource_id.index("app-2")] for b in second] == [1, 2]
    assert second[1].price == [-1] and second[1].amount_numerator == [0]
    assert batches(items) == out and [encode_charges(b) for b in batches(items)] == [encode_charges(b) for b in out]


def test_ledger_factories_make_valid_messages() -> None:
    h = datetime(2026, 10, 5, 14, tzinfo=UTC)
    t = txn(uuid.uuid4(), "usage", 10, occurred_at=h, reading_hour=h, orgs=["org-1"])
    debits = sum(e.amount for e in t.entries if e.side == "debit")
    assert debits == sum(e.amount for e in t.entries if e.side == "credit") == 10
    assert TransactionPosted.model_validate_json(encode(t)) == t
    s = statement(uuid.uuid4(), "2026-10", used=5)
    assert StatementIssued.model_validate_json(encode(s)).used == 5
