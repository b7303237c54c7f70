"""Rate cards in the pricer's rules (no I/O): which price an org's item gets at its hour (customer, then tier,
then global, each only while valid; a correction over all), where an org's assignment starts and ends, and
which charges an assignment re-prices. Expected prices come from a loop over the definitions here."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from services.pricer.pricing import Assignments, Catalog, Price, Scope, price_items, reassign_items
from shared import ids
from shared.batches import Item, measurement_batches

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CUSTOMER = str(uuid.UUID(int=7))


def price(mpu: int, start: int, end: int | None, scope: tuple[str, str] = ("global", ""), *,
          correction: bool = False) -> Price:
    return Price(uuid.uuid4(), "cfapps", "", "MB-hour", mpu, 10, T0 + timedelta(hours=start),
                 None if end is None else T0 + timedelta(hours=end), T0, correction=correction,
                 scope_kind=scope[0], scope_id=scope[1])


def expected(prices: list[Price], scope: Scope | None, at: datetime) -> Price | None:
    """The definition, as a plain search: a correction, else the customer's, the tier's, the global one."""
    def valid(p: Price) -> bool:
        return p.valid_from <= at and (p.valid_until is None or at < p.valid_until)

    order = [lambda p: p.correction]
    if scope is not None:
        order += [lambda p: not p.correction and (p.scope_kind, p.scope_id) == ("customer", scope.customer),
                  lambda p: not p.correction and (p.scope_kind, p.scope_id) == ("tier", scope.tier)]
    order += [lambda p: not p.correction and p.scope_kind == "global"]
    for wanted in order:
        found = [p for p in prices if wanted(p) and valid(p)]
        if found:
            return found[0]
    return None


@st.composite
def catalogs(draw: st.DrawFn) -> list[Price]:
    """Per scope, non-overlapping ranges over 0..48 hours (as the database keeps them)."""
    out: list[Price] = []
    for scope in (("global", ""), ("tier", "gold"), ("customer", CUSTOMER), ("tier", "basic")):
        cuts = sorted(set(draw(st.lists(st.integers(0, 48), max_size=4))))
        for a, b in zip(cuts, [*cuts[1:], None], strict=False):
            if draw(st.booleans()):
                out.append(price(draw(st.integers(0, 9)), a, b, scope))
    if draw(st.booleans()):
        a = draw(st.integers(0, 40))
        out.append(price(1, a, a + draw(st.integers(1, 8)), correction=True))
    return out


@settings(max_examples=200, deadline=None)
@given(catalogs(), st.integers(0, 50), st.sampled_from([None, Scope(CUSTOMER, "gold"), Scope("other", "gold"),
                                                         Scope("other", "silver"), Scope(CUSTOMER, "basic")]))
def test_the_price_of_an_org_is_its_customers_else_its_tiers_else_the_global_one(
    prices: list[Price], hour: int, scope: Scope | None
) -> None:
    at = T0 + timedelta(hours=hour)
    assert Catalog(prices).price_at("cfapps", "", at, scope) == expected(prices, scope, at)


def test_an_orgs_assignment_holds_from_its_start_until_the_next() -> None:
    a = Assignments([("org", T0 + timedelta(hours=5), "c2", "t2"), ("org", T0, "c1", "t1")])
    assert a.at("org", T0 - timedelta(microseconds=1)) is None
    assert a.at("org", T0) == Scope("c1", "t1")
    assert a.at("org", T0 + timedelta(hours=5) - timedelta(microseconds=1)) == Scope("c1", "t1")
    assert a.at("org", T0 + timedelta(hours=5)) == Scope("c2", "t2")
    assert a.at("other", T0) is None
    assert a.around("org", T0 + timedelta(hours=5)) == (Scope("c1", "t1"), None)
    assert a.around("org", T0) == (None, T0 + timedelta(hours=5))


def test_items_are_priced_per_org_and_an_assignment_reprices_only_that_orgs_changed_charges() -> None:
    hour = T0 + timedelta(hours=3)
    items = [Item(f"{org}-{i}", "r", org, org, "s", "s", "", 100 + 10 * i + len(org))
             for org in ("org-a", "org-bb", "org-ccc") for i in range(4)]
    shards = measurement_batches(hour, "cfapps", "MB", items, reading_id=ids.reading_id(hour), taken_at=hour)
    glob, gold, mine = price(5, 0, None), price(7, 0, None, ("tier", "gold")), price(11, 0, None, ("customer", "c"))
    catalog = Catalog([glob, gold, mine])
    before = Assignments([("org-a", T0, "c", "gold"), ("org-bb", T0, "x", "basic")])
    want = {"org-a": mine, "org-bb": glob, "org-ccc": glob}
    stored = []
    for m in shards:
        priced = price_items(m, None, catalog, hour, assignments=before)
        assert priced.message is not None
        c = priced.message
        stored.append(c)
        for i, rid in enumerate(c.resource_id):
            p = want[rid.rsplit("-", 1)[0]]
            assert c.prices[c.price[i]].id == p.id
            amount = Fraction(c.amount_numerator[i], c.amount_denominator[i])
            assert amount == Fraction(c.value[i] * p.microcredits_per_unit, 10)
    assert sum(len(c.resource_id) for c in stored) == 12
    # org-bb moves to a gold customer from T0+1h: its four charges only, revision 2 with the gold price.
    after = Assignments([("org-a", T0, "c", "gold"), ("org-bb", T0, "x", "basic"),
                         ("org-bb", T0 + timedelta(hours=1), "y", "gold")])
    again = [reassign_items([c], catalog, hour, after, "org-bb", T0 + timedelta(hours=1)) for c in stored]
    messages = [a.message for a, unpriced in again if a is not None and a.message is not None]
    assert all(unpriced == set() for _, unpriced in again)
    assert sorted(r for m in messages for r in m.resource_id) == [f"org-bb-{i}" for i in range(4)]
    assert {rev for m in messages for rev in m.revision} == {2}
    assert {m.prices[p].id for m in messages for p in m.price} == {gold.id}
    # Nothing changes for an org whose price stays, nor for hours before the assignment's start.
    for c in stored:
        assert reassign_items([c], catalog, hour, after, "org-a", T0)[0] is None
        assert reassign_items([c], catalog, hour, after, "org-bb", hour + timedelta(hours=1))[0] is None
