"""Agreements, expiry, several agreements at once, held charges, month close and statements, late usage,
alerts and reversals, through the ledger service on a real database. Expected figures are worked out by
hand in each test, not read back from the code."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction

import pytest

from services.ledger import repository as repo
from services.ledger.service import ConflictError, NotFoundError
from shared.batches import shard_of
from shared.contracts import AlertRaised, StatementIssued, TransactionPosted
from shared.ids import measurement_id
from tests.support.ledger import (
    LONG_AGO,
    PRICE_A,
    PRICE_B,
    LedgerDB,
    charges_batch,
    item,
    ledger_db,  # noqa: F401  (fixture)
    posted_by_group,
    remaining,
)

pytestmark = pytest.mark.integration

JAN_1 = datetime(2026, 1, 1, 5, tzinfo=UTC)  # midnight in New York
FEB_1 = datetime(2026, 2, 1, 5, tzinfo=UTC)


async def outbox(db: LedgerDB) -> list[TransactionPosted | StatementIssued | AlertRaised]:
    """Everything committed for publishing (service-level tests publish nothing, so it stays there)."""
    out: list[TransactionPosted | StatementIssued | AlertRaised] = []
    for r in await db.fetch("SELECT topic, payload FROM outbox ORDER BY id"):
        raw = bytes(r["payload"])
        if r["topic"] == "ledger.assignments.v1":  # org assignments (for the pricer's rate cards): not these
            continue
        if r["topic"] == "ledger.alerts.v1":
            out.append(AlertRaised.model_validate_json(raw))
        elif b'"ledger.statement"' in raw:
            out.append(StatementIssued.model_validate_json(raw))
        else:
            out.append(TransactionPosted.model_validate_json(raw))
    return out


async def setup(db: LedgerDB, credits: int = 1_000_000) -> tuple[uuid.UUID, str]:
    customer = await db.customer("Agency", await db.tier(credits))
    org = f"org-{uuid.uuid4().hex[:8]}"
    await db.service.assign_org(org, customer, LONG_AGO)
    return customer, org


async def test_an_agreement_funds_at_its_start_with_the_tier_default(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, _ = await setup(db, credits=730_000_000)
    result = await db.service.create_agreement(customer, JAN_1, FEB_1, None)
    assert result.body["credits"] == 730_000_000
    funding = [m for m in await outbox(db) if isinstance(m, TransactionPosted)]
    assert len(funding) == 1
    assert funding[0].type == "funding" and funding[0].occurred_at == JAN_1
    assert {(e.account, e.side, e.amount) for e in funding[0].entries} == {
        ("funding", "debit", 730_000_000),
        (f"credit_pool:{result.body['id']}", "credit", 730_000_000),
    }
    before = await db.service.balance(customer, JAN_1 - timedelta(seconds=1))
    after = await db.service.balance(customer, JAN_1)
    assert before["funded"] == 0 and after["funded"] == after["remaining"] == 730_000_000


async def test_unused_credits_expire_after_the_settlement_delay_and_late_period_usage_draws_first(
    ledger_db: LedgerDB,
) -> None:
    db = ledger_db
    customer, org = await setup(db)
    agreement = (await db.service.create_agreement(customer, JAN_1, FEB_1, 1_000_000)).body["id"]
    await db.post(datetime(2026, 1, 10, 12, tzinfo=UTC), item(org, 300_000, resource="a"))

    db.clock.now = FEB_1 + timedelta(hours=47)  # ended, within the 48 h settlement delay
    assert (await db.service.expire_due())[0] == 0
    # Usage of the period arriving now still draws from the agreement.
    await db.post(datetime(2026, 1, 31, 23, tzinfo=UTC), item(org, 100_000, resource="b"))
    assert await remaining(db, customer) == 600_000

    db.clock.now = FEB_1 + timedelta(hours=48)
    count, _ = await db.service.expire_due()
    assert count == 1
    assert (await db.service.expire_due())[0] == 0  # once
    expiry = [m for m in await outbox(db) if isinstance(m, TransactionPosted) and m.type == "expiry"]
    assert len(expiry) == 1 and expiry[0].occurred_at == FEB_1
    assert {(e.account, e.side, e.amount) for e in expiry[0].entries} == {
        (f"credit_pool:{agreement}", "debit", 600_000),
        ("expired", "credit", 600_000),
    }
    bal = await db.service.balance(customer, None)
    assert (bal["funded"], bal["used"], bal["expired"], bal["remaining"]) == (1_000_000, 400_000, 600_000, 0)

    # Usage of the period arriving after the expiry no longer draws from it: it is overage.
    await db.post(datetime(2026, 1, 20, 1, tzinfo=UTC), item(org, 50_000, resource="c"))
    bal = await db.service.balance(customer, None)
    assert (bal["used"], bal["remaining"]) == (450_000, -50_000)
    assert (
        await db.fetchval("SELECT -balance FROM accounts WHERE customer_id = $1 AND name = 'overage'", customer)
        == -50_000
    )


async def test_usage_draws_from_the_agreement_that_expires_first_then_the_next_then_overage(
    ledger_db: LedgerDB,
) -> None:
    db = ledger_db
    customer, org = await setup(db)
    later = (await db.service.create_agreement(customer, JAN_1, datetime(2026, 12, 1, tzinfo=UTC), 500)).body["id"]
    sooner = (await db.service.create_agreement(customer, JAN_1, datetime(2026, 6, 1, tzinfo=UTC), 300)).body["id"]
    not_yet = (
        await db.service.create_agreement(
            customer, datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 7, 1, tzinfo=UTC), 900
        )
    ).body["id"]
    hour = datetime(2026, 3, 3, 3, tzinfo=UTC)

    await db.post(hour, item(org, 200, resource="r1"))
    pools = {a["id"]: a["remaining"] for a in await db.service.list_agreements(customer, None, 10)}
    assert pools == {sooner: 100, later: 500, not_yet: 900}

    await db.post(hour, item(org, 400, resource="r2"))  # 100 from sooner, 300 from later
    pools = {a["id"]: a["remaining"] for a in await db.service.list_agreements(customer, None, 10)}
    assert pools == {sooner: 0, later: 200, not_yet: 900}

    await db.post(hour, item(org, 250, resource="r3"))  # 200 from later, 50 overage
    pools = {a["id"]: a["remaining"] for a in await db.service.list_agreements(customer, None, 10)}
    assert pools == {sooner: 0, later: 0, not_yet: 900}  # not_yet starts after the hour used
    assert await remaining(db, customer) == 300 + 500 + 900 - 850

    # A lower revision gives back: first what is owed as overage, then to the pools, last drawn first.
    await db.post(hour, item(org, 100, resource="r3", revision=2))  # -150
    pools = {a["id"]: a["remaining"] for a in await db.service.list_agreements(customer, None, 10)}
    assert pools == {sooner: 0, later: 100, not_yet: 900}
    assert await db.fetchval("SELECT balance FROM accounts WHERE customer_id = $1 AND name = 'overage'", customer) == 0


async def held_now(db: LedgerDB) -> list[tuple[datetime, str, int]]:
    """(reading hour, resource, revision) of every held charge, as the admin listing shows them."""
    page = await db.service.list_held(None, 100)
    assert page.next_cursor is None
    return [(h["reading_hour"], h["resource_id"], h["revision"]) for h in page.items]


async def test_a_charge_for_an_unassigned_org_is_held_then_posted_when_the_org_is_assigned(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer = await db.customer()
    org = f"org-{uuid.uuid4().hex[:8]}"
    early, late = datetime(2026, 6, 1, 12, tzinfo=UTC), datetime(2026, 6, 20, 12, tzinfo=UTC)
    result = await db.service.post_charges(
        [
            charges_batch(early, [item(org, Fraction(10, 3), resource="x")]),
            charges_batch(late, [item(org, Fraction(20, 3), resource="y")]),
        ]
    )
    assert result.held == 2 and result.transactions == 0
    await db.post(late, item(org, Fraction(50, 3), resource="y", revision=2))  # a newer revision replaces the held one
    await db.post(late, item(org, Fraction(1, 3), resource="y"))  # an older one changes nothing
    assert await held_now(db) == [(early, "x", 1), (late, "y", 2)]
    held = (await db.service.list_held(None, 10)).items
    assert [h["measurement_id"] for h in held] == [
        measurement_id(early, "cfapps", "x"),
        measurement_id(late, "cfapps", "y"),
    ]
    assert [(h["org_id"], h["price_id"], h["amount_numerator"], h["amount_denominator"]) for h in held] == [
        (org, PRICE_A, 10, 3),
        (org, PRICE_A, 50, 3),
    ]
    assert await posted_by_group(db, [customer]) == {}

    # Assigned from between the two hours: only the later charge is posted; the earlier one stays held.
    assigned = await db.service.assign_org(org, customer, datetime(2026, 6, 10, tzinfo=UTC))
    assert assigned.body["held_charges_posted"] == 1
    assert await posted_by_group(db, [customer]) == {(customer, "2026-06", PRICE_A): 16}  # floor(50/3)
    assert await held_now(db) == [(early, "x", 1)]

    await db.service.assign_org(org, customer, datetime(2026, 6, 1, tzinfo=UTC))
    assert await posted_by_group(db, [customer]) == {(customer, "2026-06", PRICE_A): 20}  # floor(10/3 + 50/3)
    assert await held_now(db) == []
    usage = [m for m in await outbox(db) if isinstance(m, TransactionPosted) and m.type == "usage"]
    assert {(u.org_id, u.microcredits) for m in usage for u in m.usage} == {(org, 16), (org, 4)}
    # Once posted, the held charges are like any other: their revisions again change nothing.
    again = await db.post(late, item(org, Fraction(50, 3), resource="y", revision=2))
    assert (again.changed, again.held, again.transactions) == (0, 0, 0)


async def test_the_periodic_task_posts_held_charges_whose_org_got_a_customer(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer = await db.customer()
    org = f"org-{uuid.uuid4().hex[:8]}"
    hour = datetime(2026, 7, 1, 12, tzinfo=UTC)
    # Held charges of several shards (a row per shard and org), one of them twice revised.
    resources = [f"app-{i}" for i in range(6)]
    await db.post(hour, *(item(org, 7, resource=r) for r in resources))
    await db.post(hour, item(org, 10, resource="app-0", revision=3))
    assert len({shard_of(r) for r in resources}) > 1
    # An assignment made without posting (e.g. a race with a batch being held): the sweep catches it.
    await db.fetch(
        "INSERT INTO org_assignments (org_id, starts_at, customer_id) VALUES ($1, $2, $3)", org, LONG_AGO, customer
    )
    posting = await db.service.post_resolvable_held()
    assert posting.transactions == 1 and posting.released == 6
    assert await posted_by_group(db, [customer]) == {(customer, "2026-07", PRICE_A): 5 * 7 + 10}
    assert await held_now(db) == []
    assert (await db.service.post_resolvable_held()).released == 0


async def test_month_close_posts_held_usage_whose_org_got_its_customer_first(ledger_db: LedgerDB) -> None:
    """Issue 17, item 7: charges held because their org's assignment was not there yet (a batch racing the
    assignment) belong in the month's statement: the close posts them before it states the month, so the
    statement holds them all and nothing of the month stays held."""
    db = ledger_db
    customer = await db.customer("Agency", await db.tier(1_000))
    org = f"org-{uuid.uuid4().hex[:8]}"
    april = datetime(2026, 4, 20, 15, tzinfo=UTC)
    last_hour_of_april = datetime(2026, 5, 1, 3, tzinfo=UTC)  # 23:00 in New York
    first_hour_of_may = datetime(2026, 5, 1, 4, tzinfo=UTC)
    await db.post(april, *(item(org, Fraction(7, 2), resource=f"app-{i}") for i in range(5)))  # 17.5
    await db.post(
        last_hour_of_april, item(org, 3, resource="db-1", kind="plan-small", price_id=PRICE_B), meter="cfservices"
    )
    await db.post(first_hour_of_may, item(org, 11, resource="app-0"))
    assert len(await held_now(db)) == 7
    async with db.pool.acquire() as conn:  # the assignment, without the release assign_org does
        await repo.insert_assignment(conn, org, customer, LONG_AGO)
    assert len(await held_now(db)) == 7

    closed = await db.service.close_month(date(2026, 4, 1))
    assert closed.statements == 1
    statement = await db.service.statement(customer, date(2026, 4, 1))
    assert (statement["used"], statement["closing_balance"]) == (17 + 3, -20)
    assert statement["used_by_kind"] == [
        {"meter": "cfapps", "resource_kind": "", "microcredits": 17, "price_id": PRICE_A,
         "original": None, "correction": None},
        {"meter": "cfservices", "resource_kind": "plan-small", "microcredits": 3, "price_id": PRICE_B,
         "original": None, "correction": None},
    ]
    # May's charge is not April's: still held, for the sweep (or May's close) to post.
    assert await held_now(db) == [(first_hour_of_may, "app-0", 1)]
    april_usage = [m for m in await outbox(db) if isinstance(m, TransactionPosted) and m.type == "usage"]
    assert {m.reading_hour for m in april_usage} == {april, last_hour_of_april}
    assert all(m.occurred_at == m.reading_hour for m in april_usage)  # posted into April, not late
    await db.service.post_resolvable_held()
    assert await posted_by_group(db, [customer]) == {
        (customer, "2026-04", PRICE_A): 17,
        (customer, "2026-04", PRICE_B): 3,
        (customer, "2026-05", PRICE_A): 11,
    }
    assert (await db.service.statement(customer, date(2026, 4, 1)))["used"] == 20  # a closed month does not change


async def test_the_completeness_counts_are_of_distinct_measurements_at_their_latest_revision(
    ledger_db: LedgerDB,
) -> None:
    """What ``GET /internal/completeness`` reports per hour and meter: charges posted (zero and unpriced ones
    included), held, and the sum of their revisions, each measurement once whatever its deliveries."""
    db = ledger_db
    customer = await db.customer()
    org, waiting = f"org-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    await db.service.assign_org(org, customer, LONG_AGO)
    hour = datetime(2026, 6, 3, 10, tzinfo=UTC)
    await db.post(
        hour, item(org, 5, resource="a"), item(org, 0, resource="b", price_id=None), item(waiting, 4, resource="h")
    )
    await db.post(
        hour, item(org, 6, resource="a", revision=2), item(org, 5, resource="a"), item(waiting, 4, resource="h")
    )
    await db.post(hour, item(waiting, 9, resource="h", revision=3), item(org, 0, resource="b", price_id=None))
    await db.post(hour, item(org, 1, resource="s", kind="plan"), meter="cfservices")
    await db.post(hour + timedelta(hours=1), item(org, 1, resource="a"))

    async def counts() -> list[tuple[datetime, str, int, int, int]]:
        async with db.pool.acquire() as conn:
            rows = await repo.completeness_counts(conn, hour, hour + timedelta(hours=2))
        return [(r["hour"], r["meter"], r["posted"], r["held"], r["revisions"]) for r in rows]

    assert await counts() == [
        (hour, "cfapps", 2, 1, 2 + 1 + 3),  # a at revision 2, b; h held at revision 3
        (hour, "cfservices", 1, 0, 1),
        (hour + timedelta(hours=1), "cfapps", 1, 0, 1),
    ]
    await db.service.assign_org(waiting, customer, LONG_AGO)
    assert (await counts())[0] == (hour, "cfapps", 3, 0, 6)


async def test_month_close_issues_statements_and_a_late_charge_posts_in_the_open_month(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await setup(db)
    await db.service.create_agreement(
        customer, datetime(2026, 2, 15, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), 5_000
    )
    march_hour = datetime(2026, 3, 20, 14, tzinfo=UTC)
    await db.service.post_charges(
        [
            charges_batch(march_hour, [item(org, Fraction(1001, 2), resource="m1")], meter="cfapps"),
            charges_batch(
                march_hour, [item(org, 300, resource="s1", kind="plan-small", price_id=PRICE_B)], meter="cfservices"
            ),
        ]
    )
    # The last hour of March in New York is 03:00 UTC on April 1; it belongs to March.
    await db.post(datetime(2026, 4, 1, 3, tzinfo=UTC), item(org, 99, resource="m2"))

    closed = await db.service.close_month(date(2026, 3, 1))
    assert closed.statements == 1 and not closed.already_closed
    again = await db.service.close_month(date(2026, 3, 1))
    assert again.already_closed and again.statements == 1
    statement = await db.service.statement(customer, date(2026, 3, 1))
    # Opening: funded on Feb 15 = 5000. March: 500 (floor 1001/2) + 99 on cfapps, 300 on cfservices.
    assert (statement["opening_balance"], statement["funded"], statement["used"], statement["expired"]) == (
        5_000,
        0,
        899,
        0,
    )
    assert statement["closing_balance"] == 4_101
    assert statement["used_by_kind"] == [
        {"meter": "cfapps", "resource_kind": "", "microcredits": 599, "price_id": PRICE_A,
         "original": None, "correction": None},
        {"meter": "cfservices", "resource_kind": "plan-small", "microcredits": 300, "price_id": PRICE_B,
         "original": None, "correction": None},
    ]
    issued = [m for m in await outbox(db) if isinstance(m, StatementIssued)]
    assert [(m.month, m.closing_balance) for m in issued] == [("2026-03", 4_101)]

    # A charge for March arriving after the close: late usage in April (the open month), original hour kept;
    # the March group's floor is still exact: floor(1001/2 + 3/2) = 502, so 2 more.
    await db.post(march_hour, item(org, Fraction(3, 2), resource="m3"))
    late = [m for m in await outbox(db) if isinstance(m, TransactionPosted) and m.type == "late_usage"]
    assert len(late) == 1
    assert late[0].reading_hour == march_hour
    assert late[0].occurred_at == datetime(2026, 4, 1, 4, tzinfo=UTC)  # April 1, 00:00 in New York
    assert [(u.microcredits, u.price_id) for u in late[0].usage] == [(2, PRICE_A)]
    assert (await posted_by_group(db, [customer]))[(customer, "2026-03", PRICE_A)] == 601
    assert (await db.service.statement(customer, date(2026, 3, 1)))["used"] == 899  # a closed month does not change

    await db.service.close_month(date(2026, 4, 1))
    april = await db.service.statement(customer, date(2026, 4, 1))
    assert (april["opening_balance"], april["used"], april["closing_balance"]) == (4_101, 2, 4_099)


async def test_closing_a_month_that_has_not_ended_or_funding_into_a_closed_one_is_refused(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, _ = await setup(db)
    db.clock.now = datetime(2026, 5, 31, 12, tzinfo=UTC)
    with pytest.raises(ConflictError, match="cannot be closed yet") as not_ended:
        await db.service.close_month(date(2026, 5, 1))
    assert not_ended.value.title == "Month not ended"
    await db.service.close_month(date(2026, 4, 1))
    with pytest.raises(ConflictError, match="2026-04 is closed"):
        await db.service.create_agreement(
            customer, datetime(2026, 4, 10, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC), 10
        )
    with pytest.raises(NotFoundError):
        await db.service.statement(customer, date(2026, 5, 1))


async def test_a_closed_month_accepts_no_transaction_and_moves_no_usage_between_customers(ledger_db: LedgerDB) -> None:
    """The rule (README, "What a closed month accepts"): nothing may be dated in or before a closed month
    that would change its statement, and usage posted in it never changes customer; usage never posted
    there (held for an org without a customer) may still be, as late usage in the first open month."""
    db = ledger_db
    customer, org = await setup(db)  # org: the customer's since LONG_AGO (January 2025, never closed)
    other = await db.customer("Bureau")
    april = datetime(2026, 4, 15, 14, tzinfo=UTC)
    waiting = f"org-{uuid.uuid4().hex[:8]}"
    await db.post(april, item(org, 70, resource="a1"), item(waiting, 30, resource="w1"))  # w1 held
    db.clock.now = datetime(2026, 5, 31, 12, tzinfo=UTC)
    await db.service.close_month(date(2026, 4, 1))
    statement = await db.service.statement(customer, date(2026, 4, 1))
    may_1 = datetime(2026, 5, 1, 4, tzinfo=UTC)  # midnight in New York: the end of April

    # Agreements: funded at their start, so not in a closed month nor before one (its opening balance).
    for starts_at in (datetime(2026, 4, 10, tzinfo=UTC), datetime(2026, 1, 15, tzinfo=UTC)):
        with pytest.raises(ConflictError, match="2026-04 is closed") as refused:
            await db.service.create_agreement(customer, starts_at, datetime(2026, 12, 1, tzinfo=UTC), 10)
        assert refused.value.title == "Month closed" and may_1.isoformat() in refused.value.detail
    assert (await db.service.create_agreement(customer, may_1, datetime(2026, 12, 1, tzinfo=UTC), 10)).created

    # Assignments: the org was the customer's in April; another customer cannot have it from then, nor from
    # any time before (that assignment would run through April), but from the end of April on.
    assignments_before = await db.fetch("SELECT * FROM org_assignments ORDER BY org_id, starts_at")
    for starts_at in (datetime(2026, 4, 20, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)):
        with pytest.raises(ConflictError, match="2026-04 is closed, and org") as refused:
            await db.service.assign_org(org, other, starts_at)
        assert refused.value.title == "Month closed" and str(customer) in refused.value.detail
    assert await db.fetch("SELECT * FROM org_assignments ORDER BY org_id, starts_at") == assignments_before
    await db.service.assign_org(org, customer, datetime(2026, 4, 20, tzinfo=UTC))  # the same customer: moves nothing
    await db.service.assign_org(org, other, may_1)

    # An org without a customer in April may get one from then: its held April usage posts late, in May.
    assigned = await db.service.assign_org(waiting, other, datetime(2026, 4, 1, 4, tzinfo=UTC))
    assert assigned.body["held_charges_posted"] == 1
    late = [m for m in await outbox(db) if isinstance(m, TransactionPosted) and m.customer_id == other]
    assert [(m.type, m.occurred_at, m.reading_hour, [u.microcredits for u in m.usage]) for m in late] == [
        ("late_usage", may_1, april, [30])
    ]
    assert await db.service.statement(customer, date(2026, 4, 1)) == statement
    assert await posted_by_group(db, [customer, other]) == {
        (customer, "2026-04", PRICE_A): 70,
        (other, "2026-04", PRICE_A): 30,
    }


async def test_months_close_automatically_after_the_delay(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await setup(db)
    await db.post(datetime(2026, 8, 15, tzinfo=UTC), item(org, 7))
    aug_end = datetime(2026, 9, 1, 4, tzinfo=UTC)
    db.clock.now = aug_end + timedelta(hours=95)
    assert (await db.service.close_due_months())[0] == 0
    db.clock.now = aug_end + timedelta(hours=96)
    count, _ = await db.service.close_due_months()
    assert count == 1
    assert (await db.service.statement(customer, date(2026, 8, 1)))["used"] == 7
    assert (await db.service.close_due_months())[0] == 0


async def test_each_alert_threshold_is_raised_once_when_first_crossed(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await setup(db)
    agreement = (await db.service.create_agreement(customer, JAN_1, datetime(2026, 12, 1, tzinfo=UTC), 1_000)).body[
        "id"
    ]
    hour = datetime(2026, 5, 5, 5, tzinfo=UTC)

    async def raised() -> list[tuple[int, int]]:
        return [(m.threshold_percent, m.used) for m in await outbox(db) if isinstance(m, AlertRaised)]

    steps = [
        (499, []),
        (1, [(50, 500)]),
        (249, [(50, 500)]),  # 749 used
        (1, [(50, 500), (75, 750)]),
        (150, [(50, 500), (75, 750), (90, 900)]),
        (99, [(50, 500), (75, 750), (90, 900)]),  # 999
        (1, [(50, 500), (75, 750), (90, 900), (100, 1_000)]),
        (500, [(50, 500), (75, 750), (90, 900), (100, 1_000)]),  # overage raises nothing more
    ]
    for i, (amount, expected) in enumerate(steps):
        await db.post(hour, item(org, amount, resource=f"r{i}"))
        assert await raised() == expected, f"after step {i}"
    alerts = [m for m in await outbox(db) if isinstance(m, AlertRaised)]
    assert {m.agreement_id for m in alerts} == {agreement} and {m.funded for m in alerts} == {1_000}
    assert {m.customer_id for m in alerts} == {customer}

    # Going back below a threshold and over it again raises nothing new.
    await db.post(hour, item(org, 0, resource="r7", revision=2))
    await db.post(hour, item(org, 500, resource="r7", revision=3))
    assert len(await raised()) == 4


async def test_crossing_several_thresholds_at_once_raises_each(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await setup(db)
    await db.service.create_agreement(customer, JAN_1, datetime(2026, 12, 1, tzinfo=UTC), 1_000)
    await db.post(datetime(2026, 5, 5, tzinfo=UTC), item(org, 950))
    assert sorted(m.threshold_percent for m in await outbox(db) if isinstance(m, AlertRaised)) == [50, 75, 90]


async def test_a_reversal_mirrors_a_transaction_once(ledger_db: LedgerDB) -> None:
    db = ledger_db
    customer, org = await setup(db)
    funding = (await db.service.create_agreement(customer, JAN_1, datetime(2026, 12, 1, tzinfo=UTC), 1_000)).body
    await db.post(datetime(2026, 5, 5, tzinfo=UTC), item(org, 400, resource="r"))
    usage_id = next(m.id for m in await outbox(db) if isinstance(m, TransactionPosted) and m.type == "usage")

    reversal = await db.service.reverse(usage_id, "billing error")
    assert reversal.created
    assert reversal.body["type"] == "reversal" and reversal.body["reverses"] == usage_id
    assert {(e["account"], e["side"], e["amount"]) for e in reversal.body["entries"]} == {
        ("usage", "debit", 400),
        (f"credit_pool:{funding['id']}", "credit", 400),
    }
    assert [u["microcredits"] for u in reversal.body["usage"]] == [-400]
    assert (await db.service.balance(customer, None))["remaining"] == 1_000

    again = await db.service.reverse(usage_id, "")
    assert not again.created and again.body["id"] == reversal.body["id"]
    with pytest.raises(ConflictError):
        await db.service.reverse(reversal.body["id"], "")
    with pytest.raises(NotFoundError):
        await db.service.reverse(uuid.uuid4(), "")
    with pytest.raises(NotFoundError):
        await db.service.balance(uuid.uuid4(), None)
