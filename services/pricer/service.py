"""The pricer's logic, free of I/O: the price catalog held in memory, exact charges, and the JSON of the
``ChargeComputed`` messages.

A charge is ``value * microcredits_per_unit / unit`` microcredits, kept exact as an integer numerator and
denominator **reduced to lowest terms** (so the denominator divides the price's ``unit``); nothing is
rounded here. ``display_amount`` is the same figure in credits rounded half-up to 6 places, for people.

Throughput matters (a batch holds thousands of measurements), so the per-message path avoids building
pydantic models: the charge document is a dict dumped by orjson, whose output the contract model
parses to the same value (tests/unit/test_pricer_service.py holds that equivalence, and the fast id and
display helpers against ``shared.ids`` and ``shared.money``).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from math import gcd
from typing import Any
from uuid import UUID

import orjson

from shared.contracts import MeasurementTaken
from shared.ids import NAMESPACE

__all__ = [
    "MAX_AMOUNT",
    "PricingError",
    "InvalidPriceError",
    "PriceNotFoundError",
    "PriceOverlapError",
    "PriceEndRefusedError",
    "Price",
    "Catalog",
    "StoredCharge",
    "PricedBatch",
    "ChargeRow",
    "UnpricedRow",
    "Repriced",
    "exact_amount",
    "display_amount",
    "charge_id_str",
    "price_batch",
    "stored_charge_payload",
    "reprice_document",
    "check_end",
]

# The contract caps integers at 2**62 (amount_numerator, amount_denominator).
MAX_AMOUNT = 2**62
_MICRO = 1_000_000
_NS = NAMESPACE.bytes
_DUMPS_OPTIONS = orjson.OPT_UTC_Z


class PricingError(Exception):
    """Base of the pricer's named errors."""


class InvalidPriceError(PricingError):
    """A price that cannot exist (its range is empty, a field out of bounds)."""


class PriceNotFoundError(PricingError):
    """No price has this id."""


class PriceOverlapError(PricingError):
    """The new range overlaps a price of the same (meter, resource kind)."""

    def __init__(self, message: str, conflicts: Sequence[UUID]) -> None:
        super().__init__(message)
        self.conflicts = list(conflicts)


class PriceEndRefusedError(PricingError):
    """Ending the price at that time would contradict its range or charges already priced with it."""


@dataclass(frozen=True, slots=True)
class Price:
    """``microcredits_per_unit`` per ``unit`` of a meter's quantity, valid in [valid_from, valid_until)."""

    id: UUID
    meter: str
    resource_kind: str
    unit_of_measure: str
    microcredits_per_unit: int
    unit: int
    valid_from: datetime
    valid_until: datetime | None
    created_at: datetime

    def covers(self, at: datetime) -> bool:
        return self.valid_from <= at and (self.valid_until is None or at < self.valid_until)


class Catalog:
    """The prices in memory, found by (meter, kind) and a bisection on ``valid_from``.

    ``version`` is the database's catalog version it was loaded at; lookups are memoised per
    (meter, kind, hour), since a batch holds many measurements of few hours."""

    _MEMO_LIMIT = 200_000

    def __init__(self, prices: Iterable[Price], version: int = 0) -> None:
        self.version = version
        by_key: dict[tuple[str, str], list[Price]] = {}
        for p in prices:
            by_key.setdefault((p.meter, p.resource_kind), []).append(p)
        self._series: dict[tuple[str, str], tuple[list[datetime], list[Price]]] = {}
        for key, series in by_key.items():
            series.sort(key=lambda p: p.valid_from)
            self._series[key] = ([p.valid_from for p in series], series)
        self._memo: dict[tuple[str, str, datetime], Price | None] = {}

    def __len__(self) -> int:
        return sum(len(s[1]) for s in self._series.values())

    def price_at(self, meter: str, resource_kind: str, at: datetime) -> Price | None:
        """The price of (meter, kind) valid at instant ``at``, or None."""
        memo_key = (meter, resource_kind, at)
        try:
            return self._memo[memo_key]
        except KeyError:
            pass
        found: Price | None = None
        series = self._series.get((meter, resource_kind))
        if series is not None:
            starts, prices = series
            i = bisect.bisect_right(starts, at) - 1
            if i >= 0 and prices[i].covers(at):
                found = prices[i]
        if len(self._memo) >= self._MEMO_LIMIT:
            self._memo.clear()
        self._memo[memo_key] = found
        return found


def exact_amount(value: int, microcredits_per_unit: int, unit: int) -> tuple[int, int]:
    """``value * microcredits_per_unit / unit`` as (numerator, denominator) in lowest terms."""
    product = value * microcredits_per_unit
    g = gcd(product, unit)
    return product // g, unit // g


def display_amount(numerator: int, denominator: int) -> str:
    """Credits of ``numerator/denominator`` microcredits, half-up to 6 places: the integer form of
    ``shared.money.display_credits`` for non-negative amounts (a credit is 10**6 microcredits, so the
    6th decimal of credits is the whole microcredit)."""
    q = (2 * numerator + denominator) // (2 * denominator)
    return f"{q // _MICRO}.{q % _MICRO:06d}"


def _uuid5_bytes(name: str) -> bytearray:
    """The 16 bytes of uuid5(shared.ids.NAMESPACE, name)."""
    digest = bytearray(hashlib.sha1(_NS + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return digest


def _uuid_text(u: UUID) -> str:
    """``str(u)`` (orjson writes the same canonical form at a third of the cost)."""
    return orjson.dumps(u)[1:-1].decode()


def charge_id_str(measurement: str, revision: int) -> str:
    """``str(shared.ids.charge_id(UUID(measurement), revision))``, without building UUID objects."""
    h = _uuid5_bytes(f"charge|{measurement}|{revision}").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class StoredCharge:
    """A charge revision as stored."""

    measurement_id: UUID
    revision: int
    price_id: UUID | None
    amount_numerator: int
    amount_denominator: int
    value: int
    priced_at: datetime


# A charge row as repository.store_charges writes it (the charges table's columns, in order), and an
# unpriced entry (repository: unpriced_charges) carrying the unpriced revision's document.
ChargeRow = tuple[datetime, UUID, int, str, str, int, UUID | None, int, int, datetime]
UnpricedRow = tuple[UUID, datetime, str, str, int, str]


@dataclass(slots=True)
class PricedBatch:
    """A batch priced in memory: one row and one message per distinct accepted measurement, in the
    same order; the unpriced ones again as unpriced entries; the rejected input positions with why."""

    measurements: list[MeasurementTaken] = field(default_factory=list)
    rows: list[ChargeRow] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    unpriced: list[UnpricedRow] = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)


def _document(
    m: MeasurementTaken,
    measurement: str,
    revision: int,
    price_id: UUID | None,
    numerator: int,
    denominator: int,
    value: int,
    priced_at: datetime,
) -> dict[str, Any]:
    return {
        "id": charge_id_str(measurement, revision),
        "schema_name": "usage.charge",
        "schema_version": 1,
        "measurement_id": measurement,
        "revision": revision,
        "reading_hour": m.reading_hour,
        "meter": m.meter,
        "resource_id": m.resource_id,
        "resource_kind": m.resource_kind,
        "resource_name": m.resource_name,
        "org_id": m.org_id,
        "org_name": m.org_name,
        "space_id": m.space_id,
        "space_name": m.space_name,
        "value": value,
        "unit": m.unit,
        "estimated": m.estimated,
        "status": "unpriced" if price_id is None else "priced",
        "price_id": price_id,  # orjson writes a UUID in its canonical form, as str()
        "amount_numerator": numerator,
        "amount_denominator": denominator,
        "display_amount": display_amount(numerator, denominator),
        "priced_at": priced_at,
    }


def price_batch(batch: Sequence[MeasurementTaken], catalog: Catalog, priced_at: datetime) -> PricedBatch:
    """Price revision 1 of every distinct measurement in ``batch`` with the price valid at its hour.

    Rejected (by position): a reading hour that is not a whole hour, an id that is not the measurement
    id of (hour, meter, resource), an amount beyond the contract's integers. A measurement repeated in
    the batch is priced once (ids are deterministic, so a repeat is the same fact)."""
    out = PricedBatch()
    seen: set[UUID] = set()
    hour_texts: dict[datetime, str | None] = {}
    for index, m in enumerate(batch):
        if m.id in seen:
            continue
        hour = m.reading_hour
        hour_text = hour_texts.get(hour, "")
        if hour_text == "":
            whole = hour.minute == 0 and hour.second == 0 and hour.microsecond == 0
            hour_text = hour.strftime("%Y-%m-%dT%H:00:00Z") if whole else None
            hour_texts[hour] = hour_text
        if hour_text is None:
            out.rejects.append((index, "reading_hour must be a whole UTC hour (minute 0)"))
            continue
        if _uuid5_bytes(f"measurement|{hour_text}|{m.meter}|{m.resource_id}") != m.id.bytes:
            out.rejects.append((index, "id is not shared.ids.measurement_id(reading_hour, meter, resource_id)"))
            continue
        price = catalog.price_at(m.meter, m.resource_kind, hour)
        if price is None:
            price_id, numerator, denominator = None, 0, 1
        else:
            price_id = price.id
            numerator, denominator = exact_amount(m.value, price.microcredits_per_unit, price.unit)
            if numerator > MAX_AMOUNT:
                out.rejects.append((index, f"charge of {numerator}/{denominator} microcredits exceeds 2**62"))
                continue
        seen.add(m.id)
        payload = orjson.dumps(
            _document(m, _uuid_text(m.id), 1, price_id, numerator, denominator, m.value, priced_at),
            option=_DUMPS_OPTIONS,
        )
        if price_id is None:
            out.unpriced.append((m.id, hour, m.meter, m.resource_kind, 1, payload.decode()))
        out.measurements.append(m)
        out.rows.append((hour, m.id, 1, m.meter, m.resource_kind, m.value, price_id, numerator, denominator, priced_at))
        out.payloads.append(payload)
    return out


def stored_charge_payload(m: MeasurementTaken, stored: StoredCharge) -> bytes:
    """The message of a stored revision, with the descriptive fields of its measurement: what a
    redelivered measurement publishes again."""
    doc = _document(
        m,
        str(m.id),
        stored.revision,
        stored.price_id,
        stored.amount_numerator,
        stored.amount_denominator,
        stored.value,
        stored.priced_at,
    )
    return orjson.dumps(doc, option=_DUMPS_OPTIONS)


@dataclass(frozen=True, slots=True)
class Repriced:
    """A new revision of a charge that was unpriced."""

    row: ChargeRow
    org_id: str
    payload: bytes


def reprice_document(
    document: Mapping[str, Any], reading_hour: datetime, catalog: Catalog, priced_at: datetime
) -> Repriced | None:
    """The next revision of the unpriced charge ``document`` (a ChargeComputed as published) priced
    with the catalog; None when still no price covers it or the amount would exceed the contract."""
    meter, kind, value = document["meter"], document["resource_kind"], int(document["value"])
    price = catalog.price_at(meter, kind, reading_hour)
    if price is None:
        return None
    numerator, denominator = exact_amount(value, price.microcredits_per_unit, price.unit)
    if numerator > MAX_AMOUNT:
        return None
    revision = int(document["revision"]) + 1
    measurement = str(document["measurement_id"])
    doc = dict(document)
    doc.update(
        id=charge_id_str(measurement, revision),
        revision=revision,
        status="priced",
        price_id=str(price.id),
        amount_numerator=numerator,
        amount_denominator=denominator,
        display_amount=display_amount(numerator, denominator),
        priced_at=priced_at,
    )
    row: ChargeRow = (
        reading_hour,
        UUID(measurement),
        revision,
        meter,
        kind,
        value,
        price.id,
        numerator,
        denominator,
        priced_at,
    )
    return Repriced(row=row, org_id=str(document.get("org_id", "")), payload=orjson.dumps(doc, option=_DUMPS_OPTIONS))


def check_end(price: Price, at: datetime, last_priced_hour: datetime | None) -> bool:
    """Whether ending ``price`` at ``at`` changes it (False: it already ends exactly then).

    Raises PriceEndRefusedError when ``at`` is not after its start, later than its current end, or
    not after the last hour already priced with it (history that was charged is not rewritten)."""
    if at <= price.valid_from:
        raise PriceEndRefusedError(
            f"a price can only end after it starts ({price.valid_from.isoformat()}); got {at.isoformat()}"
        )
    if price.valid_until is not None:
        if at == price.valid_until:
            return False
        if at > price.valid_until:
            raise PriceEndRefusedError(
                f"the price already ends at {price.valid_until.isoformat()}; it can only be ended earlier"
            )
    if last_priced_hour is not None and last_priced_hour >= at:
        raise PriceEndRefusedError(
            f"the price already priced charges up to the hour {last_priced_hour.isoformat()}; "
            "end it after that hour (charged history is not rewritten)"
        )
    return True
