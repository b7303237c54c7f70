"""Continuous usage posting: charges batches (from Kafka, or held charges whose org got a customer) become at
most one usage transaction per (customer, reading hour), exactly.

The rule: for every (customer, billing month, price), the microcredits posted equal floor(exact sum of the
month's charges at their latest revision), whatever the order, batching, duplication, replay or revision.

State, per shard of resources (reading hour, meter, shard): the applied revision, amount and group of every
measurement (``shard_state``), and the charges held for orgs without a customer (``held_shards``). A batch
is compared with its shard's state item by item in Python (a new shard, the usual case, has none): an
older or equal revision changes nothing; a newer one adds its amount to its (customer, month, price) group
and takes the replaced amount out of the group it was counted in. The changes are summed per (group, hour,
org, meter, kind) as exact fractions, and ``allocate`` turns them into whole microcredits that telescope
to floor(new sum) − floor(old sum) of each group. This module orders the locks, turns the amounts into
balanced transactions (drawing on the agreements' pools), raises alerts and fills the outbox.

An item of the revision already applied (or held) is a redelivery when its content is the same, and a
conflict otherwise: its org, price or exact amount differ from the stored ones (the state keeps the org,
the group, hence the price, and the amount of each applied charge; the kind, price and amount of each
held one). A conflict changes nothing and is returned (``Posting.conflicts``) for the consumer to
dead-letter with a ``conflict:`` reason naming the stored charge. A shard's first batch has nothing to
compare with and pays nothing for this.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from fractions import Fraction
from itertools import repeat
from math import gcd, lcm
from operator import attrgetter, getitem
from typing import Any, NamedTuple

import asyncpg
import orjson
from asyncpg.pgproto.pgproto import UUID as HashedUUID

from services.ledger import messages
from services.ledger import repository as repo
from services.ledger.domain import (
    NIL_PRICE,
    Book,
    TransactionDraft,
    UsageAmount,
    effective_time,
    open_month_on_or_after,
    thresholds_reached,
    usage_transaction,
)
from shared.batches import CONFLICT, Charges, Correction, Price, Ref, ShardKey, charges_id, encode_charges, hour_text
from shared.blobs import Frames, shard_scope
from shared.clock import billing_month
from shared.db import Conn
from shared.ids import charge_id, measurement_id, uuid7
from shared.price_models import (
    AmountOutOfRangeError,
    InvalidPriceModelError,
    PriceModel,
    from_document,
    line_postings,
    posted,
    to_document,
)
from shared.price_models import amount as amount_of

__all__ = [
    "ConcurrentShardUpdateError",
    "GroupOutOfRangeError",
    "Posting",
    "allocate",
    "batch_months",
    "change_mark",
    "ensure_frames",
    "held_batches",
    "load_held",
    "lock_open_months",
    "post_batches",
    "raise_alerts",
    "record_transactions",
]

# A held charge: (revision, kind, price id text or "", numerator, denominator).
Held = tuple[int, str, str, int, int]


class ConcurrentShardUpdateError(asyncpg.SerializationError):
    """Another transaction wrote the state (or held charges) of a shard this posting found without any, e.g.
    a partition that moved mid-batch: retry the batch (a serialization failure, so the consumer and the
    service's retries treat it as transient); the retry reads that state and posts only the difference."""


class GroupOutOfRangeError(asyncpg.NumericValueOutOfRangeError):
    """A group (customer, month, price) of a graduated or volume price whose whole microcredits would pass
    2**62 (``shared.price_models.AmountOutOfRangeError``): refused like any amount past what the database
    holds (the consumer dead-letters the batch that takes it there with this reason); nothing is posted."""

    def __init__(self, group_id: int, text: str) -> None:
        super().__init__(text)
        self.group_id = group_id


@dataclass
class Posting:
    """What one posting did; ``outbox_ids`` are to be published after the commit."""

    changed: int = 0
    held: int = 0
    released: int = 0
    transactions: int = 0
    alerts: int = 0
    outbox_ids: list[int] = field(default_factory=list)
    # Items refused as conflicts: (position of the batch in the ``batches`` posted, item position, reason).
    conflicts: list[tuple[int, int, str]] = field(default_factory=list)
    # Batches refused whole, nothing of them applied: (position in ``batches``, reason); a price whose model
    # or bands differ from the ones known for its id (a ``conflict:``), or a price model that cannot exist.
    refused: list[tuple[int, str]] = field(default_factory=list)


async def lock_open_months(conn: Conn, months: Iterable[date]) -> frozenset[date]:
    """Take the shared lock of the month each of ``months`` posts into (itself, or the first open month
    after it when closed) and return the closed months, read once those locks are held: a month whose lock
    is held cannot be closed before this transaction ends."""
    months = set(months)
    locked: set[date] = set()
    while True:
        closed = await repo.closed_months(conn)
        need = {open_month_on_or_after(m, closed) for m in months} - locked
        if not need:
            return closed
        await repo.lock_months_shared(conn, need)
        locked |= need


def change_mark(key: ShardKey, resource_id: str, revision: int) -> int:
    """A 128-bit mark of one charge applied: a posting's usage transactions are keyed by the sum of the
    marks of the charges it applied, so two postings that apply different charges never share a key (the
    same Kafka batch delivered again after an assignment posts what it held the first time under a new
    key), and a posting retried after a rollback gets the key it would have had."""
    text = f"{key.reading_hour.isoformat()}|{key.meter}|{key.shard}|{resource_id}|{revision}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")


async def ensure_frames(frames: Frames, pool: asyncpg.Pool, batches: Sequence[Charges]) -> None:
    """Frames for the shards of ``batches`` that have none at hand, seeded with a batch of each (its resource
    ids and names are what the shard's documents repeat). Called before the posting's transaction."""
    await frames.ensure_first(pool, batches, shard_scope, encode_charges)


def batch_months(batches: Sequence[Charges]) -> set[date]:
    return {billing_month(c.reading_hour) for c in batches}


def load_held(raw: bytes) -> dict[str, Held]:
    doc = orjson.loads(raw)
    return {
        r: (v, k, p, n, d)
        for r, v, k, p, n, d in zip(doc["r"], doc["v"], doc["k"], doc["p"], doc["n"], doc["d"], strict=True)
    }


def _dump_held(items: dict[str, Held]) -> bytes:
    vals = list(items.values())
    return orjson.dumps(
        {
            "r": list(items),
            "v": [h[0] for h in vals],
            "k": [h[1] for h in vals],
            "p": [h[2] for h in vals],
            "n": [h[3] for h in vals],
            "d": [h[4] for h in vals],
        }
    )


def held_batches(held: dict[tuple[ShardKey, str], bytes]) -> list[Charges]:
    """Held charges as charges batches (one per shard and org), to post them like any batch."""
    out = []
    for (key, org_id), raw in sorted(held.items()):
        items = load_held(raw)
        if not items:
            continue
        kinds = sorted({h[1] for h in items.values()})
        price_ids = sorted({h[2] for h in items.values() if h[2]})
        kind_at = {k: i for i, k in enumerate(kinds)}
        price_at = {p: i for i, p in enumerate(price_ids)}
        rids = sorted(items)
        rows = [items[r] for r in rids]
        n = len(rids)
        digest = hashlib.sha1(f"{key}|{org_id}|{[(r, items[r][0]) for r in rids]}".encode()).digest()
        out.append(
            Charges(
                id=uuid.UUID(bytes=digest[:16]),
                reading_hour=key.reading_hour,
                meter=key.meter,
                unit="",
                shard=key.shard,
                priced_at=key.reading_hour,
                orgs=[Ref(org_id)],
                spaces=[Ref("")],
                kinds=kinds,
                prices=[Price(uuid.UUID(p), 0, 1) for p in price_ids],
                resource_id=rids,
                resource_name=[""] * n,
                org=[0] * n,
                space=[0] * n,
                kind=[kind_at[h[1]] for h in rows],
                value=[0] * n,
                estimated=[False] * n,
                revision=[h[0] for h in rows],
                price=[price_at[h[2]] if h[2] else -1 for h in rows],
                amount_numerator=[h[3] for h in rows],
                amount_denominator=[h[4] for h in rows],
            )
        )
    return out


GroupKey = tuple[uuid.UUID, date, uuid.UUID]  # customer, month, price
Line = tuple[datetime, str, str, str]  # hour, org, meter, kind
# Numerators to add per group, then per (line, denominator); a group is known by its key (customer, month,
# price) until the missing ones are created, or by its id when it comes from the stored state.
Acc = defaultdict[GroupKey | int, defaultdict[tuple[Line, int], int]]


@dataclass
class _Shard:
    """A shard's state in the transaction: its applied charges as columns — resource ids, revisions, groups
    (an id, or the key of a group this posting creates), numerators, denominators, orgs (positions in the
    org table ``os``; -1 in documents stored before orgs were kept) — as stored, with an index by resource
    built when a batch is compared item by item; and its held charges per org (loaded or new). A shard's
    first batch, the usual case, becomes the columns as it is."""

    r: list[str] = field(default_factory=list)
    v: list[int] = field(default_factory=list)
    g: list[GroupKey | int] = field(default_factory=list)
    n: list[int] = field(default_factory=list)
    d: list[int] = field(default_factory=list)
    o: list[int] = field(default_factory=list)
    os: list[str] = field(default_factory=list)
    index: dict[str, int] | None = None
    org_index: dict[str, int] | None = None
    held: dict[str, dict[str, Held]] = field(default_factory=dict)
    applied_changed: bool = False
    held_changed: set[str] = field(default_factory=set)
    mark: int = 0  # the sum of the change marks of what this posting applied to the shard
    # A shard's first batch (``_FreshGroups``): the group of each of its charges follows from its (org, price)
    # pair; ``dump`` maps the batch's few pairs to ids instead of every charge's group (a tuple of two UUIDs to
    # hash), and the per-charge group column is built only when a later batch of the posting compares items
    # with the shard (``groups``). None once a later batch changed the groups.
    fresh: _FreshGroups | None = None

    def groups(self) -> list[GroupKey | int]:
        """The group of each applied charge (built from the first batch's pairs when it is fresh)."""
        if self.fresh is not None and len(self.g) != len(self.r):
            self.g = self.fresh.column()
        return self.g

    def load(self, raw: bytes) -> None:
        doc = orjson.loads(raw)
        self.r, self.v, self.g, self.n, self.d = doc["r"], doc["v"], doc["g"], doc["n"], doc["d"]
        self.o, self.os = doc.get("o") or [-1] * len(self.r), doc.get("os") or []

    def positions(self) -> dict[str, int]:
        """Position of each applied resource in the columns."""
        if self.index is None:
            self.index = dict(zip(self.r, range(len(self.r)), strict=True))
        return self.index

    def org_at(self, org_id: str) -> int:
        """The position of ``org_id`` in the org table (added when missing)."""
        if self.org_index is None:
            self.org_index = dict(zip(self.os, range(len(self.os)), strict=True))
        at = self.org_index.get(org_id)
        if at is None:
            at = self.org_index[org_id] = len(self.os)
            self.os.append(org_id)
        return at

    def org_of(self, pos: int) -> str:
        """The org of the applied charge at ``pos`` ("" when not recorded)."""
        o = self.o[pos]
        return self.os[o] if o >= 0 else ""

    def dump(self, groups: dict[GroupKey, int]) -> bytes:
        """The stored document, the keys of the groups created meanwhile replaced by their ids."""
        if self.fresh is not None:
            ids: list[GroupKey | int] = self.fresh.column(groups)
        else:
            ids = [g if isinstance(g, int) else groups.get(g, g) for g in self.g]  # a group id stays itself
        return orjson.dumps({"r": self.r, "v": self.v, "g": ids, "n": self.n, "d": self.d, "o": self.o, "os": self.os})


def _quantities(c: Charges) -> tuple[list[int], list[int]]:
    """Each item's quantity as (numerators, denominators): its exact amount for a flat price (the batch's
    amount columns themselves, not copied), its exact units ``value / unit`` (not reduced: the price's unit
    is the one denominator of its items) for a graduated or volume price, whose money depends on the
    group's month total and is computed by ``allocate``. A group's price fixes its model, so a group only
    ever sums quantities of one kind. Batches rebuilt from held charges name flat prices and already carry
    quantities."""
    banded = [p.unit if p.model != "flat" else 0 for p in c.prices]
    if not any(banded):
        return c.amount_numerator, c.amount_denominator
    nums, dens = list(c.amount_numerator), list(c.amount_denominator)
    for i, (p, value) in enumerate(zip(c.price, c.value, strict=True)):
        if p >= 0 and banded[p]:
            nums[i], dens[i] = value, banded[p]
    return nums, dens


class _FreshGroups(NamedTuple):
    """A fresh shard's first batch as its groups follow from it: the batch's org and price columns, the
    customer of each of its orgs (every one has one), its price ids and its month."""

    orgs: list[int]
    prices: list[int]
    customers: list[uuid.UUID]
    price_ids: list[uuid.UUID]
    month: date

    def column(self, ids: Mapping[GroupKey, int] | None = None) -> list[Any]:
        """The group of each charge: its key, or its id in ``ids``. Built from a row of groups per customer
        (one per price of the batch, the last one unpriced), found per charge through its org and price."""
        rows: list[list[Any]] = []
        of_customer: dict[uuid.UUID, list[Any]] = {}
        for customer in self.customers:
            row = of_customer.get(customer)
            if row is None:
                keys = [(customer, self.month, p) for p in (*self.price_ids, _NIL)]
                row = of_customer[customer] = keys if ids is None else list(map(ids.get, keys))
            rows.append(row)
        column = list(map(getitem, map(rows.__getitem__, self.orgs), self.prices))
        if ids is not None and None in column:  # a row holds every price: only those of charges must have ids
            raise KeyError("a charge's group has no id")
        return column


class _FreshSums:
    """The charges of the posting's fresh batches summed across batches per (hour and meter, org, kind, price,
    denominator), keyed by small ints: a batch is one shard of resources, so its charges spread over most
    orgs and sum little within it, while a posting's batches share their orgs, kinds and prices. The sums
    join the posting's changes (``into``) once all batches are read; nothing is built per charge but the
    key."""

    def __init__(self) -> None:
        self.sums: defaultdict[tuple[int, int, int, int, int], int] = defaultdict(int)
        self.hours: dict[tuple[datetime, str], int] = {}
        self.orgs: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.prices: dict[uuid.UUID, int] = {}

    def add(self, c: Charges, nums: list[int], dens: list[int], price_ids: list[uuid.UUID]) -> None:
        hour = _slot(self.hours, (c.reading_hour, c.meter))
        orgs = [_slot(self.orgs, o.id) for o in c.orgs]
        kinds = [_slot(self.kinds, k) for k in c.kinds]
        prices = [_slot(self.prices, p) for p in price_ids]
        prices.append(_slot(self.prices, _NIL))  # position -1: an unpriced charge
        sums = self.sums
        keys = zip(
            repeat(hour), map(orgs.__getitem__, c.org), map(kinds.__getitem__, c.kind),
            map(prices.__getitem__, c.price), dens,
        )  # a decoded batch's columns: one length
        for k5, num in zip(keys, nums, strict=True):
            sums[k5] += num

    def into(self, acc: Acc, owners_at: Mapping[datetime, Mapping[str, uuid.UUID]]) -> None:
        """Add the sums to ``acc`` per (customer, month, price) group and (line, denominator)."""
        hours, orgs = list(self.hours), list(self.orgs)
        kinds, prices = list(self.kinds), list(self.prices)
        months = [billing_month(hour) for hour, _ in hours]
        buckets: dict[tuple[int, int, int], defaultdict[tuple[Line, int], int]] = {}
        for (h, o, k, p, den), num in self.sums.items():
            bucket = buckets.get((h, o, p))
            hour, meter = hours[h]
            if bucket is None:
                bucket = buckets[(h, o, p)] = acc[(owners_at[hour][orgs[o]], months[h], prices[p])]
            bucket[((hour, orgs[o], meter, kinds[k]), den)] += num


def _slot(slots: dict[Any, int], value: Any) -> int:
    at = slots.get(value)
    if at is None:
        at = slots[value] = len(slots)
    return at


def _post_fresh(c: Charges, key: ShardKey, shard: _Shard, customer_of: list[uuid.UUID], fresh: _FreshSums) -> int:
    """The first batch of a shard with nothing held, every org with a customer: every item is new, so the
    charges are summed column at a time (``_FreshSums``) and the batch's columns become the shard's state as
    they are."""
    nums, dens = _quantities(c)
    price_ids = _price_ids(c)
    fresh.add(c, nums, dens, price_ids)
    # Copies: a later batch of this posting may append to the shard's columns (the same message twice).
    shard.r, shard.v, shard.g = list(c.resource_id), list(c.revision), []
    shard.n, shard.d = list(nums), list(dens)
    shard.o, shard.os = list(c.org), [org.id for org in c.orgs]
    shard.index = shard.org_index = None
    shard.fresh = _FreshGroups(c.org, c.price, customer_of, price_ids, billing_month(key.reading_hour))
    shard.applied_changed = True
    # A fresh shard applies all of the batch's items: its mark is the id of those items (computed here, not
    # taken from the message, whose id nothing guarantees to match what it carries).
    shard.mark += charges_id(key.reading_hour, key.meter, key.shard, c.resource_id, c.revision).int
    return len(c.resource_id)


# A group key (customer, month, price) is hashed several times per charge; asyncpg's own UUID class (what
# the database's customer ids already are) hashes in C, the standard one in Python: price ids take it too.
_NIL = HashedUUID(NIL_PRICE.bytes)


_org_id = attrgetter("id")


def _price_ids(c: Charges) -> list[uuid.UUID]:
    return [HashedUUID(p.id.bytes) for p in c.prices]


def _price_text(price: uuid.UUID) -> str:
    return "none (unpriced)" if price == NIL_PRICE else str(price)


def _model_of(p: Price) -> PriceModel | None:
    """The model a batch names for price ``p``: None for a flat price (never stored), else its validated
    model (``InvalidPriceModelError`` when its bands cannot exist)."""
    if p.model == "flat":
        if p.bands is not None:
            raise InvalidPriceModelError("a flat price has no bands")
        return None
    bands = [{"up_to": b.up_to, "microcredits_per_unit": b.microcredits_per_unit, "flat_fee": b.flat_fee}
             for b in p.bands or ()]
    return from_document({"model": p.model, "bands": bands})


def _model_text(model: PriceModel | None) -> str:
    return "flat" if model is None else orjson.dumps(to_document(model)).decode()


def _stored_model(model: str, bands: str) -> PriceModel:
    return from_document({"model": model, "bands": orjson.loads(bands)})


async def _check_price_models(conn: Conn, batches: Sequence[Charges]) -> dict[int, str]:
    """Record the graduated and volume prices the batches name that are not known yet, and return the
    batches to refuse whole (by position, with the reason): one naming a known price with another model or
    other bands (a ``conflict:``; the known model is kept), or a model that cannot exist. A price's model
    never changes (prices are immutable), so its groups only ever sum one kind of quantity. One query per
    posting; the work is per price, never per item."""
    refused: dict[int, str] = {}
    named: list[dict[uuid.UUID, PriceModel | None]] = []
    new: dict[uuid.UUID, tuple[str, str]] = {}
    for n, c in enumerate(batches):
        terms: dict[uuid.UUID, PriceModel | None] = {}
        for p in c.prices:
            try:
                model = _model_of(p)
            except InvalidPriceModelError as exc:
                refused[n] = f"price {p.id}: invalid price model: {exc}"
                break
            terms[p.id] = model
            if model is not None and p.id not in new:
                new[p.id] = (model.model, orjson.dumps(to_document(model)["bands"]).decode())
        named.append(terms)
    ids = {pid for terms in named for pid in terms}
    if not ids:
        return refused
    await repo.store_price_models(conn, {pid: m for pid, m in new.items() if not _refused_only(pid, named, refused)})
    known = {pid: _stored_model(m, b) for pid, (m, b) in (await repo.price_models(conn, ids)).items()}
    for n, terms in enumerate(named):
        if n in refused:
            continue
        for pid, model in terms.items():
            stored = known.get(pid)
            if stored != model:
                refused[n] = (
                    f"{CONFLICT} price {pid} is known as {_model_text(stored)}; this batch names it as "
                    f"{_model_text(model)}: a price's model never changes, the known one is kept"
                )
                break
    return refused


def _refused_only(pid: uuid.UUID, named: list[dict[uuid.UUID, PriceModel | None]], refused: dict[int, str]) -> bool:
    """Whether every batch naming ``pid`` is refused already (its model is then not recorded)."""
    return all(n in refused for n, terms in enumerate(named) if pid in terms)


def _group_models(rows: dict[int, Any]) -> dict[int, tuple[PriceModel, Fraction]]:
    """The model and exact units of each locked group of a graduated or volume price (by id)."""
    out: dict[int, tuple[PriceModel, Fraction]] = {}
    parsed: dict[uuid.UUID, PriceModel] = {}
    for gid, r in rows.items():
        if r["model"] is None:
            continue
        model = parsed.get(r["price_id"])
        if model is None:
            model = parsed[r["price_id"]] = _stored_model(r["model"], r["bands"])
        units = Fraction(int(r["units_num"]), int(r["units_den"])) if r["units_num"] is not None else Fraction(0)
        out[gid] = (model, units)
    return out


@dataclass
class _Checks:
    """Items of the revision already applied or held, compared with the stored copy: ``found`` are the
    conflicts (batch position, item position, reason); ``unsure`` the items whose stored group is known by
    id only, decided once the prices of those groups are read (``settle``)."""

    found: list[tuple[int, int, str]] = field(default_factory=list)
    unsure: list[tuple[int, int, ShardKey, str, int, int, uuid.UUID, list[str]]] = field(default_factory=list)

    def conflict(self, n: int, i: int, key: ShardKey, rid: str, rev: int, stored: str, diffs: list[str]) -> None:
        mid = measurement_id(key.reading_hour, key.meter, rid)
        why = (
            f"{CONFLICT} charge {charge_id(mid, rev)} (measurement {mid}: {hour_text(key.reading_hour)}, "
            f"{key.meter}, resource {rid}) at revision {rev} is {stored} with other content: "
            f"{', '.join(diffs)}; the {stored} charge is kept"
        )
        self.found.append((n, i, why))

    def applied(
        self, n: int, i: int, key: ShardKey, rid: str, shard: _Shard, pos: int,
        org_id: str, price: uuid.UUID, num: int, den: int,
    ) -> None:
        rev, group, old_num, old_den = shard.v[pos], shard.g[pos], shard.n[pos], shard.d[pos]
        old_org = shard.org_of(pos)
        diffs = []
        if num * old_den != old_num * den:
            diffs.append(f"amount {num}/{den} (applied: {old_num}/{old_den})")
        if old_org and old_org != org_id:
            diffs.append(f"org {org_id!r} (applied: {old_org!r})")
        if not isinstance(group, tuple):  # a group of the stored state: its price is read once for all
            self.unsure.append((n, i, key, rid, rev, group, price, diffs))
            return
        if group[2] != price:
            diffs.append(f"price {_price_text(price)} (applied: {_price_text(group[2])})")
        if diffs:
            self.conflict(n, i, key, rid, rev, "applied", diffs)

    def held(
        self, n: int, i: int, key: ShardKey, rid: str, stored: Held, held_org: str,
        org_id: str, kind: str, price: uuid.UUID, num: int, den: int,
    ) -> bool:
        """Whether an item of the revision held (under ``held_org``) conflicts with it (then recorded)."""
        rev, old_kind, old_price, old_num, old_den = stored
        diffs = []
        if num * old_den != old_num * den:
            diffs.append(f"amount {num}/{den} (held: {old_num}/{old_den})")
        if held_org != org_id:
            diffs.append(f"org {org_id!r} (held: {held_org!r})")
        if kind != old_kind:
            diffs.append(f"kind {kind!r} (held: {old_kind!r})")
        if (str(price) if price != NIL_PRICE else "") != old_price:
            diffs.append(f"price {_price_text(price)} (held: {old_price or 'none (unpriced)'})")
        if diffs:
            self.conflict(n, i, key, rid, rev, "held", diffs)
        return bool(diffs)

    def settle(self, prices: dict[int, uuid.UUID]) -> None:
        """Decide the unsure items once the prices of their groups are read."""
        for n, i, key, rid, rev, gid, price, diffs in self.unsure:
            stored = prices.get(gid)
            if stored is not None and stored != price:
                diffs.append(f"price {_price_text(price)} (applied: {_price_text(stored)})")
            if diffs:
                self.conflict(n, i, key, rid, rev, "applied", diffs)
        self.unsure.clear()


def _held_elsewhere(held: dict[str, dict[str, Held]], rid: str, org_id: str) -> tuple[str, Held] | None:
    """The org and held charge of ``rid`` held under another org than ``org_id``, if any."""
    for other, items in held.items():
        if other != org_id and rid in items:
            return other, items[rid]
    return None


def _post_items(
    c: Charges,
    key: ShardKey,
    shard: _Shard,
    customer_of: list[uuid.UUID | None],
    acc: Acc,
    result: Posting,
    checks: _Checks | None = None,
    n: int = 0,
) -> int:
    """Item by item against the shard's state: an older or equal revision changes nothing; one whose org has
    no customer is held; any other adds its amount and takes back the one it replaces. With ``checks`` (the
    batches from the topic, ``n`` this one's position), an item of the revision applied or held with other
    content is recorded there as a conflict and changes nothing."""
    at, held = shard.positions(), shard.held
    revs, gs, nums, dens = shard.v, shard.groups(), shard.n, shard.d
    month = billing_month(key.reading_hour)
    price_ids = _price_ids(c)
    kinds, orgs = c.kinds, c.orgs
    changed = 0
    for i, (rid, rev, o, k, p, num, den) in enumerate(
        zip(c.resource_id, c.revision, c.org, c.kind, c.price, *_quantities(c), strict=True)
    ):
        pos = at.get(rid)
        old_rev = revs[pos] if pos is not None else 0
        org_id = orgs[o].id
        waiting = held.get(org_id)
        was_held = waiting.get(rid) if waiting is not None else None
        price = price_ids[p] if p >= 0 else _NIL
        if old_rev >= rev:
            if checks is not None and old_rev == rev and pos is not None:
                checks.applied(n, i, key, rid, shard, pos, org_id, price, num, den)
            if was_held is not None and was_held[0] <= old_rev:  # a held copy that was overtaken
                del waiting[rid]  # type: ignore[union-attr]
                shard.held_changed.add(org_id)
            continue
        if checks is not None and held:
            if was_held is not None and was_held[0] == rev:
                if checks.held(n, i, key, rid, was_held, org_id, org_id, kinds[k], price, num, den):
                    continue
            elif (other := _held_elsewhere(held, rid, org_id)) is not None and other[1][0] == rev:
                checks.held(n, i, key, rid, other[1], other[0], org_id, kinds[k], price, num, den)
                continue
        customer = customer_of[o]
        if customer is None:
            if was_held is not None and was_held[0] >= rev:
                continue
            if waiting is None:
                waiting = held[org_id] = {}
            waiting[rid] = (rev, kinds[k], str(price) if p >= 0 else "", num, den)
            shard.held_changed.add(org_id)
            result.held += 1
            continue
        if was_held is not None and was_held[0] <= rev:
            del waiting[rid]  # type: ignore[union-attr]
            shard.held_changed.add(org_id)
            result.released += 1
        group = (customer, month, price)
        line = (key.reading_hour, org_id, key.meter, kinds[k])
        acc[group][(line, den)] += num
        shard.fresh = None
        if pos is None:
            at[rid] = len(shard.r)
            shard.r.append(rid)
            revs.append(rev)
            gs.append(group)
            nums.append(num)
            dens.append(den)
            shard.o.append(shard.org_at(org_id))
        else:
            acc[gs[pos]][(line, dens[pos])] -= nums[pos]
            revs[pos], gs[pos], nums[pos], dens[pos] = rev, group, num, den
            if shard.org_of(pos) != org_id:  # (indexing the org table costs more than a revision)
                shard.o[pos] = shard.org_at(org_id)
        shard.applied_changed = True
        shard.mark += change_mark(key, rid, rev)
        changed += 1
    return changed


async def post_batches(
    conn: Conn,
    frames: Frames,
    batches: Sequence[Charges],
    now: datetime,
    release: Sequence[tuple[ShardKey, str]] = (),
) -> Posting:
    """Post charges batches inside the caller's transaction, and the held charges of the (shard, org) pairs
    ``release`` (read under the same locks). Lock order, the same everywhere: months (shared), shard rows,
    held rows, then (customer, month, price) rows by id, then the customers' accounts by id. The usage
    transactions' idempotency keys end with the sum of the change marks of the charges applied."""
    result = Posting()
    keys = {ShardKey(c.reading_hour, c.meter, c.shard) for c in batches} | {k for k, _ in release}
    if not keys:
        return result
    closed = await lock_open_months(conn, {billing_month(k.reading_hour) for k in keys})
    shards: dict[ShardKey, _Shard] = {k: _Shard() for k in keys}
    stored = await repo.lock_shard_states(conn, frames, keys)
    for key, raw in stored.items():
        shards[key].load(raw)
    held_rows = await repo.lock_held(conn, frames, keys)
    for (key, org_id), raw in held_rows.items():
        shards[key].held[org_id] = load_held(raw)
    topic = len(batches)  # the batches from the topic; those of held charges released follow
    refused = await _check_price_models(conn, batches)
    result.refused = sorted(refused.items())
    if release:
        batches = [*batches, *held_batches({k: held_rows[k] for k in release if k in held_rows})]
    orgs_at: defaultdict[datetime, set[str]] = defaultdict(set)
    for c in batches:
        orgs_at[c.reading_hour].update(map(_org_id, c.orgs))  # a batch names most orgs: no tuple per name
    owners = await repo.owners(conn, [(org, hour) for hour, orgs in orgs_at.items() for org in orgs])
    owners_at: dict[datetime, dict[str, uuid.UUID]] = defaultdict(dict)
    for (org_id, hour), customer_id in owners.items():
        owners_at[hour][org_id] = customer_id

    acc: Acc = defaultdict(lambda: defaultdict(int))
    fresh = _FreshSums()
    checks = _Checks()
    # The re-ratings the batches come from, per (reading hour, meter): a closed month's difference on those
    # lines is a correction, not late usage (decided per customer and hour below, never per item).
    corrected: dict[tuple[datetime, str], Correction] = {}
    for n, c in enumerate(batches):
        if refused and n in refused:
            continue
        if c.correction is not None:
            corrected[(c.reading_hour, c.meter)] = c.correction
        key = ShardKey(c.reading_hour, c.meter, c.shard)
        shard = shards[key]
        owner_of = owners_at.get(c.reading_hour, {})
        customer_of = list(map(owner_of.get, map(_org_id, c.orgs)))
        if not shard.r and not shard.held and None not in customer_of:
            result.changed += _post_fresh(c, key, shard, customer_of, fresh)  # type: ignore[arg-type]  # no None
        else:
            result.changed += _post_items(c, key, shard, customer_of, acc, result, checks if n < topic else None, n)
    fresh.into(acc, owners_at)
    if checks.unsure:
        checks.settle(await repo.group_prices(conn, {u[5] for u in checks.unsure}))
    result.conflicts = sorted(checks.found)

    amounts: list[tuple[int, Line, int]] = []
    rows: dict[int, Any] = {}
    groups: dict[GroupKey, int] = {}
    if result.changed:
        groups = await repo.group_ids(conn, {g for g in acc if isinstance(g, tuple)})
        deltas: dict[int, dict[Line, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
        for g, bucket in acc.items():
            by_line = deltas[g if isinstance(g, int) else groups[g]]
            for (line, den), num in bucket.items():
                cell = by_line[line]
                cell[den] = cell.get(den, 0) + num
        rows = await repo.lock_groups(conn, deltas)
        models = _group_models(rows)
        try:
            updates, amounts, units = allocate(
                {gid: (int(r["sum_num"]), int(r["sum_den"])) for gid, r in rows.items()}, deltas, models
            )
        except GroupOutOfRangeError as exc:
            row = rows[exc.group_id]
            raise GroupOutOfRangeError(
                exc.group_id,
                f"the {row['model']} price {row['price_id']} of customer {row['customer_id']} in {row['month']:%Y-%m}: "
                f"{exc}; the charges that take it there are refused",
            ) from exc
        await repo.update_groups(conn, updates, units)
    await _save(conn, frames, shards, groups, set(stored), set(held_rows))
    if not amounts:
        return result

    per_hour: dict[tuple[uuid.UUID, datetime], list[UsageAmount]] = defaultdict(list)
    for gid, line, amount in amounts:
        if amount == 0:
            continue
        g = rows[gid]
        hour, org_id, meter, kind = line
        per_hour[(g["customer_id"], hour)].append(UsageAmount(org_id, meter, kind, g["price_id"], g["month"], amount))
    if not per_hour:
        return result
    digest = f"{sum(s.mark for s in shards.values()) % (1 << 128):032x}"
    books = await repo.load_books(conn, {cid for cid, _ in per_hour})
    drafts: list[TransactionDraft] = []
    for (customer_id, hour), lines in sorted(per_hour.items()):
        lines.sort(key=lambda u: (u.org_id, u.meter, u.resource_kind, u.price_id))
        month = lines[0].month
        occurred_at, late = effective_time(hour, month, closed)
        kind = "late_usage" if late else "usage"
        if late and corrected:
            lines, corrections = _corrections(corrected, hour, lines)
            for fix, fixed in corrections:
                draft = usage_transaction(
                    books[customer_id], hour, fixed, late=True, occurred_at=occurred_at,
                    idempotency_key=f"correction:{customer_id}:{hour.isoformat()}:{fix.id}:{digest}",
                    correction=(f"correction {fix.id}: {fix.reason}", month),
                )
                if draft is not None:
                    drafts.append(draft)
        draft = usage_transaction(
            books[customer_id],
            hour,
            lines,
            late=late,
            occurred_at=occurred_at,
            idempotency_key=f"{kind}:{customer_id}:{hour.isoformat()}:{digest}",
        )
        if draft is not None:
            drafts.append(draft)
    _, outbox = await record_transactions(conn, drafts, now)
    alert_messages = await raise_alerts(conn, books.values(), drafts, now)
    result.transactions = len(drafts)
    result.alerts = len(alert_messages)
    result.outbox_ids = outbox + await repo.insert_outbox(conn, alert_messages)
    return result


def _corrections(
    corrected: dict[tuple[datetime, str], Correction], hour: datetime, lines: list[UsageAmount]
) -> tuple[list[UsageAmount], list[tuple[Correction, list[UsageAmount]]]]:
    """A customer's lines of an hour of a closed month split into late usage and corrections: the lines of a
    meter whose batches of the hour came from a re-rating are that re-rating's correction."""
    late: list[UsageAmount] = []
    fixes: dict[uuid.UUID, tuple[Correction, list[UsageAmount]]] = {}
    for line in lines:
        fix = corrected.get((hour, line.meter))
        if fix is None:
            late.append(line)
        else:
            fixes.setdefault(fix.id, (fix, []))[1].append(line)
    return late, [fixes[k] for k in sorted(fixes)]


async def _save(
    conn: Conn,
    frames: Frames,
    shards: dict[ShardKey, _Shard],
    groups: dict[GroupKey, int],
    stored: set[ShardKey],
    stored_held: set[tuple[ShardKey, str]],
) -> None:
    """Write the changed shard states and held rows. Rows that existed are locked and replaced; the others
    are inserted only if still absent: another transaction that inserted one meanwhile posted those charges
    too (a new shard has no row to lock), so this posting fails as a serialization failure."""
    states, held_rows, gone = [], [], []
    for key, shard in sorted(shards.items()):
        if shard.applied_changed:
            states.append((key, len(shard.r), sum(shard.v), shard.dump(groups)))
        for org_id in sorted(shard.held_changed):
            items = shard.held[org_id]
            # Counted as held: the items not applied meanwhile (an older revision may stay applied).
            applied = shard.positions()
            waiting = [h for rid, h in items.items() if rid not in applied]
            if items:
                held_rows.append((key, org_id, len(waiting), sum(h[0] for h in waiting), _dump_held(items)))
            else:
                gone.append((key, org_id))
    await repo.save_shard_states(conn, frames, [r for r in states if r[0] in stored])
    await repo.save_held(conn, frames, [r for r in held_rows if (r[0], r[1]) in stored_held], gone)
    new_states = [r for r in states if r[0] not in stored]
    new_held = [r for r in held_rows if (r[0], r[1]) not in stored_held]
    if await repo.insert_shard_states(conn, frames, new_states) < len(new_states):
        raise ConcurrentShardUpdateError("the state of a shard of this batch was first written concurrently")
    if await repo.insert_held(conn, frames, new_held) < len(new_held):
        raise ConcurrentShardUpdateError("charges of a shard of this batch were first held concurrently")


def allocate(
    sums: dict[int, tuple[int, int]],
    deltas: dict[int, dict[Line, dict[int, int]]],
    models: Mapping[int, tuple[PriceModel, Fraction]] | None = None,
) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, Line, int]], dict[int, Fraction]]:
    """The heart of the posting rule, exactly.

    Each group (customer, month, price) holds its exact sum S = sum_num / sum_den. Its changes are lines
    (hour, org, meter, kind), each a sum of fractions. Scaled to one common denominator L (lcm of S's and
    the lines'), the lines, in a fixed order, are given floor(S + running sum) − floor(S + running sum
    before them) whole microcredits. The amounts telescope: their total is floor(S_new) − floor(S_old),
    exactly what the posted figure must move by to stay floor(exact sum). No rounding happens elsewhere.

    A group of a graduated or volume price (in ``models``: its model and exact units U) sums units, not
    money: its lines get ``line_postings`` — floor(f(U + running units)) − floor(f(U + running units before
    them)) — which telescope to floor(f(U_new)) − floor(f(U_old)); its sum becomes f(U_new) exactly and its
    posted figure floor(f(U_new)), at most 2**62 (``GroupOutOfRangeError`` otherwise).

    Returns the groups' new (id, numerator, denominator, posted), reduced, (group, line, amount) per line,
    and the new exact units of the groups of ``models``.
    """
    updates: list[tuple[int, int, int, int]] = []
    amounts: list[tuple[int, Line, int]] = []
    units: dict[int, Fraction] = {}
    for gid in sorted(deltas):
        lines = deltas[gid]
        if models and gid in models:
            model, before = models[gid]
            try:
                after, posted_amounts = _banded_lines(model, before, lines)
                exact, whole = amount_of(model, after), posted(model, after)
            except AmountOutOfRangeError as exc:
                raise GroupOutOfRangeError(gid, str(exc)) from exc
            amounts.extend((gid, line, a) for line, a in posted_amounts)
            updates.append((gid, exact.numerator, exact.denominator, whole))
            units[gid] = after
            continue
        sum_num, sum_den = sums[gid]
        common = sum_den
        for cell in lines.values():
            for den in cell:
                common = lcm(common, den)
        running = sum_num * (common // sum_den)
        for line in sorted(lines):
            n = sum(num * (common // den) for den, num in lines[line].items())
            amounts.append((gid, line, (running + n) // common - running // common))
            running += n
        g = gcd(running, common) or 1
        updates.append((gid, running // g, common // g, running // common))
    return updates, amounts, units


def _banded_lines(
    model: PriceModel, before: Fraction, lines: dict[Line, dict[int, int]]
) -> tuple[Fraction, list[tuple[Line, int]]]:
    """A graduated or volume group's new units and its amount per line, in line order. Should a line that
    takes units back come before the line that added them in this posting (a revision that moved a charge
    to another line), the lines that add come first, so that no running total is below zero."""
    order = sorted(lines)
    changes = [sum((Fraction(num, den) for den, num in lines[line].items()), Fraction(0)) for line in order]
    running, low = before, before
    for du in changes:
        running += du
        low = min(low, running)
    if low < 0:
        pairs = sorted(zip(order, changes, strict=True), key=lambda lc: lc[1] < 0)
        order, changes = [lc[0] for lc in pairs], [lc[1] for lc in pairs]
    return running, list(zip(order, line_postings(model, before, changes), strict=True))


async def record_transactions(
    conn: Conn, drafts: Sequence[TransactionDraft], now: datetime
) -> tuple[list[uuid.UUID], list[int]]:
    """Insert the drafts as transactions (new UUIDv7 ids) and their TransactionPosted messages into the
    outbox; returns (transaction ids, outbox ids)."""
    if not drafts:
        return [], []
    ids = [uuid7() for _ in drafts]
    await repo.insert_transactions(conn, drafts, ids, now)
    outbox = await repo.insert_outbox(
        conn, [messages.transaction_posted_outbox(d, tid, now) for d, tid in zip(drafts, ids, strict=True)]
    )
    return ids, outbox


async def raise_alerts(
    conn: Conn, books: Iterable[Book], drafts: Sequence[TransactionDraft], now: datetime
) -> list[messages.OutboxMessage]:
    """AlertRaised for each threshold an agreement drawn on by ``drafts`` reached for the first time."""
    drawn = {e.account_id for d in drafts for e in d.entries if e.side == "debit"}
    rows = []
    for book in books:
        for pool in book.pools:
            if pool.account.id not in drawn:
                continue
            used = pool.credits - pool.remaining
            for threshold in thresholds_reached(pool.credits, used):
                rows.append((pool.agreement_id, threshold, book.customer_id, pool.credits, used, now))
    fresh = await repo.insert_alerts(conn, rows)
    return [
        messages.to_outbox(
            messages.alert_raised(
                r["customer_id"], r["agreement_id"], r["threshold_percent"], r["funded"], r["used"], r["raised_at"]
            )
        )
        for r in sorted(fresh, key=lambda r: (r["agreement_id"], r["threshold_percent"]))
    ]
