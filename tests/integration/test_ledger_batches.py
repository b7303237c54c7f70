"""What batching changed, through the consumer's service call on a real database: a measurement counts once
however it arrives (twice in one message, in two messages of one posting or of two, batched again with
other measurements of its shard, a later revision before an earlier one); a charge revised twice within
one posting moves between groups exactly; a shard that already has state (compared item by item) posted
together with first sights of other shards (posted column at a time). Expected figures are worked out by
hand from the amounts sent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from fractions import Fraction

import pytest

from shared.batches import Charges, decode_charges, encode_charges, hour_text, shard_of
from shared.ids import charge_id, measurement_id
from tests.support.ledger import (
    LONG_AGO,
    PRICE_A,
    PRICE_B,
    LedgerDB,
    applied_revisions,
    charges_batch,
    delivered,
    held_revisions,
    item,
    ledger_db,  # noqa: F401  (fixture)
    posted_by_group,
    resources_of_shard,
)

pytestmark = pytest.mark.integration

HOUR = datetime(2026, 9, 9, 9, tzinfo=UTC)
MONTH = "2026-09"


async def setup(db: LedgerDB) -> tuple[uuid.UUID, str]:
    customer = await db.customer()
    org = f"org-{uuid.uuid4().hex[:8]}"
    await db.service.assign_org(org, customer, LONG_AGO)
    return customer, org


async def test_a_measurement_twice_in_one_message_counts_once(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await setup(db)
    a, b = resources_of_shard(3, 2)
    message = charges_batch(HOUR, [item(org, Fraction(5, 2), resource=a), item(org, 4, resource=b)] * 2)
    [received] = delivered([message])  # what the consumer hands the ledger
    assert sorted(received.resource_id) == sorted([a, b])
    posting = await db.service.post_charges([received])
    assert posting.changed == 2
    assert await posted_by_group(db, [customer]) == {(customer, MONTH, PRICE_A): 6}  # floor(5/2 + 4)
    assert await applied_revisions(db) == {(HOUR, "cfapps", a): 1, (HOUR, "cfapps", b): 1}


async def test_a_measurement_in_two_messages_counts_once(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await setup(db)
    [a] = resources_of_shard(5, 1)
    message = charges_batch(HOUR, [item(org, 1000, resource=a)])
    first = await db.service.post_charges([message, message])  # twice in one posting
    assert first.changed == 1 and first.transactions == 1
    again = await db.service.post_charges([message])  # and once more in another
    assert (again.changed, again.transactions) == (0, 0)
    assert await posted_by_group(db, [customer]) == {(customer, MONTH, PRICE_A): 1000}
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE customer_id = $1", customer) == 1


async def test_a_measurement_batched_again_with_others_of_its_shard_counts_once(ledger_db: LedgerDB) -> None:
    """The same measurement in another message of its shard (a pricer re-publishing a shard cut otherwise):
    only the measurements not seen before are posted."""
    db = ledger_db
    customer, org = await setup(db)
    a, b, c, d = resources_of_shard(11, 4)
    await db.service.post_charges([charges_batch(HOUR, [item(org, 100, resource=a), item(org, 10, resource=b)])])
    rebatched = charges_batch(HOUR, [item(org, 10, resource=b), item(org, 1, resource=c)])
    other = charges_batch(HOUR, [item(org, 100, resource=a), item(org, 10, resource=b), item(org, 7, resource=d)])
    assert rebatched.id != other.id
    posting = await db.service.post_charges([rebatched, other])
    assert posting.changed == 2  # c and d
    assert await posted_by_group(db, [customer]) == {(customer, MONTH, PRICE_A): 100 + 10 + 1 + 7}
    assert set(await applied_revisions(db)) == {(HOUR, "cfapps", r) for r in (a, b, c, d)}


@pytest.mark.parametrize("one_posting", [False, True])
async def test_a_revision_arriving_before_an_earlier_one_stays(ledger_db: LedgerDB, one_posting: bool) -> None:
    db = ledger_db
    customer, org = await setup(db)
    [a] = resources_of_shard(7, 1)
    second = charges_batch(HOUR, [item(org, 40, resource=a, revision=2, price_id=PRICE_B)])
    first = charges_batch(HOUR, [item(org, 900, resource=a)])
    if one_posting:
        await db.service.post_charges([second, first])
    else:
        await db.service.post_charges([second])
        late = await db.service.post_charges([first])
        assert (late.changed, late.transactions) == (0, 0)
    assert await posted_by_group(db, [customer]) == {(customer, MONTH, PRICE_B): 40}
    assert await applied_revisions(db) == {(HOUR, "cfapps", a): 2}


@pytest.mark.parametrize("first_posted_before", [True, False])
async def test_a_charge_revised_twice_in_one_posting_leaves_the_groups_it_passed_through(
    ledger_db: LedgerDB, first_posted_before: bool
) -> None:
    """Revision 2 moves a charge to another price, revision 3 (same posting) back: each replaced amount is
    taken from the group it was counted in, so the price it passed through ends at zero. (The fixed bug:
    revision 3 took nothing back from revision 2's group, which kept its amount.)"""
    db = ledger_db
    customer, org = await setup(db)
    [a] = resources_of_shard(2, 1)
    rev1 = charges_batch(HOUR, [item(org, 100, resource=a)])
    rev2 = charges_batch(HOUR, [item(org, 250, resource=a, revision=2, price_id=PRICE_B)])
    rev3 = charges_batch(HOUR, [item(org, Fraction(101, 2), resource=a, revision=3)])
    if first_posted_before:  # the shard has state: every batch is compared item by item
        await db.service.post_charges([rev1])
        posting = await db.service.post_charges([rev2, rev3])
    else:  # a new shard: its first batch posted from its columns, the next ones against it
        posting = await db.service.post_charges([rev1, rev2, rev3])
    assert posting.changed == (2 if first_posted_before else 3)
    assert await posted_by_group(db, [customer]) == {(customer, MONTH, PRICE_A): 50}  # floor(101/2)
    groups = await db.fetch(
        "SELECT price_id, sum_num, sum_den, posted FROM month_usage WHERE customer_id = $1", customer
    )
    assert {g["price_id"]: (g["sum_num"], g["sum_den"], g["posted"]) for g in groups} == {
        PRICE_A: (101, 2, 50),
        PRICE_B: (0, 1, 0),
    }
    assert await applied_revisions(db) == {(HOUR, "cfapps", a): 3}


async def test_a_shard_with_state_and_first_sights_of_other_shards_post_together(ledger_db: LedgerDB) -> None:
    """One posting mixing a shard the ledger holds state for (revisions, a new measurement, a repeat) with
    the first batches of two other shards, one of them also holding an org without a customer."""
    db = ledger_db
    customer, org = await setup(db)
    unassigned = f"org-{uuid.uuid4().hex[:8]}"
    s1 = resources_of_shard(1, 3, "old")
    s2 = resources_of_shard(2, 2, "new")
    s3 = resources_of_shard(3, 2, "mix")
    await db.service.post_charges([charges_batch(HOUR, [item(org, 10, resource=r) for r in s1[:2]])])

    known = charges_batch(
        HOUR,
        [
            item(org, 30, resource=s1[0], revision=2),  # 10 -> 30
            item(org, 10, resource=s1[1]),  # the same again
            item(org, Fraction(1, 3), resource=s1[2], denominator=3_000),  # new in a known shard
        ],
    )
    fresh = charges_batch(
        HOUR,
        [
            item(org, Fraction(2, 3), resource=s2[0]),
            item(org, 5, resource=s2[1], kind="plan", price_id=PRICE_B),
        ],
    )
    mixed = charges_batch(HOUR, [item(org, 1, resource=s3[0]), item(unassigned, 8, resource=s3[1])])
    posting = await db.service.post_charges([fresh, known, mixed])
    assert (posting.changed, posting.held) == (2 + 2 + 1, 1)
    assert await posted_by_group(db, [customer]) == {
        (customer, MONTH, PRICE_A): 30 + 10 + 1 + 1,  # floor(30 + 10 + 1/3 + 2/3 + 1)
        (customer, MONTH, PRICE_B): 5,
    }
    assert await applied_revisions(db) == {
        (HOUR, "cfapps", s1[0]): 2,
        **{(HOUR, "cfapps", r): 1 for r in (s1[1], s1[2], *s2, s3[0])},
    }
    assert await held_revisions(db) == {(HOUR, "cfapps", unassigned, s3[1]): 1}
    usage = await db.fetch(
        """SELECT u.resource_kind, u.price_id, u.microcredits FROM usage_lines u
             JOIN transactions t ON t.id = u.transaction_id
            WHERE t.customer_id = $1 ORDER BY t.posted_at, u.resource_kind""",
        customer,
    )
    # The second posting's lines: +20 (s1[0]) + 1/3 + 2/3 + 1 on the default kind, 5 on plan.
    assert [(u["resource_kind"], u["price_id"], u["microcredits"]) for u in usage] == [
        ("", PRICE_A, 20),
        ("", PRICE_A, 22),
        ("plan", PRICE_B, 5),
    ]


def test_helpers_build_batches_the_consumer_accepts() -> None:
    """The factories' batches are valid ``usage.charges.v2`` messages, one shard each."""
    hour = datetime(2026, 1, 1, tzinfo=UTC)
    items = [item("org", Fraction(7, 3), resource=f"r-{i}", denominator=3 * 10**6) for i in range(40)]
    batches = delivered([charges_batch(hour, [it]) for it in items])
    assert all(isinstance(b, Charges) and b.amount_numerator == [7 * 10**6] for b in batches)
    assert {b.shard for b in batches} == {shard_of(it.resource) for it in items}
    with pytest.raises(AssertionError, match="in one batch"):
        charges_batch(hour, items)
    mixed = charges_batch(hour, items, shard=0)
    assert len(decode_charges(encode_charges(mixed)).rejected) == sum(1 for it in items if shard_of(it.resource) != 0)


async def test_a_redelivered_batch_posts_what_it_held_once_its_org_has_a_customer(ledger_db: LedgerDB) -> None:
    """A batch posted once (one org's charges applied, another org's held for want of a customer) and
    delivered again after that org was assigned but before its held charges were released (an assignment
    releases only so many at once; a crash can leave a batch's offset uncommitted): the second posting
    draws the same customer in the same hour, so its usage transaction must not reuse the first one's
    idempotency key. It posts the held charge, once."""
    db = ledger_db
    customer, org = await setup(db)
    late = f"org-{uuid.uuid4().hex[:8]}"
    a, b = resources_of_shard(7, 2)
    message = charges_batch(HOUR, [item(org, 40, resource=a), item(late, 2, resource=b)])
    first = await db.service.post_charges([message])
    assert (first.changed, first.held, first.transactions) == (1, 1, 1)
    async with db.pool.acquire() as conn:  # the assignment row alone, as if its release was still to come
        await conn.execute(
            "INSERT INTO org_assignments (org_id, starts_at, customer_id) VALUES ($1, $2, $3)", late, LONG_AGO, customer
        )
    again = await db.service.post_charges([message])
    assert (again.changed, again.released, again.transactions) == (1, 1, 1)
    assert await posted_by_group(db, [customer]) == {(customer, MONTH, PRICE_A): 42}
    assert await held_revisions(db) == {}
    keys = await db.fetch("SELECT idempotency_key FROM transactions WHERE customer_id = $1", customer)
    assert len({k["idempotency_key"] for k in keys}) == 2
    assert (await db.service.post_charges([message])).changed == 0


async def test_a_charge_of_the_applied_revision_with_other_content_is_a_conflict_and_changes_nothing(
    ledger_db: LedgerDB,
) -> None:
    """Identity means content: an item of the revision the ledger applied (or holds) whose amount, price or
    org differs from the stored charge changes nothing and comes back as a conflict naming the stored
    charge; the same charge again is a redelivery. Checked against state from an earlier posting (groups
    known by id), within one posting (a group just created), and against held charges."""
    db = ledger_db
    customer, org = await setup(db)
    _, other_org = await setup(db)
    a, b, c, d, g = resources_of_shard(4, 5)
    stored = charges_batch(
        HOUR,
        [item(org, 100, resource=a), item(org, 10, resource=b), item(org, 5, resource=c), item(org, 7, resource=d),
         item(org, 1, resource=g)],
    )
    assert (await db.service.post_charges([stored])).conflicts == []
    before = await posted_by_group(db, [customer])
    transactions = await db.fetchval("SELECT count(*) FROM transactions")
    copy = charges_batch(
        HOUR,
        [
            item(org, 100, resource=a, denominator=20),  # the same amount, written 2000/20
            item(org, 10, resource=b, price_id=PRICE_B),  # another price
            item(other_org, 5, resource=c),  # another org
            item(org, 8, resource=d),  # another amount
            item(org, 2, resource=g, price_id=PRICE_B),  # another amount and price
        ],
    )
    posting = await db.service.post_charges([stored, copy])
    assert (posting.changed, posting.transactions) == (0, 0)
    assert await posted_by_group(db, [customer]) == before
    assert await db.fetchval("SELECT count(*) FROM transactions") == transactions

    def reason(rid: str, facts: str, stored: str = "applied", hour: datetime = HOUR) -> str:
        mid = measurement_id(hour, "cfapps", rid)
        return (
            f"conflict: charge {charge_id(mid, 1)} (measurement {mid}: {hour_text(hour)}, cfapps, resource {rid}) "
            f"at revision 1 is {stored} with other content: {facts}; the {stored} charge is kept"
        )

    assert posting.conflicts == [
        (1, 1, reason(b, f"price {PRICE_B} (applied: {PRICE_A})")),
        (1, 2, reason(c, f"org '{other_org}' (applied: '{org}')")),
        (1, 3, reason(d, "amount 8/1 (applied: 7/1)")),
        (1, 4, reason(g, f"amount 2/1 (applied: 1/1), price {PRICE_B} (applied: {PRICE_A})")),
    ]
    # A newer revision still replaces the charge, whatever it says.
    assert (await db.service.post_charges([charges_batch(HOUR, [item(org, 8, resource=d, revision=2)])])).changed == 1

    # Within one posting: the first batch of a new shard, then a conflicting copy of one of its charges.
    later = datetime(2026, 9, 9, 10, tzinfo=UTC)
    [e] = resources_of_shard(6, 1)
    first = charges_batch(later, [item(org, 3, resource=e)])
    posting = await db.service.post_charges([first, charges_batch(later, [item(org, 3, resource=e, price_id=PRICE_B)])])
    assert posting.changed == 1
    assert posting.conflicts == [(1, 0, reason(e, f"price {PRICE_B} (applied: {PRICE_A})", hour=later))]

    # Held: a charge of an org without a customer, then copies under the same org and under an assigned one.
    waiting = f"org-{uuid.uuid4().hex[:8]}"
    [f] = resources_of_shard(8, 1)
    assert (await db.service.post_charges([charges_batch(HOUR, [item(waiting, 6, resource=f)])])).held == 1
    posting = await db.service.post_charges(
        [charges_batch(HOUR, [item(waiting, 9, resource=f)]), charges_batch(HOUR, [item(org, 6, resource=f)])]
    )
    assert (posting.changed, posting.held) == (0, 0)
    assert posting.conflicts == [
        (0, 0, reason(f, "amount 9/1 (held: 6/1)", "held")),
        (1, 0, reason(f, f"org '{org}' (held: '{waiting}')", "held")),
    ]
    assert await held_revisions(db) == {(HOUR, "cfapps", waiting, f): 1}
    # Its org assigned, the held charge is posted as it was stored: 6, not 9, to the right customer.
    await db.service.assign_org(waiting, customer, LONG_AGO)
    after = await posted_by_group(db, [customer])
    assert after[(customer, MONTH, PRICE_A)] == before[(customer, MONTH, PRICE_A)] + 1 + 3 + 6  # d: 7 -> 8, e, f
    assert (customer, MONTH, PRICE_B) not in after
