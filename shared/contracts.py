"""Message contracts of the public topics, as pydantic models.

Every message carries ``schema_name`` and ``schema_version``; a change that breaks readers gets a new
topic version (``.v2``) and a new model here. Events are named in the past tense. Field descriptions
become the AsyncAPI document.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from shared.clock import as_utc
from shared.price_models import MAX_BANDS, InvalidPriceModelError, from_document

__all__ = [
    "MAX_ITEMS",
    "MAX_MESSAGE_BYTES",
    "SHARDS",
    "AlertRaised",
    "BandTerms",
    "ChargeComputed",
    "ChargesComputed",
    "ChargesComputedV2",
    "CorrectionRef",
    "EntryLine",
    "Event",
    "MeasurementTaken",
    "MeasurementsTaken",
    "Named",
    "OrgAssigned",
    "PriceTerms",
    "PriceTermsV2",
    "StatementIssued",
    "StatementLine",
    "TransactionPosted",
    "UsageLine",
    "UtcDatetime",
]

# A message larger than this is refused by every consumer (it goes to the DLQ).
MAX_MESSAGE_BYTES = 1_000_000

def _not_a_number(value: object) -> object:
    # pydantic would read 12 as 12 seconds after 1970: a time on a topic is an ISO-8601 string.
    if isinstance(value, (int, float)):
        raise ValueError("a time must be an ISO-8601 string with a time zone, not a number")
    return value


UtcDatetime = Annotated[datetime, BeforeValidator(_not_a_number), AfterValidator(as_utc)]
"""A timezone-aware datetime, normalised to UTC; naive datetimes and numbers are refused."""

# Numbers are strict: "512" or 512.0 is not the integer 512 on a public topic (it goes to the DLQ).
NonNegativeInt = Annotated[int, Field(ge=0, le=2**62, strict=True)]
# What a bigint column holds: a balance or a statement's figure may pass 2**62 (several agreements of up to
# 2**62 each), never 2**63 - 1 (the database refuses the sum first).
Int = Annotated[int, Field(ge=-(2**63 - 1), le=2**63 - 1, strict=True)]
Name = Annotated[str, Field(max_length=512)]


class Event(BaseModel):
    """Base of every message: immutable, strict about unknown fields, with its schema named."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: UUID = Field(description="Deterministic id: re-publishing the same fact yields the same id.")


class MeasurementTaken(Event):
    """One meter's measurement of one resource in one reading hour (topic ``usage.readings.v1``,
    keyed by resource id)."""

    schema_name: Literal["usage.measurement"] = "usage.measurement"
    schema_version: Literal[1] = 1
    reading_id: UUID = Field(description="The reading (one per hour) this measurement belongs to.")
    reading_hour: UtcDatetime = Field(description="The UTC hour measured (minute 0).")
    meter: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="What measured it: `cfapps` (MB of memory) or `cfservices` (instances)."
    )
    resource_id: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="The Cloud Foundry guid of the app or service instance."
    )
    resource_kind: Annotated[str, Field(max_length=128)] = Field(
        default="", description="Kind within the meter, e.g. a service plan guid; empty if the meter has one kind."
    )
    resource_name: Name = ""
    org_id: Annotated[str, Field(max_length=64)] = Field(default="", description="CF org guid; empty when unknown.")
    org_name: Name = ""
    space_id: Annotated[str, Field(max_length=64)] = ""
    space_name: Name = ""
    value: NonNegativeInt = Field(description="The measured quantity in `unit`s for this hour.")
    unit: Annotated[str, Field(min_length=1, max_length=32)] = Field(description="Unit of `value`: `MB` or `instance`.")
    estimated: bool = Field(default=False, strict=True, description="True when produced to fill a missed hour.")
    taken_at: UtcDatetime = Field(description="When the collector took (or estimated) it, UTC.")


class ChargeComputed(Event):
    """The exact price of one measurement: the shape of one charge in the pricer's admin lists (it was the
    message of ``usage.charges.v1``, retired for ``usage.charges.v2``, see ``ChargesComputed``).

    A later revision of the same measurement's charge replaces the earlier one downstream."""

    schema_name: Literal["usage.charge"] = "usage.charge"
    schema_version: Literal[1] = 1
    measurement_id: UUID = Field(description="The measurement priced; stable across revisions.")
    revision: Annotated[int, Field(ge=1, strict=True)] = Field(
        description="1 for the first pricing, +1 for each re-pricing."
    )
    reading_hour: UtcDatetime
    meter: Annotated[str, Field(min_length=1, max_length=64)]
    resource_id: Annotated[str, Field(min_length=1, max_length=64)]
    resource_kind: Annotated[str, Field(max_length=128)] = ""
    resource_name: Name = ""
    org_id: Annotated[str, Field(max_length=64)] = ""
    org_name: Name = ""
    space_id: Annotated[str, Field(max_length=64)] = ""
    space_name: Name = ""
    value: NonNegativeInt
    unit: Annotated[str, Field(min_length=1, max_length=32)]
    estimated: bool = Field(default=False, strict=True)
    status: Literal["priced", "unpriced"]
    price_id: UUID | None = Field(default=None, description="The price applied; null when unpriced.")
    amount_numerator: NonNegativeInt = Field(description="Exact microcredits = numerator / denominator.")
    amount_denominator: Annotated[int, Field(ge=1, le=2**62, strict=True)] = 1
    display_amount: str = Field(description="Credits rounded to 6 places, for people only; never summed.")
    priced_at: UtcDatetime


class EntryLine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str = Field(description="Account name, e.g. `credit_pool:<agreement>` or `usage`.")
    side: Literal["debit", "credit"]
    amount: Annotated[int, Field(gt=0, le=2**63 - 1, strict=True)] = Field(description="Positive integer microcredits.")


class UsageLine(BaseModel):
    """Usage posted by a usage transaction, per org, meter, kind and price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    org_id: str
    meter: str
    resource_kind: str = ""
    price_id: UUID | None = None
    microcredits: Int


class TransactionPosted(Event):
    """A committed ledger transaction (topic ``ledger.transactions.v1``, keyed by customer id)."""

    schema_name: Literal["ledger.transaction"] = "ledger.transaction"
    schema_version: Literal[1] = 1
    customer_id: UUID
    type: Literal["funding", "usage", "late_usage", "expiry", "reversal", "correction"]
    occurred_at: UtcDatetime
    reading_hour: UtcDatetime | None = None
    description: str = ""
    idempotency_key: str
    entries: list[EntryLine]
    usage: list[UsageLine] = Field(default_factory=list)
    reverses: UUID | None = Field(default=None, description="For a reversal: the transaction it reverses.")
    agreement_id: UUID | None = Field(default=None, description="For funding and expiry: the agreement.")
    posted_at: UtcDatetime
    corrects_month: Annotated[str, Field(pattern=r"^\d{4}-\d{2}$")] | None = Field(
        default=None,
        description="For a correction: the closed month a correction restates (YYYY-MM, America/New_York); the "
        "transaction itself is dated in the first open month.",
    )


class AlertRaised(Event):
    """A customer's used share of funded credits crossed a threshold (topic ``ledger.alerts.v1``)."""

    schema_name: Literal["ledger.alert"] = "ledger.alert"
    schema_version: Literal[1] = 1
    customer_id: UUID
    agreement_id: UUID
    threshold_percent: Literal[50, 75, 90, 100]
    funded: Int
    used: Int
    raised_at: UtcDatetime


class StatementLine(BaseModel):
    """Usage of a month per meter, kind and price. On an amended statement (version 2 and later): the
    ``original`` figure of version 1, the ``correction`` of all corrections of the month so far, and the
    amended ``microcredits`` = original + correction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    meter: str
    resource_kind: str = ""
    microcredits: Int
    price_id: UUID | None = Field(default=None, description="The price applied; null when unpriced.")
    original: Int | None = Field(default=None, description="Version 1's figure; null on version 1.")
    correction: Int | None = Field(default=None, description="The corrections of the month so far; null on version 1.")


class StatementIssued(Event):
    """A customer's closed month (America/New_York), published on ``ledger.transactions.v1`` keyed by
    customer id; readers tell it from transactions by ``schema_name``.

    Version 1 is issued when the month closes. A correction of the closed month (a re-rating, posted as a
    ``correction`` transaction dated in the first open month) gets the month an amended statement, version
    2, 3, ...: its ``used`` is restated (``original_used`` + ``correction``, and per line likewise), while
    its opening and closing balances, funded and expired are version 1's, since the balance effect of a
    correction is settled in the month its transaction is dated in (that month's statement counts it)."""

    schema_name: Literal["ledger.statement"] = "ledger.statement"
    schema_version: Literal[1] = 1
    customer_id: UUID
    month: Annotated[str, Field(pattern=r"^\d{4}-\d{2}$")] = Field(description="YYYY-MM, America/New_York.")
    opening_balance: Int
    funded: Int
    used: Int
    expired: Int
    closing_balance: Int
    used_by_kind: list[StatementLine]
    issued_at: UtcDatetime
    version: Annotated[int, Field(ge=1, strict=True)] = Field(
        default=1, description="1 when the month closed; 2, 3, ... for each amended statement."
    )
    original_used: Int | None = Field(default=None, description="Version 1's `used`; null on version 1.")
    correction: Int | None = Field(
        default=None, description="The sum of the month's corrections so far (`used` = original_used + correction)."
    )
    reasons: list[str] = Field(
        default_factory=list,
        description='The corrections an amended statement covers, as "correction <job id>: <reason>".',
    )


class OrgAssigned(Event):
    """An org assigned to a customer from ``starts_at`` (topic ``ledger.assignments.v1``, keyed by org id,
    kept forever: a new reader reads every assignment from the beginning). The org belongs to that customer
    from ``starts_at`` until the org's next assignment starts. ``id`` is
    ``shared.ids.org_assignment_id(org_id, starts_at)``."""

    schema_name: Literal["ledger.org_assignment"] = "ledger.org_assignment"
    schema_version: Literal[1] = 1
    org_id: Annotated[str, Field(min_length=1, max_length=64)] = Field(description="CF org guid.")
    starts_at: UtcDatetime = Field(description="From when the org's usage is the customer's.")
    customer_id: UUID
    tier: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="The customer's tier (a customer's tier never changes): what tier-scoped prices apply to."
    )
    assigned_at: UtcDatetime = Field(description="When the ledger committed the assignment.")


# ------------------------------------------------------------------------------------------ batches (v2)

SHARDS = 24
"""Resources are dealt to this many shards: ``shard = crc32(resource_id as UTF-8) % SHARDS``
(``shared.batches.shard_of``). A measurement's shard follows from its identity alone, so consumers keep
their state per (reading hour, meter, shard) and find a measurement's stored copy however it arrives."""

MAX_ITEMS = 5000
"""Most measurements (charges) one batch message carries; a larger shard is sent as several parts."""

Index = Annotated[int, Field(ge=0, lt=MAX_ITEMS, strict=True)]
ResourceId = Annotated[str, Field(min_length=1, max_length=64)]
Kind = Annotated[str, Field(max_length=128)]


class Named(BaseModel):
    """An org or a space as the batch's dictionary lists it (items refer to it by position)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(max_length=64)] = Field(description="CF guid; empty when unknown.")
    name: Name = ""


def _same_length(model: BaseModel, columns: tuple[str, ...], tables: dict[str, str]) -> None:
    """Every item column has one entry per item, and every index column points into its table."""
    lengths = {name: len(getattr(model, name)) for name in columns}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"item columns differ in length: {lengths}")
    for column, table in tables.items():
        size = len(getattr(model, table))
        bad = [i for i, v in enumerate(getattr(model, column)) if v >= size]
        if bad:
            raise ValueError(f"{column}[{bad[0]}] = {getattr(model, column)[bad[0]]} is not a position in {table}")


_MEASUREMENT_COLUMNS = ("resource_id", "resource_name", "org", "space", "kind", "value", "estimated")
_MEASUREMENT_TABLES = {"org": "orgs", "space": "spaces", "kind": "kinds"}


class MeasurementsTaken(Event):
    """Many measurements of one reading hour and meter, for one shard of resources (topic
    ``usage.readings.v2``, keyed ``shard-<n>``). Columnar: item *i* is the *i*-th entry of every item
    column (``resource_id`` … ``estimated``); ``org``, ``space`` and ``kind`` are positions in the
    ``orgs``, ``spaces`` and ``kinds`` tables. A measurement's identity is (reading hour, meter,
    resource id), its id ``shared.ids.measurement_id`` of those: it counts once however it arrives.
    The message id is derived from the hour, meter, shard and the resource ids it carries."""

    schema_name: Literal["usage.measurements"] = "usage.measurements"
    schema_version: Literal[2] = 2
    reading_id: UUID = Field(description="The reading (one per hour) these measurements belong to.")
    reading_hour: UtcDatetime = Field(description="The UTC hour measured (minute 0).")
    meter: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="What measured them: `cfapps` (MB of memory) or `cfservices` (instances)."
    )
    unit: Annotated[str, Field(min_length=1, max_length=32)] = Field(description="Unit of `value`: `MB` or `instance`.")
    shard: Annotated[int, Field(ge=0, lt=SHARDS, strict=True)] = Field(
        description="crc32(resource_id) % 24 of every item (consumers check it item by item)."
    )
    taken_at: UtcDatetime = Field(description="When the collector took (or estimated) them, UTC.")
    orgs: Annotated[list[Named], Field(max_length=MAX_ITEMS)] = Field(description="The orgs the items refer to.")
    spaces: Annotated[list[Named], Field(max_length=MAX_ITEMS)] = Field(description="The spaces the items refer to.")
    kinds: Annotated[list[Kind], Field(max_length=MAX_ITEMS)] = Field(
        description="Kinds within the meter (e.g. service plan guids; `\"\"` if the meter has one kind)."
    )
    resource_id: Annotated[list[ResourceId], Field(max_length=MAX_ITEMS)] = Field(
        description="Per item: the Cloud Foundry guid of the app or service instance."
    )
    resource_name: Annotated[list[Name], Field(max_length=MAX_ITEMS)] = Field(description="Per item: its name.")
    org: Annotated[list[Index], Field(max_length=MAX_ITEMS)] = Field(description="Per item: position in `orgs`.")
    space: Annotated[list[Index], Field(max_length=MAX_ITEMS)] = Field(description="Per item: position in `spaces`.")
    kind: Annotated[list[Index], Field(max_length=MAX_ITEMS)] = Field(description="Per item: position in `kinds`.")
    value: Annotated[list[NonNegativeInt], Field(max_length=MAX_ITEMS)] = Field(
        description="Per item: the measured quantity in `unit`s for this hour."
    )
    estimated: Annotated[list[Annotated[bool, Field(strict=True)]], Field(max_length=MAX_ITEMS)] = Field(
        description="Per item: true when produced to fill a missed hour."
    )

    @model_validator(mode="after")
    def _columns_agree(self) -> MeasurementsTaken:
        _same_length(self, _MEASUREMENT_COLUMNS, _MEASUREMENT_TABLES)
        return self


class PriceTermsV2(BaseModel):
    """A price the items of a ``usage.charges.v2`` batch refer to (flat: an item's amount is exact)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: UUID
    microcredits_per_unit: NonNegativeInt
    unit: Annotated[int, Field(ge=1, le=2**62, strict=True)]


BandEdge = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,18}(/[1-9][0-9]{0,18})?$", max_length=64)]


class BandTerms(BaseModel):
    """A band of a graduated or volume price (``shared.price_models.Band`` in its JSON form)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    up_to: BandEdge | None = Field(
        description='The band\'s upper edge in the price\'s units, inclusive, as an exact string "n" or "n/d"; '
        "null for the last band (open-ended). Its lower edge is the previous band's `up_to` (0 for the first)."
    )
    microcredits_per_unit: NonNegativeInt = Field(description="The band's rate per unit of the price.")
    flat_fee: NonNegativeInt = Field(default=0, description="Whole microcredits charged once the band is reached.")


class PriceTerms(BaseModel):
    """A price the items of a charge batch refer to: ``flat`` (``microcredits_per_unit`` per ``unit``, no
    bands; an item's amount is exact), or ``graduated`` / ``volume`` (``bands``; the rate is 0 and an item's
    amount is 0/1: the ledger prices the customer's month total of the price, ``docs/price-models.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: UUID
    microcredits_per_unit: NonNegativeInt
    unit: Annotated[int, Field(ge=1, le=2**62, strict=True)]
    model: Literal["flat", "graduated", "volume"] = Field(
        default="flat", description="How the price turns a customer's month of units into microcredits."
    )
    bands: Annotated[list[BandTerms], Field(max_length=MAX_BANDS)] | None = Field(
        default=None, description="The bands of a graduated or volume price; absent for flat."
    )

    @model_validator(mode="after")
    def _model_fits(self) -> PriceTerms:
        if self.model == "flat":
            if self.bands is not None:
                raise ValueError("a flat price has no bands")
            return self
        if self.bands is None:
            raise ValueError(f"a {self.model} price needs bands")
        try:
            from_document({"model": self.model, "bands": [b.model_dump() for b in self.bands]})
        except InvalidPriceModelError as exc:
            raise ValueError(str(exc)) from None
        return self


_CHARGE_COLUMNS = (*_MEASUREMENT_COLUMNS, "revision", "price", "amount_numerator", "amount_denominator")


class _ChargeColumns(Event):
    """The columns of a charges batch (both versions)."""

    reading_hour: UtcDatetime = Field(description="The UTC hour measured (minute 0).")
    meter: Annotated[str, Field(min_length=1, max_length=64)]
    unit: Annotated[str, Field(min_length=1, max_length=32)]
    shard: Annotated[int, Field(ge=0, lt=SHARDS, strict=True)]
    priced_at: UtcDatetime = Field(description="When the pricer priced this batch, UTC.")
    orgs: Annotated[list[Named], Field(max_length=MAX_ITEMS)]
    spaces: Annotated[list[Named], Field(max_length=MAX_ITEMS)]
    kinds: Annotated[list[Kind], Field(max_length=MAX_ITEMS)]
    resource_id: Annotated[list[ResourceId], Field(max_length=MAX_ITEMS)]
    resource_name: Annotated[list[Name], Field(max_length=MAX_ITEMS)]
    org: Annotated[list[Index], Field(max_length=MAX_ITEMS)]
    space: Annotated[list[Index], Field(max_length=MAX_ITEMS)]
    kind: Annotated[list[Index], Field(max_length=MAX_ITEMS)]
    value: Annotated[list[NonNegativeInt], Field(max_length=MAX_ITEMS)]
    estimated: Annotated[list[Annotated[bool, Field(strict=True)]], Field(max_length=MAX_ITEMS)]
    revision: Annotated[list[Annotated[int, Field(ge=1, le=2**31 - 1, strict=True)]], Field(max_length=MAX_ITEMS)] = (
        Field(description="Per item: 1 for the first pricing, +1 for each re-pricing.")
    )
    price: Annotated[list[Annotated[int, Field(ge=-1, lt=MAX_ITEMS, strict=True)]], Field(max_length=MAX_ITEMS)] = (
        Field(description="Per item: position in `prices`, or -1 when no price covers it (unpriced, amount 0).")
    )
    amount_numerator: Annotated[list[NonNegativeInt], Field(max_length=MAX_ITEMS)] = Field(
        description="Per item: microcredits = numerator / denominator, exact for a flat price; 0 (over 1) for a "
        "graduated or volume price (priced by the ledger on the customer's month total of the price)."
    )
    amount_denominator: Annotated[
        list[Annotated[int, Field(ge=1, le=2**62, strict=True)]], Field(max_length=MAX_ITEMS)
    ] = Field(description="Per item: see `amount_numerator`.")

    def _check_columns(self, prices: Sequence[PriceTermsV2 | PriceTerms]) -> None:
        _same_length(self, _CHARGE_COLUMNS, _MEASUREMENT_TABLES)
        for i, (p, n) in enumerate(zip(self.price, self.amount_numerator, strict=True)):
            if p >= len(prices):
                raise ValueError(f"price[{i}] = {p} is not a position in prices")
            if p < 0 and n != 0:
                raise ValueError(f"item {i} is unpriced with a non-zero amount")
            model = getattr(prices[p], "model", "flat") if p >= 0 else "flat"
            if model != "flat" and (n != 0 or self.amount_denominator[i] != 1):
                raise ValueError(f"item {i} of a {model} price must have amount 0/1 (the ledger prices it)")


class CorrectionRef(BaseModel):
    """The re-rating a batch of revisions comes from (``POST /admin/rerate``): its job id and reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: UUID = Field(description="The re-rating job's id.")
    reason: Annotated[str, Field(min_length=1, max_length=500)] = Field(description="Why the range was re-rated.")


class ChargesComputed(_ChargeColumns):
    """The charges of many measurements of one reading hour and meter, for one shard of resources (topic
    ``usage.charges.v3``, keyed ``shard-<n>``): the measurement columns of ``MeasurementsTaken`` plus, per
    item, the charge's revision, its price (position in ``prices``; -1 when unpriced) and its amount in
    microcredits, ``amount_numerator / amount_denominator``. An item's units are ``value /
    prices[price].unit``; its amount is exact for a ``flat`` price and 0/1 for a ``graduated`` or
    ``volume`` one ("priced by the ledger on the month's total": its money depends on the customer's month
    total of the price, posted on ``ledger.transactions.v1``). A later revision of a measurement's charge
    replaces the earlier one downstream; an item not newer than what a consumer holds changes nothing."""

    schema_name: Literal["usage.charges"] = "usage.charges"
    schema_version: Literal[3] = 3
    prices: Annotated[list[PriceTerms], Field(max_length=MAX_ITEMS)] = Field(description="The prices applied.")
    correction: CorrectionRef | None = Field(
        default=None,
        description="Set on the revisions of a re-rating (a price corrected over a range, ``POST /admin/rerate``): "
        "its job and reason; null on every other batch. A closed month's difference is then posted as a "
        "correction (and the month amended) rather than as late usage.",
    )

    @model_validator(mode="after")
    def _columns_agree(self) -> ChargesComputed:
        self._check_columns(self.prices)
        return self


class ChargesComputedV2(_ChargeColumns):
    """``usage.charges.v2``, the previous version (flat prices only, every amount exact): no longer
    published, still read to drain what the topic retains. Its items are those of ``ChargesComputed``."""

    schema_name: Literal["usage.charges"] = "usage.charges"
    schema_version: Literal[2] = 2
    prices: Annotated[list[PriceTermsV2], Field(max_length=MAX_ITEMS)] = Field(description="The prices applied.")

    @model_validator(mode="after")
    def _columns_agree(self) -> ChargesComputedV2:
        self._check_columns(self.prices)
        return self
