"""The pricer's internal HTTP interface: what each route takes and answers, and the routes as contracts
(``shared.edge.Operation``; ``handlers.py`` binds them). The api forwards /admin/prices and
/admin/unpriced here and documents them with these same models. Every route needs a token with
``usage.admin`` (README, "Security model")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self, cast
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.pricer.pricing import MAX_AMOUNT, Price, RerateJob, is_month_boundary
from shared import audit
from shared.auth import SCOPE_ADMIN
from shared.completeness import PricerCompleteness
from shared.completeness import operation as completeness_operation
from shared.contracts import ChargeComputed
from shared.edge import Answer, Count, CursorText, Operation, Page, Params, Reply, Time, Uuid, count, declarer
from shared.price_models import MAX_BANDS, InvalidPriceModelError, PriceModel, from_document, to_document

__all__ = [
    "ADD_PRICE",
    "AUDIT",
    "COMPLETENESS",
    "END_PRICE",
    "GET_PRICE",
    "GET_RERATE",
    "LIST_PRICES",
    "LIST_RERATES",
    "OPERATIONS",
    "START_RERATE",
    "UNPRICED",
    "BandIn",
    "BandOut",
    "CorrectedTerms",
    "PriceCreatedOut",
    "PriceEndIn",
    "PriceIn",
    "PriceList",
    "PriceOut",
    "PricePath",
    "PriceScope",
    "PricesQuery",
    "RerateIn",
    "RerateList",
    "RerateOut",
    "ReratePath",
    "ReratesQuery",
    "UnpricedList",
    "UnpricedQuery",
]

Meter = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Kind = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{0,128}$")]  # the empty kind is a kind


class BandIn(BaseModel):
    """A band of a graduated or volume price: the units up to and including ``up_to`` (in the price's unit;
    null: no upper edge, the last band) at ``microcredits_per_unit`` each, plus ``flat_fee`` once reached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    up_to: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,18}(/[1-9][0-9]{0,18})?$")] | None = Field(
        description='The upper edge, inclusive, as an exact string "n" or "n/d" (never a JSON number); null for '
        "the last band. The lower edge is the previous band's `up_to` (0 for the first)."
    )
    microcredits_per_unit: Annotated[int, Field(ge=0, le=MAX_AMOUNT, strict=True)]
    flat_fee: Annotated[int, Field(ge=0, le=MAX_AMOUNT, strict=True)] = Field(
        default=0, description="Whole microcredits charged once a customer's month total is above the lower edge."
    )


class PriceScope(BaseModel):
    """Whom a price applies to (a rate card): one tier (``tier``, its name) or one customer (``customer``, its
    id), exactly one of them. During its validity it overrides the global price of the same (meter, kind)
    for the orgs of that customer (or of that tier's customers); a customer's price wins over its tier's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tier: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")] | None = Field(
        default=None, description="The tier's name (as the ledger has it)."
    )
    customer: UUID | None = Field(default=None, description="The customer's id (as the ledger has it).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.tier is None) == (self.customer is None):
            raise ValueError("a scope names exactly one of tier or customer (omit scope for a global price)")
        return self

    def key(self) -> tuple[str, str]:
        """(scope_kind, scope_id) as the prices table holds them."""
        return ("tier", self.tier) if self.tier is not None else ("customer", str(self.customer))

    @classmethod
    def of(cls, scope_kind: str, scope_id: str) -> PriceScope | None:
        if scope_kind == "tier":
            return cls(tier=scope_id)
        if scope_kind == "customer":
            return cls(customer=UUID(scope_id))
        return None


class PriceIn(BaseModel):
    """``POST /internal/prices``: a price valid from ``valid_from`` until ``valid_until`` (exclusive;
    null: no end yet). ``flat`` (the default): ``microcredits_per_unit`` per ``unit``, no bands.
    ``graduated`` / ``volume``: ``bands`` (1 to 32, edges strictly increasing, the last open-ended), no rate
    (absent or 0), applied to a customer's month total of the price in units of ``unit``; such a price
    starts and ends only on a billing-month boundary (midnight America/New_York on the 1st)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    meter: Meter
    resource_kind: Kind = ""
    unit_of_measure: Annotated[str, Field(min_length=1, max_length=32, pattern=r"\S")] = Field(
        description="What ``unit`` counts, e.g. `MB-hour` or `instance-hour` (informational)."
    )
    model: Literal["flat", "graduated", "volume"] = Field(
        default="flat", description="How the price turns units into microcredits (docs/price-models.md)."
    )
    microcredits_per_unit: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] | None = Field(
        default=None, description="The rate of a flat price (required for flat; absent or 0 otherwise)."
    )
    bands: Annotated[list[BandIn], Field(min_length=1, max_length=MAX_BANDS)] | None = Field(
        default=None, description="The bands of a graduated or volume price (required for them; absent for flat)."
    )
    unit: Annotated[int, Field(gt=0, le=MAX_AMOUNT)] = Field(
        description="How many units of the measured quantity the price is for, e.g. 730 instance-hours."
    )
    valid_from: Time
    valid_until: Time | None = None
    scope: PriceScope | None = Field(
        default=None,
        description='Absent (or null): a global price. `{"tier": "<name>"}` or `{"customer": "<uuid>"}`: a rate '
        "card's price, overriding the global price of the same meter and kind for that tier's or customer's orgs "
        "while valid. Prices of one scope, meter and kind never overlap; a scoped price may overlap the global one.",
    )

    @model_validator(mode="after")
    def _range_not_empty(self) -> Self:
        if self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be later than valid_from")
        if self.model == "flat":
            if self.microcredits_per_unit is None:
                raise ValueError("a flat price needs microcredits_per_unit")
            if self.bands is not None:
                raise ValueError("a flat price has no bands (use model graduated or volume)")
            return self
        if self.bands is None:
            raise ValueError(f"a {self.model} price needs bands")
        if self.microcredits_per_unit:
            raise ValueError(f"a {self.model} price has no microcredits_per_unit: its bands give the rates")
        self.price_model()  # the bands, validated
        for name, moment in (("valid_from", self.valid_from), ("valid_until", self.valid_until)):
            if moment is not None and not is_month_boundary(moment):
                raise ValueError(
                    f"a {self.model} price starts and ends only on a billing-month boundary (midnight "
                    f"America/New_York on the 1st): {name} {moment.isoformat()} is not one"
                )
        return self

    def price_model(self) -> PriceModel:
        """The price's model, validated (``shared.price_models``); a ValueError says what is wrong."""
        if self.model == "flat":
            return PriceModel.flat(self.microcredits_per_unit or 0)
        bands = [b.model_dump() for b in self.bands or ()]
        try:
            return from_document({"model": self.model, "bands": bands})
        except InvalidPriceModelError as exc:
            raise ValueError(f"bands: {exc}") from None


class CorrectedTerms(BaseModel):
    """The corrected terms of a re-rating: the shape of ``POST /internal/prices`` without meter, kind and range
    (those are the re-rating's): ``microcredits_per_unit`` for ``flat``, or ``model`` and ``bands``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit_of_measure: Annotated[str, Field(min_length=1, max_length=32, pattern=r"\S")]
    model: Literal["flat", "graduated", "volume"] = "flat"
    microcredits_per_unit: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] | None = None
    bands: Annotated[list[BandIn], Field(min_length=1, max_length=MAX_BANDS)] | None = None
    unit: Annotated[int, Field(gt=0, le=MAX_AMOUNT)]


class RerateIn(BaseModel):
    """``POST /internal/rerates``: re-price the charges of (``meter``, ``resource_kind``) with a reading hour in
    [``from``, ``to``) (whole UTC hours) with the corrected ``price``, for ``reason``. The terms are validated
    as ``POST /internal/prices`` validates a price over that range: a graduated or volume correction starts and
    ends on billing-month boundaries (midnight America/New_York on the 1st)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    meter: Meter
    resource_kind: Kind = ""
    start: Time = Field(alias="from", description="The first reading hour corrected (a whole UTC hour).")
    end: Time = Field(alias="to", description="The end of the range, exclusive (a whole UTC hour, after from).")
    reason: Annotated[str, Field(min_length=1, max_length=500)] = Field(
        description="Why: it travels with the revisions (usage.charges.v3 `correction`) to the ledger's correction."
    )
    price: CorrectedTerms

    @model_validator(mode="after")
    def _range_and_terms(self) -> Self:
        for name, moment in (("from", self.start), ("to", self.end)):
            if moment.minute or moment.second or moment.microsecond:
                raise ValueError(f"{name} must be a whole UTC hour, not {moment.isoformat()}")
        if self.end <= self.start:
            raise ValueError("to must be later than from")
        self.price_in()
        return self

    def price_in(self) -> PriceIn:
        """The correction as a price over the range, validated like ``POST /internal/prices``."""
        try:
            return PriceIn(
                meter=self.meter, resource_kind=self.resource_kind, valid_from=self.start, valid_until=self.end,
                **{k: v for k, v in self.price.model_dump().items() if v is not None},
            )
        except ValidationError as exc:
            reasons = "; ".join(
                ".".join(str(p) for p in e.get("loc", ())) + (": " if e.get("loc") else "")
                + str(e.get("msg", "")).removeprefix("Value error, ")
                for e in exc.errors()
            )
            raise ValueError(f"price: {reasons}") from None


class PriceEndIn(BaseModel):
    """``POST /internal/prices/{id}/end``: the price stops applying at ``at`` (exclusive); a graduated or
    volume price only on a billing-month boundary (midnight America/New_York on the 1st)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: Time


class PricePath(Params):
    price_id: Uuid = Field(description="A price id.")


class PricesQuery(Params):
    meter: Meter | None = Field(default=None, description="Only this meter.")
    resource_kind: Kind | None = Field(default=None, description="Only this kind (the empty kind is a kind).")
    at: Time | None = Field(default=None, description="Only prices valid at this time.")
    limit: Count = count(1000, 10_000, "At most this many.")


class UnpricedQuery(Params):
    limit: Count = count(100, 1000)
    cursor: CursorText | None = Field(default=None, description="`next_cursor` of the previous page.")


class BandOut(Reply):
    up_to: str | None = Field(description='The upper edge, inclusive: "n" or "n/d"; null for the last band.')
    microcredits_per_unit: int = Field(ge=0)
    flat_fee: int = Field(ge=0)


class PriceOut(Reply):
    id: UUID
    meter: str
    resource_kind: str
    unit_of_measure: str
    model: Literal["flat", "graduated", "volume"]
    microcredits_per_unit: int = Field(ge=0, description="The rate of a flat price; 0 for graduated and volume.")
    bands: list[BandOut] | None = Field(description="The bands of a graduated or volume price; null for flat.")
    unit: int = Field(ge=1)
    valid_from: datetime
    valid_until: datetime | None
    created_at: datetime
    scope: PriceScope | None = Field(default=None, description="The tier or customer it applies to; null: global.")

    @classmethod
    def of(cls, price: Price) -> PriceOut:
        bands = None if price.flat else cast(list[dict[str, Any]], to_document(price.model)["bands"])
        return cls(
            id=price.id,
            meter=price.meter,
            resource_kind=price.resource_kind,
            unit_of_measure=price.unit_of_measure,
            model=price.model.model,
            microcredits_per_unit=price.microcredits_per_unit,
            bands=None if bands is None else [BandOut(**b) for b in bands],
            unit=price.unit,
            valid_from=price.valid_from,
            valid_until=price.valid_until,
            created_at=price.created_at,
            scope=PriceScope.of(price.scope_kind, price.scope_id),
        )


class PriceCreatedOut(PriceOut):
    repriced_charges: int = Field(
        default=0, ge=0, description="Unpriced charges this price covered, re-priced and published as new revisions."
    )


class PriceList(Reply):
    items: list[PriceOut]


class UnpricedList(Reply):
    items: list[ChargeComputed] = Field(description="The latest revision of each unpriced charge.")
    next_cursor: str | None = Field(
        default=None, description="Pass it back as `cursor` for the next page; null on the last page."
    )


class RerateOut(Reply):
    """A re-rating job. ``state``: running (queued or working: jobs run one at a time, oldest first), done, or
    failed (``failure`` says why). ``total``: the measurements of the meter in the range (every kind);
    ``done``: of them, looked at (``done`` reaches ``total`` when the job is done); ``repriced``: charges of the
    kind given a new revision with the correction; ``refused``: charges left as they were because their amount
    would exceed 2**62 microcredits."""

    model_config = ConfigDict(populate_by_name=True)

    id: UUID
    state: Literal["running", "done", "failed"]
    meter: str
    resource_kind: str
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    reason: str
    price: PriceOut = Field(description="The price correction: applies to the range in place of the prices.")
    done: int = Field(ge=0)
    total: int = Field(ge=0)
    repriced: int = Field(ge=0)
    refused: int = Field(ge=0)
    failure: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, job: RerateJob) -> RerateOut:
        assert job.price.valid_until is not None  # a correction has a finite range
        return cls.model_validate({
            "id": job.id, "state": job.state, "meter": job.meter, "resource_kind": job.resource_kind,
            "from": job.price.valid_from, "to": job.price.valid_until, "reason": job.reason,
            "price": PriceOut.of(job.price), "done": job.done, "total": job.total, "repriced": job.repriced,
            "refused": job.refused, "failure": job.failure, "created_at": job.created_at,
            "finished_at": job.finished_at,
        })


class RerateList(Page[RerateOut]):
    pass


class ReratePath(Params):
    rerate_id: Uuid = Field(description="A re-rating job id.")


class ReratesQuery(Params):
    limit: Count = count(100, 1000)
    cursor: CursorText | None = Field(default=None, description="`next_cursor` of the previous page.")


BUSY = "The price catalog is busy (batches hold its lock); retry."


_op = declarer(SCOPE_ADMIN, "pricer")


ADD_PRICE = _op(
    "POST", "/internal/prices", "Add a price (re-sending an identical one answers it with 200)",
    {
        201: Answer(PriceCreatedOut, "Added; unpriced charges it covers re-priced"),
        200: Answer(PriceCreatedOut, "The same price existed"),
    },
    body=PriceIn,
    refusals={409: "Another price of the meter and kind overlaps the range.", 503: BUSY},
    command="pricer.price.add",
)
LIST_PRICES = _op("GET", "/internal/prices", "Prices, filtered", {200: Answer(PriceList)}, query=PricesQuery)
GET_PRICE = _op(
    "GET", "/internal/prices/{price_id}", "One price", {200: Answer(PriceOut)},
    path_params=PricePath, refusals={404: "No such price."},
)
END_PRICE = _op(
    "POST", "/internal/prices/{price_id}/end", "End a price at a time (exclusive)", {200: Answer(PriceOut, "Ended")},
    path_params=PricePath, body=PriceEndIn,
    refusals={
        404: "No such price.",
        409: "The price has priced charges after that time, or cannot end then.",
        422: "A graduated or volume price ends only on a billing-month boundary (midnight America/New_York on "
        "the 1st).",
        503: BUSY,
    },
    command="pricer.price.end",
)
UNPRICED = _op(
    "GET", "/internal/charges/unpriced", "The latest revision of each charge that has no price",
    {200: Answer(UnpricedList)}, query=UnpricedQuery,
)
START_RERATE = _op(
    "POST", "/internal/rerates", "Correct a price over a range and re-price its charges (a background job)",
    {202: Answer(RerateOut, "The correction is stored; the job re-prices in the background")},
    body=RerateIn,
    refusals={409: "Another correction of the meter and kind overlaps the range.", 503: BUSY},
    command="pricer.rerate.start",
    description="The corrected terms become a price correction (a new price id) that the catalog applies to the "
    "range in place of the prices; the job then gives every latest charge of that meter and kind in the range "
    "whose price or amount changes a new revision, published on usage.charges.v3 with `correction` = {job id, "
    "reason}. Follow it with GET /internal/rerates/{rerate_id}.",
)
GET_RERATE = _op(
    "GET", "/internal/rerates/{rerate_id}", "A re-rating job and its progress", {200: Answer(RerateOut)},
    path_params=ReratePath, refusals={404: "No such job."},
)
LIST_RERATES = _op(
    "GET", "/internal/rerates", "Re-rating jobs, newest first", {200: Answer(RerateList)}, query=ReratesQuery,
)
COMPLETENESS = completeness_operation(PricerCompleteness, "pricer")
AUDIT = audit.operation("pricer")

OPERATIONS: tuple[Operation, ...] = (
    ADD_PRICE, LIST_PRICES, GET_PRICE, END_PRICE, UNPRICED, START_RERATE, LIST_RERATES, GET_RERATE, COMPLETENESS,
    AUDIT,
)
