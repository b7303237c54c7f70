"""The api's side of price models and of corrections of closed months (real Kafka and PostgreSQL).

- Usage of a graduated or volume price (amount 0/1 in usage.charges.v3: its money depends on the customer's
  month total) is answered per space and resource with its units, ``priced: "monthly"`` and no money, and
  per org and kind with the money the ledger's usage lines posted for it; flat usage is answered as before.
- A measurement the ledger dead-lettered on usage.charges.v2.dlq (still drained) is counted.
- Correction transactions are listed with the month they restate; every version of a month's statement is
  stored and answered (latest, ``?version=n``, the list of versions); the dashboard shows the versions and
  the corrections; an amended statement (version 2) is delivered to a webhook as ``statement.amended``
  with a valid signature, version 1 as ``statement.issued``.

Expected figures are computed here from the inputs (``reference_f`` for the graduated price), never copied
from an answer.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import msgspec
import pytest

from cli.webhook_receiver import Received, receiver_app
from services.api import dead_letters
from shared.batches import Band, Charges, Price, encode_charges
from shared.contracts import EntryLine, StatementIssued, StatementLine, TransactionPosted, UsageLine
from shared.kafka import Outgoing
from shared.topics import CHARGES, CHARGES_V2, dlq
from tests.conftest import Database, Infra
from tests.integration.test_api_read_model import get, walk
from tests.integration.test_webhooks import receiver
from tests.support.api_factories import batches, charge, txn
from tests.support.api_harness import ApiHarness, harness, running_api  # noqa: F401  (fixture)
from tests.support.price_models import reference_f

pytestmark = pytest.mark.integration

C = uuid.UUID(int=0xC0DE)
H = datetime(2026, 10, 7, 14, tzinfo=UTC)  # Oct 7, 10:00 in New York
GRADUATED = uuid.UUID(int=0x6AD)
BANDS = [Band(up_to="500", microcredits_per_unit=0), Band(up_to=None, microcredits_per_unit=3, flat_fee=7)]
RAW_BANDS = [(Fraction(500), 0, 0), (None, 3, 7)]
FLAT_RATE = Fraction(1_000_000, 730)


def graduated_batches(items: list[Any]) -> list[Charges]:
    """Items of the graduated price, as the pricer publishes them: amount 0/1, the price with its bands."""
    price = Price(id=GRADUATED, microcredits_per_unit=0, unit=1, model="graduated", bands=BANDS)
    return [msgspec.structs.replace(b, prices=[price]) for b in batches(items)]


def usage_txn(hour: datetime, lines: list[UsageLine]) -> TransactionPosted:
    """The ledger's usage transaction of an hour, as it posts it: the usage account credited."""
    total = sum(line.microcredits for line in lines)
    tid = uuid.uuid4()
    return TransactionPosted(
        id=tid, customer_id=C, type="usage", occurred_at=hour, reading_hour=hour, description="usage",
        idempotency_key=f"usage:{tid}",
        entries=[EntryLine(account="credit_pool:a", side="debit", amount=total),
                 EntryLine(account="usage", side="credit", amount=total)],
        usage=lines, posted_at=hour,
    )


def exact_of(item: dict[str, Any]) -> Fraction | None:
    if item["microcredits_exact"] is None:
        assert item["microcredits"] is None and item["credits"] is None
        return None
    n, d = item["microcredits_exact"].split("/")
    assert item["microcredits"] == int(n) // int(d)
    return Fraction(int(n), int(d))


async def test_graduated_usage_is_answered_with_units_per_space_and_resource_and_the_ledgers_money_per_org(
    harness: ApiHarness,
) -> None:
    h = harness
    flat = charge(H, "app-flat", org="org-1", space="space-a", value=100, amount=FLAT_RATE * 100)
    g1 = charge(H, "app-g1", org="org-1", space="space-a", kind="task", value=300, amount=Fraction(0))
    g2 = charge(H, "app-g2", org="org-1", space="space-b", kind="task", value=500, amount=Fraction(0))
    g_later = charge(H + timedelta(hours=1), "app-g1", org="org-1", space="space-a", kind="task", value=250,
                     amount=Fraction(0))
    # The ledger posts the month's f-difference of the graduated group hour by hour; the hours sum to
    # floor(f(total units)).
    posted_1 = reference_f("graduated", RAW_BANDS, Fraction(800))  # 300 * 3 + 7
    posted_2 = reference_f("graduated", RAW_BANDS, Fraction(1050)) - posted_1
    flat_line = FLAT_RATE * 100
    ledger = [
        usage_txn(H, [UsageLine(org_id="org-1", meter="cfapps", microcredits=int(flat_line)),
                      UsageLine(org_id="org-1", meter="cfapps", resource_kind="task", price_id=GRADUATED,
                                microcredits=int(posted_1))]),
        usage_txn(H + timedelta(hours=1), [UsageLine(org_id="org-1", meter="cfapps", resource_kind="task",
                                                     price_id=GRADUATED, microcredits=int(posted_2))]),
    ]
    await h.project([*batches([flat]), *graduated_batches([g1, g2]), *graduated_batches([g_later])], ledger)

    headers = h.headers(customers=[str(C)])
    path = f"/v1/customers/{C}/usage"
    day = {"from": "2026-10-07T04:00:00Z", "to": "2026-10-08T04:00:00Z", "granularity": "day"}

    def cells(items: list[dict[str, Any]], key: str) -> dict[tuple[str, str], tuple[dict[str, int], Any]]:
        out = {}
        for it in items:
            k = (it["group"][key] if "," not in key else tuple(it["group"][p] for p in key.split(",")), it["priced"])
            assert k not in out
            out[k] = ({q["unit"]: q["value"] for q in it["quantities"]}, exact_of(it))
        return out

    by_space = cells(await walk(h, path, headers, 1, **day, group_by="space"), "space_id")
    assert by_space == {
        ("space-a", "exact"): ({"MB": 100}, FLAT_RATE * 100),
        ("space-a", "monthly"): ({"MB": 300 + 250}, None),
        ("space-b", "monthly"): ({"MB": 500}, None),
    }
    by_resource = cells(await walk(h, path, headers, 1, **day, group_by="resource"), "resource_id")
    assert by_resource == {
        ("app-flat", "exact"): ({"MB": 100}, FLAT_RATE * 100),
        ("app-g1", "monthly"): ({"MB": 550}, None),
        ("app-g2", "monthly"): ({"MB": 500}, None),
    }
    # per hour, resources are read from the shard documents: the same marking
    hour_q = {"from": "2026-10-07T14:00:00Z", "to": "2026-10-07T15:00:00Z", "granularity": "hour"}
    hourly = cells(await walk(h, path, headers, 10, **hour_q, group_by="resource"), "resource_id")
    assert hourly == {
        ("app-flat", "exact"): ({"MB": 100}, FLAT_RATE * 100),
        ("app-g1", "monthly"): ({"MB": 300}, None),
        ("app-g2", "monthly"): ({"MB": 500}, None),
    }
    # per org and kind: the money the ledger posted for the graduated usage, never 0
    by_org = cells(await walk(h, path, headers, 1, **day, group_by="org"), "org_id")
    assert by_org == {
        ("org-1", "exact"): ({"MB": 100}, FLAT_RATE * 100),
        ("org-1", "monthly"): ({"MB": 1050}, posted_1 + posted_2),
    }
    assert posted_1 + posted_2 == reference_f("graduated", RAW_BANDS, Fraction(1050)) > 0
    by_kind = cells(await walk(h, path, headers, 10, **day, group_by="kind"), "meter,resource_kind")
    assert by_kind == {
        (("cfapps", ""), "exact"): ({"MB": 100}, FLAT_RATE * 100),
        (("cfapps", "task"), "monthly"): ({"MB": 1050}, posted_1 + posted_2),
    }
    hourly_org = cells(await walk(h, path, headers, 10, **hour_q, group_by="org"), "org_id")
    assert hourly_org[("org-1", "monthly")] == ({"MB": 800}, posted_1)

    # The dashboard labels them the same way: units of the spaces, no money of their own.
    token = headers["authorization"].removeprefix("Bearer ")
    cookie = {"cookie": f"billing_dashboard_token={token}"}
    page = await h.client.get(f"/dashboard/customers/{C}", params={"month": "2026-10", "org": "org-1"}, headers=cookie)
    assert page.status_code == 200, page.text
    assert 'id="usage-monthly"' in page.text
    assert '<tr data-key="space-a" data-priced="monthly">' in page.text and f"{550:,} MB" in page.text
    assert '<tr data-key="space-b" data-priced="monthly">' in page.text and f"{500:,} MB" in page.text
    by_org_page = await h.client.get(f"/dashboard/customers/{C}", params={"month": "2026-10"}, headers=cookie)
    assert by_org_page.status_code == 200
    total = FLAT_RATE * 100 + posted_1 + posted_2  # the org's credits: flat exact + what the ledger posted
    assert f'data-microcredits-exact="{total.numerator}/{total.denominator}"' in by_org_page.text
    assert f"{1050:,} MB" in by_org_page.text


async def test_a_measurement_dead_lettered_on_the_v2_charges_dlq_is_counted(harness: ApiHarness) -> None:
    h = harness
    (bad,) = batches([charge(H, "app-dead", org="org-1", value=1)])
    body = encode_charges(bad).replace(b'"schema_version":3', b'"schema_version":2')
    ledger_group = h.settings.topic("ledger")
    await h.publisher.publish(
        dlq(h.settings.topic(CHARGES_V2)),
        [Outgoing(b"k", body, (("dlq.group", ledger_group.encode()), ("dlq.reason", b"invalid")))],
    )
    _, at_ledger = await dead_letters.count_for_report(
        h.settings.kafka_bootstrap_servers, h.settings.topic, H, H + timedelta(hours=1)
    )
    topics = {c.topic: c for c in at_ledger}
    assert set(topics) == {dlq(h.settings.topic(CHARGES)), dlq(h.settings.topic(CHARGES_V2))}
    v2 = topics[dlq(h.settings.topic(CHARGES_V2))]
    assert v2.by_row == {(H, "cfapps"): 1} and v2.counted == 1 and v2.complete
    assert topics[dlq(h.settings.topic(CHARGES))].by_row == {}


def statement_version(month: str, version: int, lines: list[tuple[str, str, int, int]], reasons: list[str],
                      issued_at: datetime) -> StatementIssued:
    """Version ``version`` of a month's statement: lines (meter, kind, original, correction), version 1
    with no correction figures; balances are version 1's (opening 0, funded 10 credits)."""
    original = sum(o for _, _, o, _ in lines)
    correction = sum(c for _, _, _, c in lines)
    amended = version > 1
    ns = uuid.UUID(int=0x57A7)
    return StatementIssued(
        id=uuid.uuid5(ns, f"statement|{C}|{month}" + (f"|v{version}" if amended else "")),
        customer_id=C, month=month, opening_balance=0, funded=10_000_000,
        used=original + correction if amended else original, expired=0, closing_balance=10_000_000 - original,
        used_by_kind=[
            StatementLine(meter=m, resource_kind=k, microcredits=o + c if amended else o,
                          original=o if amended else None, correction=c if amended else None)
            for m, k, o, c in lines
        ],
        issued_at=issued_at, version=version,
        original_used=original if amended else None, correction=correction if amended else None,
        reasons=reasons,
    )


def correction_txn(month: str, job: uuid.UUID, reason: str, lines: list[tuple[str, int]],
                   occurred_at: datetime) -> TransactionPosted:
    """A correction as the ledger posts it: dated in the first open month, the difference per line (a
    negative line gives credits back: the usage account is debited)."""
    net = sum(m for _, m in lines)
    up, down = sum(m for _, m in lines if m > 0), -sum(m for _, m in lines if m < 0)
    entries = [e for e in (
        EntryLine(account="usage", side="credit", amount=up) if up else None,
        EntryLine(account="usage", side="debit", amount=down) if down else None,
        EntryLine(account="credit_pool:a", side="debit", amount=net) if net > 0 else None,
        EntryLine(account="credit_pool:a", side="credit", amount=-net) if net < 0 else None,
    ) if e is not None]
    tid = uuid.uuid4()
    return TransactionPosted(
        id=tid, customer_id=C, type="correction", occurred_at=occurred_at, reading_hour=None,
        description=f"correction {job}: {reason}", idempotency_key=f"correction:{tid}", entries=entries,
        usage=[UsageLine(org_id="org-1", meter=m, microcredits=x) for m, x in lines], posted_at=occurred_at,
        corrects_month=month,
    )


async def test_statement_versions_and_corrections_are_stored_answered_and_shown(harness: ApiHarness) -> None:
    h = harness
    nov1 = datetime(2026, 11, 1, 4, tzinfo=UTC)  # the first open month after October closed
    funding = txn(C, "funding", 10_000_000, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC))
    originals = [("cfapps", "", 2_000_000), ("cfservices", "db", 500_000)]
    job1, job2 = uuid.uuid4(), uuid.uuid4()
    r1, r2 = "cfapps memory price was 10% too high", "database price corrected"
    c1 = correction_txn("2026-10", job1, r1, [("cfapps", -200_000)], nov1 + timedelta(hours=1))
    c2 = correction_txn("2026-10", job2, r2, [("cfservices", 125_000)], nov1 + timedelta(hours=2))
    corr = {"cfapps": -200_000, "cfservices": 125_000}
    v1 = statement_version("2026-10", 1, [(m, k, o, 0) for m, k, o in originals], [], nov1)
    v2 = statement_version("2026-10", 2, [(m, k, o, corr["cfapps"] if m == "cfapps" else 0) for m, k, o in originals],
                           [r1], nov1 + timedelta(hours=1, minutes=2))
    v3 = statement_version("2026-10", 3, [(m, k, o, corr[m]) for m, k, o in originals], [r1, r2],
                           nov1 + timedelta(hours=2, minutes=2))
    # delivered out of order and twice: every version is kept once
    await h.project([], [funding, v1, c1, v3, c2, v2, v3])

    headers = h.headers(customers=[str(C)])
    base = f"/v1/customers/{C}/statements/2026-10"
    latest = await get(h, base, headers)
    assert (latest["version"], latest["statement_id"]) == (3, str(v3.id))
    original_used = sum(o for _, _, o in originals)
    assert (latest["original_used"], latest["correction"], latest["used"]) == (
        original_used, -200_000 + 125_000, original_used - 200_000 + 125_000
    )
    assert (latest["opening_balance"], latest["closing_balance"]) == (0, 10_000_000 - original_used)
    assert latest["reasons"] == [r1, r2]
    assert [(u["meter"], u["original"], u["correction"], u["microcredits"]) for u in latest["used_by_kind"]] == [
        (m, o, corr[m], o + corr[m]) for m, _, o in originals
    ]
    assert [(v["version"], v["statement_id"], v["used"], v["correction"]) for v in latest["versions"]] == [
        (1, str(v1.id), original_used, None),
        (2, str(v2.id), original_used - 200_000, -200_000),
        (3, str(v3.id), original_used - 75_000, -75_000),
    ]
    first = await get(h, base, headers, version=1)
    assert (first["version"], first["used"], first["correction"], first["original_used"]) == (
        1, original_used, None, None
    )
    assert first["versions"] == latest["versions"]
    second = await get(h, base, headers, version=2)
    assert (second["version"], second["used"], second["reasons"]) == (2, original_used - 200_000, [r1])
    for bad, status in (("4", 404), ("0", 422), ("two", 422), ("-1", 422)):
        r = await h.client.get(base, params={"version": bad}, headers=headers)
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json", (bad, r.text)
    r = await h.client.get(f"/v1/customers/{C}/statements/2026-09", params={"version": "1"}, headers=headers)
    assert r.status_code == 404

    # The corrections are transactions of their own, naming the month they restate; the balance moved by
    # exactly their sum.
    listed = await walk(h, f"/v1/customers/{C}/transactions", headers, 2, type="correction")
    assert {(t["id"], t["corrects_month"], t["effect"]["microcredits"]) for t in listed} == {
        (str(c1.id), "2026-10", -200_000), (str(c2.id), "2026-10", 125_000)
    }
    assert all(t["effect"]["bucket"] == "used" and t["description"].startswith("correction ") for t in listed)
    balance = await get(h, f"/v1/customers/{C}/balance", headers)
    assert balance["used"] == -200_000 + 125_000 and balance["remaining"] == 10_000_000 + 200_000 - 125_000

    # The dashboard: the versions, the amended lines (original, correction, amended) and the corrections.
    token = headers["authorization"].removeprefix("Bearer ")
    cookie = {"cookie": f"billing_dashboard_token={token}"}
    page = await h.client.get(f"/dashboard/customers/{C}", params={"month": "2026-10"}, headers=cookie)
    assert page.status_code == 200, page.text
    text = page.text
    for v, used in ((1, original_used), (2, original_used - 200_000), (3, original_used - 75_000)):
        assert f'<li data-version="{v}" data-used="{used}"' in text
    assert '<table id="statement" data-version="3">' in text
    for m, k, o in originals:
        assert (f'data-line="used_by_kind" data-meter="{m}" data-kind="{k}" data-microcredits="{o + corr[m]}" '
                f'data-original="{o}" data-correction="{corr[m]}"') in text
    assert f'data-line="used" data-microcredits="{original_used - 75_000}" data-original="{original_used}" ' \
           f'data-correction="{-75_000}"' in text
    assert f'<tr data-transaction="{c1.id}" data-microcredits="-200000">' in text
    assert f'<tr data-transaction="{c2.id}" data-microcredits="125000">' in text
    assert r1 in text and r2 in text
    old = await h.client.get(f"/dashboard/customers/{C}", params={"month": "2026-10", "version": "1"}, headers=cookie)
    assert old.status_code == 200 and '<table id="statement" data-version="1">' in old.text
    assert "data-original=" not in old.text.split('<table id="statement"')[1].split("</table>")[0]
    for bad, status in (("9", 404), ("x", 422)):
        r = await h.client.get(f"/dashboard/customers/{C}", params={"month": "2026-10", "version": bad},
                               headers=cookie)
        assert r.status_code == status, (bad, r.status_code)


async def test_an_amended_statement_is_delivered_as_statement_amended_with_a_valid_signature(
    infra: Infra, database: Database, topic_prefix: str
) -> None:
    secret = "whsec-amended-0123456789abcdef"
    got = Received()
    async with running_api(infra, database, topic_prefix, webhook_poll_seconds=0.05, webhook_timeout_seconds=2) as h:
        await h.publish_ledger([txn(C, "funding", 10_000_000, occurred_at=datetime(2026, 10, 1, 4, tzinfo=UTC))])
        await h.until_count("customer", 1)
        async with receiver(receiver_app(secret, got)) as port:
            r = await h.client.post("/admin/webhooks", headers=h.admin, json={
                "customer_id": str(C), "url": f"http://127.0.0.1:{port}/hooks",
                "events": ["statement.issued", "statement.amended"], "secret": secret,
            })
            assert r.status_code == 201, r.text
            nov1 = datetime(2026, 11, 1, 4, tzinfo=UTC)
            v1 = statement_version("2026-10", 1, [("cfapps", "", 1_000_000, 0)], [], nov1)
            v2 = statement_version("2026-10", 2, [("cfapps", "", 1_000_000, -50_000)], ["price corrected"],
                                   nov1 + timedelta(hours=1))
            await h.publish_ledger([v1, v2])

            async def both() -> bool:
                return len(got.events) >= 2

            await h.until(both, "both statements delivered")
            assert got.refused == 0  # signed with the subscription's secret
            by_id = {e["id"]: e for e in got.events}
            assert {i: e["type"] for i, e in by_id.items()} == {
                str(v1.id): "statement.issued", str(v2.id): "statement.amended"
            }
            amended = by_id[str(v2.id)]["data"]
            assert (amended["version"], amended["original_used"], amended["correction"], amended["used"]) == (
                2, 1_000_000, -50_000, 950_000
            )
