"""The ledger writes its TransactionPosted messages straight from the draft (``transaction_posted_outbox``)
instead of through the contract model: the bytes must be exactly those the model gives, and valid for it,
whatever the draft holds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from asyncpg.pgproto.pgproto import UUID as DatabaseUUID
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ledger import messages
from services.ledger.domain import NIL_PRICE, Entry, TransactionDraft, UsageAmount
from shared.contracts import TransactionPosted

# hypothesis takes naive bounds and adds the zone itself
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))  # noqa: DTZ001
text = st.text(max_size=40)
amounts = st.integers(min_value=1, max_value=2**62)
# ids read from the database come as asyncpg's UUID class
ids = st.one_of(st.uuids(), st.uuids().map(lambda u: DatabaseUUID(str(u))))
entries = st.builds(
    Entry, account_id=st.integers(1, 10**6), account=text, side=st.sampled_from(["debit", "credit"]), amount=amounts
)
usage = st.builds(
    UsageAmount,
    org_id=text,
    meter=text,
    resource_kind=text,
    price_id=st.one_of(st.just(NIL_PRICE), ids),
    month=st.dates(),
    microcredits=st.integers(min_value=-(2**62), max_value=2**62),
)
drafts = st.builds(
    TransactionDraft,
    customer_id=ids,
    type=st.sampled_from(["funding", "usage", "late_usage", "expiry", "reversal", "correction"]),
    occurred_at=times,
    reading_hour=st.one_of(st.none(), times),
    description=text,
    idempotency_key=text,
    entries=st.lists(entries, min_size=1, max_size=4),
    usage=st.lists(usage, max_size=6),
    agreement_id=st.one_of(st.none(), ids),
    reverses=st.one_of(st.none(), ids),
    corrects_month=st.one_of(st.none(), st.dates().map(lambda d: d.replace(day=1))),
)


@settings(max_examples=300)
@given(drafts, st.uuids(), times)
def test_a_transaction_message_written_directly_is_the_models_bytes(
    draft: TransactionDraft, transaction_id: uuid.UUID, posted_at: datetime
) -> None:
    direct = messages.transaction_posted_outbox(draft, transaction_id, posted_at)
    assert direct == messages.to_outbox(messages.transaction_posted(draft, transaction_id, posted_at))
    parsed = TransactionPosted.model_validate_json(direct[2])
    assert parsed.id == transaction_id and parsed.posted_at == posted_at
    month = draft.corrects_month
    assert parsed.corrects_month == (None if month is None else f"{month.year:04d}-{month.month:02d}")
    assert [u.price_id for u in parsed.usage] == [None if u.price_id == NIL_PRICE else u.price_id for u in draft.usage]
