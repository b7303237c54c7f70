"""Corrections of closed months in the ledger (issue 18, item 3; docs/corrections.md), on the real database
and, for the consumer, the command and what is published, the real broker.

A re-rating's revisions (batches carrying ``correction``) of a closed month post their difference as a
``correction`` transaction dated at the start of the first open month, naming the month; revisions without
it stay late usage. The month then gets amended statements (version 2, 3, ...) once the quiet period has
passed, each line (meter, kind, price) saying original, correction and amended figures; earlier versions
are kept and listed. Every expected figure is computed here from the charges' exact amounts and the
independent ``reference_f`` (tests/support/price_models.py), never read from the code under test.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any

import msgspec
import orjson
import pytest

from shared.batches import Charges, Correction
from shared.contracts import StatementIssued, TransactionPosted
from shared.ids import NAMESPACE
from shared.topics import TRANSACTIONS
from tests.integration.test_ledger_http import (
    is_problem,
    make_customer,
    posted,
    read_topic,
    running,
    settings_for,
)
from tests.support.ledger import (  # noqa: F401  (fixtures)
    LONG_AGO,
    PRICE_B,
    ChargeItem,
    LedgerDB,
    banded_price,
    charges_batches,
    delivered,
    item,
    ledger_db,
    ledger_topics,
    publish_charges,
    remaining,
    usage,
)
from tests.support.price_models import RawBand, floor_of, reference_f
from tests.support.tokens import LocalIssuer

pytestmark = pytest.mark.integration

FEB = datetime(2026, 2, 10, 14, tzinfo=UTC)
FEB_2 = FEB + timedelta(hours=1)
MARCH = datetime(2026, 3, 10, 14, tzinfo=UTC)
MARCH_OPENS = datetime(2026, 3, 1, 5, tzinfo=UTC)  # midnight in New York
FEBRUARY = date(2026, 2, 1)
END = datetime(2027, 1, 1, tzinfo=UTC)
CLOSED_AT = datetime(2026, 3, 5, 12, tzinfo=UTC)  # the service's clock when February closes

GRADUATED: list[RawBand] = [(Fraction(1000), 0, 0), (Fraction(4001, 2), 1370, 250), (None, 1000, 0)]
GRADUATED_FIXED: list[RawBand] = [(Fraction(1000), 0, 0), (None, 900, 100)]


def f(model: str, bands: list[RawBand], units: Fraction) -> int:
    return floor_of(reference_f(model, bands, units))


def corrected(batches: list[Charges], job: uuid.UUID, reason: str) -> list[Charges]:
    """Batches as a re-rating publishes them: marked with the job and its reason."""
    return [msgspec.structs.replace(b, correction=Correction(job, reason)) for b in batches]


async def post(db: LedgerDB, charges: list[tuple[datetime, ChargeItem]], fix: tuple[uuid.UUID, str] | None) -> None:
    batches = charges_batches(charges)
    await db.service.post_charges(delivered(corrected(batches, *fix) if fix else batches))


async def lines_by(db: LedgerDB, customer: uuid.UUID, kind: str) -> dict[uuid.UUID, int]:
    """Usage lines of the customer's transactions of ``kind``, summed per price."""
    rows = await db.fetch(
        """SELECT u.price_id, sum(u.microcredits)::bigint AS s FROM usage_lines u
             JOIN transactions t ON t.id = u.transaction_id
            WHERE t.customer_id = $1 AND t.type = $2 GROUP BY u.price_id""",
        customer,
        kind,
    )
    return {r["price_id"]: r["s"] for r in rows if r["s"]}


async def outbox_messages(db: LedgerDB) -> list[TransactionPosted | StatementIssued]:
    rows = await db.fetch("SELECT payload FROM outbox ORDER BY id")
    out: list[TransactionPosted | StatementIssued] = []
    for r in rows:
        doc = orjson.loads(r["payload"])
        if doc.get("schema_name") == "ledger.statement":
            out.append(StatementIssued.model_validate_json(r["payload"]))
        elif doc.get("schema_name") == "ledger.transaction":
            out.append(TransactionPosted.model_validate_json(r["payload"]))
    return out


def lines_of(statement: dict[str, Any]) -> dict[uuid.UUID | None, tuple[int | None, int | None, int]]:
    """(original, correction, microcredits) per price of a statement's cfapps lines."""
    return {
        line["price_id"]: (line["original"], line["correction"], line["microcredits"])
        for line in statement["used_by_kind"]
    }


async def test_a_price_corrected_after_the_month_closed_posts_corrections_and_amends_the_statement(
    ledger_db: LedgerDB,
) -> None:
    db = ledger_db
    org = f"org-{uuid.uuid4().hex[:6]}"
    customer = await db.customer()
    await db.service.assign_org(org, customer, LONG_AGO)
    await db.service.create_agreement(customer, LONG_AGO, END, 10**9)

    # February: a flat price (exact amounts) and a graduated one (units = value / 4), over two hours.
    flat_old, flat_new, flat_newer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    grad_old = banded_price(uuid.uuid4(), "graduated", GRADUATED, unit=4)
    grad_new = banded_price(uuid.uuid4(), "graduated", GRADUATED_FIXED, unit=4)
    flat_amounts = {"app-1": Fraction(1001, 2), "app-2": Fraction(700, 3)}
    values = {"gr-1": 4 * 1200, "gr-2": 4 * 900 + 2}
    hour_of = {"app-1": FEB, "app-2": FEB_2, "gr-1": FEB, "gr-2": FEB_2}
    await post(
        db,
        [(hour_of[r], item(org, a, resource=r, price_id=flat_old)) for r, a in flat_amounts.items()]
        + [(hour_of[r], usage(org, v, grad_old, resource=r)) for r, v in values.items()],
        None,
    )
    # A March charge, open month: its re-rating below stays ordinary usage.
    await db.post(MARCH, item(org, 10, resource="app-9", price_id=flat_old))
    db.clock.now = CLOSED_AT
    await db.service.close_month(FEBRUARY)
    first = await db.service.statement(customer, FEBRUARY)

    units = sum((Fraction(v, 4) for v in values.values()), Fraction(0))
    flat_before = floor_of(sum(flat_amounts.values(), Fraction(0)))
    grad_before = f("graduated", GRADUATED, units)
    assert (flat_before, units) == (733, Fraction(4201, 2))  # floor(4403/6); 1200 + 900.5 units
    assert first["version"] == 1 and first["versions"] == [
        {"version": 1, "id": first["id"], "issued_at": CLOSED_AT, "used": flat_before + grad_before, "correction": None}
    ]
    assert lines_of(first) == {flat_old: (None, None, flat_before), grad_old.id: (None, None, grad_before)}
    before = await remaining(db, customer)

    # Re-rating 1: both prices corrected for February (new price ids, revision 2), the March charge too; in the
    # same posting, an ordinary late charge of another meter (no re-rating): late usage as before.
    job, reason = uuid.uuid4(), "cfapps was priced with last year's rates"
    new_amounts = {"app-1": Fraction(2002, 3), "app-2": Fraction(350, 3)}
    db.clock.now = fixed_at = CLOSED_AT + timedelta(hours=1)
    await post(
        db,
        [(hour_of[r], item(org, a, resource=r, revision=2, price_id=flat_new)) for r, a in new_amounts.items()]
        + [(hour_of[r], usage(org, v, grad_new, resource=r, revision=2)) for r, v in values.items()]
        + [(MARCH, item(org, 12, resource="app-9", revision=2, price_id=flat_new))],
        (job, reason),
    )
    await db.service.post_charges(
        delivered(charges_batches([item(org, Fraction(7, 2), resource="db-1", price_id=PRICE_B)], FEB,
                                  meter="cfservices"))
    )

    flat_after = floor_of(sum(new_amounts.values(), Fraction(0)))
    grad_after = f("graduated", GRADUATED_FIXED, units)
    assert flat_after == 784
    expected = {
        flat_old: -flat_before,
        flat_new: flat_after,
        grad_old.id: -grad_before,
        grad_new.id: grad_after,
    }
    assert await lines_by(db, customer, "correction") == expected
    assert await lines_by(db, customer, "late_usage") == {PRICE_B: 3}  # floor(7/2), no re-rating
    march = await db.fetch(
        """SELECT t.type, u.price_id, u.microcredits FROM usage_lines u JOIN transactions t ON t.id = u.transaction_id
            WHERE t.customer_id = $1 AND t.reading_hour = $2""",
        customer,
        MARCH,
    )
    assert sorted(tuple(r) for r in march) == sorted(  # the open month's re-rating is ordinary usage
        [("usage", flat_old, 10), ("usage", flat_old, -10), ("usage", flat_new, 12)]
    )
    correction_total = sum(expected.values())
    assert await remaining(db, customer) == before - correction_total - 3 - 2  # -2: March's revision 10 -> 12

    rows = await db.fetch(
        """SELECT occurred_at, reading_hour, description, corrects_month, posted_at FROM transactions
            WHERE customer_id = $1 AND type = 'correction' ORDER BY reading_hour""",
        customer,
    )
    assert [r["reading_hour"] for r in rows] == [FEB, FEB_2]  # one per (customer, hour) of the re-rating
    for r in rows:
        assert (r["occurred_at"], r["description"], r["corrects_month"], r["posted_at"]) == (
            MARCH_OPENS, f"correction {job}: {reason}", FEBRUARY, fixed_at
        )
    assert await db.fetchval(
        "SELECT count(*) FROM transactions WHERE type <> 'correction' AND corrects_month IS NOT NULL"
    ) == 0
    published = [m for m in await outbox_messages(db) if isinstance(m, TransactionPosted) and m.type == "correction"]
    assert sorted((m.reading_hour, m.corrects_month, m.occurred_at) for m in published) == [
        (FEB, "2026-02", MARCH_OPENS), (FEB_2, "2026-02", MARCH_OPENS)
    ]
    assert sum(u.microcredits for m in published for u in m.usage) == correction_total

    # The amended statement waits for the quiet period (60 s by default) after the last correction.
    db.clock.now = fixed_at + timedelta(seconds=30)
    assert await db.service.amend_statements() == ([], [])
    db.clock.now = amended_at = fixed_at + timedelta(seconds=61)
    issued, _ = await db.service.amend_statements()
    v2_id = uuid.uuid5(NAMESPACE, f"statement|{customer}|2026-02|v2")
    assert issued == [{"customer_id": customer, "month": "2026-02", "version": 2, "id": v2_id}]
    second = await db.service.statement(customer, FEBRUARY)
    assert (second["version"], second["id"], second["issued_at"]) == (2, v2_id, amended_at)
    assert lines_of(second) == {
        flat_old: (flat_before, -flat_before, 0),
        flat_new: (0, flat_after, flat_after),
        grad_old.id: (grad_before, -grad_before, 0),
        grad_new.id: (0, grad_after, grad_after),
    }
    assert (second["original_used"], second["correction"], second["used"]) == (
        flat_before + grad_before, correction_total, flat_after + grad_after
    )
    for field in ("opening_balance", "funded", "expired", "closing_balance"):
        assert second[field] == first[field], field  # the balance effect is March's
    assert second["reasons"] == [f"correction {job}: {reason}"]
    assert await db.service.amend_statements() == ([], [])  # nothing new: nothing issued

    # Re-rating 2: the flat price corrected again. Version 3 holds both corrections; 1 and 2 stay as they were.
    job_2, reason_2 = uuid.uuid4(), "the corrected rate was itself wrong"
    newer_amounts = {"app-1": Fraction(1000), "app-2": Fraction(1, 3)}
    db.clock.now = fixed_again = amended_at + timedelta(days=1)
    await post(
        db,
        [(hour_of[r], item(org, a, resource=r, revision=3, price_id=flat_newer)) for r, a in newer_amounts.items()],
        (job_2, reason_2),
    )
    flat_last = floor_of(sum(newer_amounts.values(), Fraction(0)))
    assert flat_last == 1000
    assert (await lines_by(db, customer, "correction"))[flat_newer] == flat_last
    assert flat_new not in await lines_by(db, customer, "correction")  # +784 then -784
    db.clock.now = fixed_again + timedelta(seconds=10)
    assert await db.service.amend_statements() == ([], [])
    db.clock.now = fixed_again + timedelta(seconds=60)
    assert [i["version"] for i in (await db.service.amend_statements())[0]] == [3]
    third = await db.service.statement(customer, FEBRUARY)
    assert lines_of(third) == {  # the flat_new line nets to nothing in all and is left out
        flat_old: (flat_before, -flat_before, 0),
        flat_newer: (0, flat_last, flat_last),
        grad_old.id: (grad_before, -grad_before, 0),
        grad_new.id: (0, grad_after, grad_after),
    }
    assert (third["original_used"], third["correction"], third["used"]) == (
        flat_before + grad_before, flat_last - flat_before + grad_after - grad_before, flat_last + grad_after
    )
    assert third["reasons"] == [f"correction {job}: {reason}", f"correction {job_2}: {reason_2}"]
    assert [v["version"] for v in third["versions"]] == [1, 2, 3]
    assert [v["correction"] for v in third["versions"]] == [None, correction_total, third["correction"]]
    again = {n: await db.service.statement(customer, FEBRUARY, n) for n in (1, 2)}
    assert {k: v for k, v in again[1].items() if k != "versions"} == {k: v for k, v in first.items() if k != "versions"}
    assert {k: v for k, v in again[2].items() if k != "versions"} == {
        k: v for k, v in second.items() if k != "versions"
    }
    statements = [m for m in await outbox_messages(db) if isinstance(m, StatementIssued)]
    assert [(m.version, m.used, m.original_used, m.correction) for m in statements] == [
        (1, flat_before + grad_before, None, None),
        (2, second["used"], flat_before + grad_before, correction_total),
        (3, third["used"], flat_before + grad_before, third["correction"]),
    ]


async def test_the_consumer_posts_a_correction_and_the_amend_command_publishes_version_2_once(
    database: Any, infra: Any, ledger_topics: str, issuer: LocalIssuer
) -> None:
    settings = settings_for(database, infra, ledger_topics, issuer).model_copy(update={"amend_quiet_seconds": 0})
    async with running(settings, issuer) as client:
        customer = await make_customer(client, credits=10**6)
        org = f"org-{uuid.uuid4().hex[:6]}"
        assert (await client.post("/internal/org-assignments", json={
            "org_id": org, "customer_id": customer, "starts_at": "2026-01-01T00:00:00Z"
        })).status_code == 201
        assert (await client.post("/internal/agreements", json={
            "customer_id": customer, "starts_at": "2026-01-01T05:00:00Z", "ends_at": "2027-01-01T05:00:00Z"
        })).status_code == 201
        old, new = uuid.uuid4(), uuid.uuid4()
        await publish_charges(infra.kafka, ledger_topics, charges_batches(
            [item(org, Fraction(301, 2), resource="app-1", price_id=old)], FEB
        ))
        topic = ledger_topics + TRANSACTIONS

        def seen(kind: str) -> Any:
            return lambda records: any(isinstance(m, TransactionPosted) and m.type == kind for m in posted(records))

        await read_topic(infra.kafka, topic, seen("usage"))
        assert (await client.post("/internal/months/2026-02/close")).status_code == 201
        job = uuid.uuid4()
        await publish_charges(infra.kafka, ledger_topics, corrected(
            charges_batches([item(org, Fraction(1201, 3), resource="app-1", revision=2, price_id=new)], FEB),
            job, "wrong rate",
        ))
        records = await read_topic(infra.kafka, topic, seen("correction"))
        (fix,) = [m for m in posted(records) if isinstance(m, TransactionPosted) and m.type == "correction"]
        assert (fix.corrects_month, fix.description, fix.occurred_at) == (
            "2026-02", f"correction {job}: wrong rate", MARCH_OPENS
        )
        assert sorted((u.price_id, u.microcredits) for u in fix.usage) == sorted([(old, -150), (new, 400)])

        key = {"Idempotency-Key": f"amend-{uuid.uuid4()}"}
        amended = await client.post("/internal/statements/amend", headers=key)
        assert amended.status_code == 200, amended.text
        v2 = str(uuid.uuid5(NAMESPACE, f"statement|{customer}|2026-02|v2"))
        assert amended.json() == {"issued": [{"month": "2026-02", "customer_id": customer, "version": 2, "id": v2}]}
        replay = await client.post("/internal/statements/amend", headers=key)  # a retry: the same answer
        assert replay.json() == amended.json() and replay.headers.get("Idempotent-Replayed") == "true"
        assert (await client.post("/internal/statements/amend")).json() == {"issued": []}  # nothing new is due

        latest = (await client.get(f"/internal/customers/{customer}/statements/2026-02")).json()
        assert (latest["version"], latest["original_used"], latest["correction"], latest["used"]) == (
            2, 150, 250, 400
        )
        assert [v["version"] for v in latest["versions"]] == [1, 2]
        one = (await client.get(f"/internal/customers/{customer}/statements/2026-02", params={"version": 1})).json()
        assert (one["version"], one["used"], one["used_by_kind"][0]["price_id"]) == (1, 150, str(old))
        for bad, status in (("3", 404), ("0", 422), ("x", 422)):
            answer = await client.get(f"/internal/customers/{customer}/statements/2026-02", params={"version": bad})
            assert is_problem(answer, status), (bad, answer.text)

        records = await read_topic(
            infra.kafka, topic, lambda r: sum(isinstance(m, StatementIssued) for m in posted(r)) >= 2
        )
        statements = [m for m in posted(records) if isinstance(m, StatementIssued)]
        assert [(s.version, s.used, s.original_used, s.correction, str(s.id)) for s in statements] == [
            (1, 150, None, None, str(uuid.uuid5(NAMESPACE, f"statement|{customer}|2026-02"))),
            (2, 400, 150, 250, v2),
        ]
        assert sorted((x.price_id, x.original, x.correction, x.microcredits) for x in statements[1].used_by_kind) == (
            sorted([(old, 150, -150, 0), (new, 0, 400, 400)])
        )
        assert statements[1].reasons == [f"correction {job}: wrong rate"]
