"""The api's own HTTP interface: what its routes take (parameters, the entitlement body) and answer, and the
routes as contracts (``shared.edge.Operation``; ``handlers.py`` binds them). The admin commands it forwards
are declared by their owners (``services/<owner>/schemas.py``) and reused by ``forward.py``.

A little over 400 lines: declarations only (models and route contracts), read together with the document
they generate."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from services.api.service import GRANULARITIES, GROUP_BYS, MAX_PERIODS, TRANSACTION_TYPES
from shared.audit import AuditFilters, AuditPage, Service
from shared.auth import SCOPE_ADMIN, SCOPE_READ
from shared.completeness import RangeQuery
from shared.contracts import EntryLine, StatementLine, UsageLine
from shared.edge import Answer, Count, CursorText, Month, Operation, Page, Params, Reply, Time, Uuid, count, declarer

__all__ = [
    "AUDIT",
    "BALANCE",
    "COMPLETENESS",
    "CUSTOMERS",
    "DEFAULT_LIMIT",
    "ENTITLEMENTS",
    "GRANT",
    "MAX_LIMIT",
    "OPERATIONS",
    "READ_MODEL_AGE",
    "REVOKE",
    "STATEMENT",
    "SUBJECT_PATTERN",
    "TRANSACTIONS",
    "USAGE",
    "AdminAuditQuery",
    "Balance",
    "BalanceQuery",
    "CompletenessReport",
    "CustomerItem",
    "CustomerPage",
    "CustomerPath",
    "Entitlement",
    "EntitlementIn",
    "EntitlementKey",
    "EntitlementPage",
    "EntitlementsQuery",
    "PageQuery",
    "Statement",
    "StatementPath",
    "StatementQuery",
    "StatementVersion",
    "Subject",
    "Transaction",
    "TransactionPage",
    "TransactionsQuery",
    "UsagePage",
    "UsageQuery",
]

DEFAULT_LIMIT, MAX_LIMIT = 100, 500

# A token subject an admin may entitle: what OIDC providers put in `sub` (UAA user and client ids, GUIDs,
# "provider|id", e-mail-like names, base64url), without spaces, quotes or other punctuation.
SUBJECT_PATTERN = r"^[A-Za-z0-9._@:+|/=~-]{1,256}$"
Subject = Annotated[str, Field(min_length=1, max_length=256, pattern=SUBJECT_PATTERN)]


# ------------------------------------------------------------------------------------------ bodies


class EntitlementIn(BaseModel):
    """Entitle a token subject to read a customer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: Subject = Field(description="The `sub` claim of the tokens this entitlement applies to.")
    customer_id: Uuid


# ------------------------------------------------------------------------------------------ parameters


class PageQuery(Params):
    limit: Count = count(DEFAULT_LIMIT, MAX_LIMIT)
    cursor: CursorText | None = Field(
        default=None, description="Opaque cursor from `next_cursor` of the previous page of the same query."
    )


class CustomerPath(Params):
    customer_id: Uuid = Field(description="The customer's id.")


class StatementPath(CustomerPath):
    month: Month = Field(description="YYYY-MM (America/New_York).")


class StatementQuery(Params):
    version: int | None = Field(
        default=None, ge=1, le=2**31 - 1,
        description="A version of the month's statement (1 = the close, 2, 3, ... = amended); default: the latest.",
    )


class BalanceQuery(Params):
    as_of: Time | None = Field(
        default=None, description="Count transactions that occurred at or before this time (default: now)."
    )


class UsageQuery(PageQuery):
    start: Time = Field(alias="from", description="Start (inclusive), with its zone.")
    end: Time = Field(alias="to", description="End (exclusive), with its zone.")
    granularity: Literal["hour", "day", "month"] = Field(default="day", description="Period length.")
    group_by: Literal["org", "space", "resource", "meter", "kind"] = Field(
        default="org", description="Grouping dimension."
    )


class TransactionsQuery(PageQuery):
    type: Literal["funding", "usage", "late_usage", "expiry", "reversal", "correction"] | None = Field(
        default=None, description="Only this type."
    )
    start: Time | None = Field(default=None, alias="from", description="Occurred at or after.")
    end: Time | None = Field(default=None, alias="to", description="Occurred before.")


class EntitlementsQuery(PageQuery):
    subject: Subject | None = Field(default=None, description="A token subject.")
    customer_id: Uuid | None = Field(default=None, description="A customer id.")


class EntitlementKey(Params):
    subject: Subject = Field(description="A token subject.")
    customer_id: Uuid = Field(description="A customer id.")


class AdminAuditQuery(AuditFilters):
    service: Service | None = Field(default=None, description="Only this service's commands.")
    limit: Count = count(DEFAULT_LIMIT, MAX_LIMIT)
    cursor: CursorText | None = Field(
        default=None, description="Opaque cursor from `next_cursor` of the previous page of the same query."
    )


# ------------------------------------------------------------------------------------------ answers


class CustomerItem(Reply):
    customer_id: UUID
    first_seen_at: datetime


class CustomerPage(Page[CustomerItem]):
    pass


class Credits(Reply):
    """The same figures in credits, 6 decimals, for people only."""

    funded: str
    used: str
    expired: str
    remaining: str
    overage: str


class Balance(Reply):
    """Integer microcredits. remaining = funded - used - expired; overage = max(0, -remaining)."""

    customer_id: UUID
    as_of: datetime
    funded: int
    used: int
    expired: int
    remaining: int
    overage: int = Field(ge=0)
    credits: Credits


class Quantity(Reply):
    """Sum over the period's hours of the measured value, in `unit` (MB of memory, instances)."""

    unit: str
    value: int


class UsageGroup(BaseModel):
    """The group's key and display names: org_id/org_name for org; space_id, space_name, org_id, org_name
    for space; resource_id, resource_name, meter, resource_kind, space and org for resource; meter for
    meter; meter and resource_kind for kind."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"additionalProperties": False})

    org_id: str = ""
    org_name: str = ""
    space_id: str = ""
    space_name: str = ""
    resource_id: str = ""
    resource_name: str = ""
    meter: str = ""
    resource_kind: str = ""


class UsageItem(Reply):
    period: str = Field(description="YYYY-MM, YYYY-MM-DD (America/New_York) or the UTC hour.")
    period_start: datetime
    period_end: datetime
    group: UsageGroup
    quantities: list[Quantity]
    priced: Literal["exact", "monthly"] = Field(
        description="`exact`: usage of flat prices, its money the exact sum of its charges. `monthly`: usage of "
        "graduated or volume prices, whose money depends on the customer's month total and is posted by the "
        "ledger: per org, meter or kind the money is what the ledger posted for it (its usage lines; hours are an "
        "attribution), per space or resource it is null (only the units are known). A group with both has one "
        "item of each."
    )
    microcredits: int | None = Field(description="Floor of the exact sum; null for `monthly` spaces and resources.")
    microcredits_exact: str | None = Field(
        pattern=r"^-?[0-9]+/[0-9]+$",
        description="The exact sum as a reduced fraction numerator/denominator; null when `microcredits` is.",
    )
    credits: str | None = Field(
        description="Credits, 6 decimals, for people only (never sum it); null when `microcredits` is."
    )


class UsagePage(Reply):
    model_config = ConfigDict(populate_by_name=True)

    customer_id: UUID
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    granularity: Literal["hour", "day", "month"]
    group_by: Literal["org", "space", "resource", "meter", "kind"]
    time_zone: Literal["America/New_York"]
    items: list[UsageItem]
    next_cursor: str | None


class Effect(Reply):
    """What it does to the balance: +/- microcredits to funded, used or expired."""

    bucket: Literal["funded", "used", "expired", "none"]
    microcredits: int


class Transaction(Reply):
    id: UUID
    type: Literal["funding", "usage", "late_usage", "expiry", "reversal", "correction"]
    occurred_at: datetime
    posted_at: datetime
    reading_hour: datetime | None
    description: str
    amount: int = Field(ge=0, description="Microcredits moved (its debit total).")
    effect: Effect
    reverses: UUID | None
    entries: list[EntryLine]
    usage: list[UsageLine]
    corrects_month: str | None = Field(
        default=None, pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$",
        description="For a correction: the closed month (YYYY-MM) it restates; its statement gets a new version.",
    )


class TransactionPage(Reply):
    customer_id: UUID
    items: list[Transaction]
    next_cursor: str | None


class StatementVersion(Reply):
    """One version of a month's statement."""

    version: int = Field(ge=1)
    statement_id: UUID
    issued_at: datetime
    used: int
    correction: int | None = Field(description="Sum of the month's corrections so far; null on version 1.")


class Statement(Reply):
    """A closed month (America/New_York), integer microcredits. Version 1 is the month's close; a correction
    of the closed month amends it as version 2, 3, ...: its lines and totals say `original` (version 1's
    figure), `correction` (all corrections of the month so far) and the amended figure (`microcredits`,
    `used`). The corrections' money is settled in the month they are dated in, so an amended version keeps
    version 1's opening and closing balances."""

    customer_id: UUID
    month: str = Field(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")
    statement_id: UUID
    version: int = Field(ge=1)
    opening_balance: int
    funded: int
    used: int
    original_used: int | None = Field(description="Version 1's `used`; null on version 1.")
    correction: int | None = Field(description="`used` - `original_used`; null on version 1.")
    expired: int
    closing_balance: int
    used_by_kind: list[StatementLine]
    reasons: list[str] = Field(description="The reasons of the corrections this version includes.")
    issued_at: datetime
    versions: list[StatementVersion] = Field(description="Every version of the month's statement, oldest first.")


class Entitlement(Reply):
    subject: str
    customer_id: UUID
    granted_by: str
    granted_at: datetime


class EntitlementPage(Page[Entitlement]):
    pass


NonNegative = Annotated[int, Field(ge=0)]


class CompletenessProblem(Reply):
    rule: Literal["published", "priced", "posted", "latest_revision", "reading", "conflict"]
    detail: str


class CompletenessCounts(Reply):
    read: NonNegative
    estimated: NonNegative
    published: NonNegative
    unpublished: int
    priced: NonNegative
    unpriced: NonNegative
    dead_lettered_at_pricer: NonNegative
    posted: NonNegative
    held: NonNegative
    dead_lettered_at_ledger: NonNegative
    conflicts_at_pricer: NonNegative = Field(
        description="Measurements that came again with other content than the pricer's stored copy (DLQ reason "
        "conflict:), not among the dead-lettered."
    )
    conflicts_at_ledger: NonNegative = Field(
        description="Charges of the revision the ledger applied that came again with another amount, price or org."
    )


class CompletenessRow(CompletenessCounts):
    """One reading hour and meter: distinct measurements at each stage (charges at their latest revision),
    and the rules it breaks."""

    hour: datetime
    meter: str
    expected: bool = Field(description="The collector should have read this hour for this meter.")
    reading: Literal["ok", "estimated", "failed", "none"] = Field(description="How the hour was covered.")
    revisions_behind: int = Field(description="Latest revisions at the pricer minus those the ledger applied.")
    reconciles: bool
    problems: list[CompletenessProblem]


class DeadLetterTopic(Reply):
    topic: str
    consumer_groups: list[str]
    records: NonNegative
    counted: NonNegative
    unattributed: NonNegative = Field(description="Over the whole topic: no reading hour or meter in the message.")
    complete: bool


class CompletenessReport(Reply):
    model_config = ConfigDict(populate_by_name=True)

    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    generated_at: datetime
    hours: int = Field(ge=1, le=31 * 24)
    meters: list[str]
    reconciles: bool = Field(description="No row is flagged and every DLQ was read completely.")
    flagged: NonNegative
    missing_readings: NonNegative
    problems: list[str] = Field(description="Report-level problems (a DLQ not read completely).")
    totals: CompletenessCounts
    dead_letters: list[DeadLetterTopic]
    rows: list[CompletenessRow]


# ------------------------------------------------------------------------------------------ routes

READ_MODEL_AGE = {
    "description": "Whole seconds since the read model last applied a batch of charges or transactions (absent "
    "before its first batch since the api started). Reads are answered while Kafka is away; this says how old "
    "they may be.",
    "schema": {"type": "integer", "minimum": 0},
}
NOT_VISIBLE = "No such customer, or one the caller may not see (the same answer)."


def _read(model: type[BaseModel]) -> dict[int, Answer]:
    """A 200 answered from the read model: the body and how fresh it is."""
    return {200: Answer(model, headers={"Read-Model-Age": READ_MODEL_AGE})}


_reader = declarer(SCOPE_READ, "customers")


_admin = declarer(SCOPE_ADMIN, "admin")


CUSTOMERS = _reader(
    "GET", "/v1/customers", "The customers the caller may see", _read(CustomerPage), query=PageQuery,
    description="All known customers for a usage.admin token; otherwise those named by the token's `customers` "
    "claim and those an admin entitled the token's subject to.",
)
BALANCE = _reader(
    "GET", "/v1/customers/{customer_id}/balance",
    "Funded, used, expired, remaining and overage microcredits, now or as of a time",
    _read(Balance), path_params=CustomerPath, query=BalanceQuery, refusals={404: NOT_VISIBLE},
)
USAGE = _reader(
    "GET", "/v1/customers/{customer_id}/usage", "Usage value and microcredits per group and period",
    _read(UsagePage), path_params=CustomerPath, query=UsageQuery,
    refusals={404: NOT_VISIBLE, 422: "from and to are not period boundaries, or too far apart."},
    description="Periods are UTC hours, or days and months in America/New_York; `from` and `to` must be period "
    "boundaries, at most " + ", ".join(f"{n} {g}s" for g, n in MAX_PERIODS.items()) + " apart. `microcredits` "
    "is the floor of the exact sum, `microcredits_exact` the exact sum.",
)
TRANSACTIONS = _reader(
    "GET", "/v1/customers/{customer_id}/transactions", "The customer's ledger transactions, newest first",
    _read(TransactionPage), path_params=CustomerPath, query=TransactionsQuery, refusals={404: NOT_VISIBLE},
)
STATEMENT = _reader(
    "GET", "/v1/customers/{customer_id}/statements/{month}", "The statement of a closed month (America/New_York)",
    _read(Statement), path_params=StatementPath, query=StatementQuery,
    refusals={
        404: "No such customer (or not visible), no statement for that month yet, or no such version.",
        422: "version is not a positive integer.",
    },
    description="The latest version, or `version`; `versions` lists every version of the month.",
)
ENTITLEMENTS = _admin(
    "GET", "/admin/entitlements", "Which subjects may read which customers", {200: Answer(EntitlementPage)},
    query=EntitlementsQuery,
)
GRANT = _admin(
    "POST", "/admin/entitlements", "Entitle a subject to read a customer (idempotent)",
    {201: Answer(Entitlement, "Created"), 200: Answer(Entitlement, "It existed already")},
    body=EntitlementIn, command="api.entitlement.grant",
    refusals={
        404: "No such customer (neither the read model nor the ledger knows it).",
        502: "The ledger cannot be reached to check a customer the read model does not know yet.",
        504: "The ledger did not answer in time.",
    },
)
REVOKE = _admin(
    "DELETE", "/admin/entitlements", "Take an entitlement away", {204: Answer(None, "Removed")},
    query=EntitlementKey, refusals={404: "No such entitlement."}, command="api.entitlement.revoke",
)
COMPLETENESS = _admin(
    "GET", "/admin/completeness",
    "Completeness: per reading hour and meter, measurements read, estimated, published, priced, unpriced, "
    "posted, held and dead-lettered, and where they do not reconcile",
    {200: Answer(CompletenessReport)}, query=RangeQuery,
    refusals={
        422: "from not before to, or a range without a whole hour or over 744 hours.",
        502: "An owning service cannot be reached or answered something else.",
        504: "An owning service did not answer in time.",
    },
    description="Covers the whole UTC hours h with from <= h < to (at least one, at most 744). Each owning service "
    "counts its own data; the api counts the DLQs. Rules: read + estimated = published; published = priced + "
    "unpriced + dead-lettered at the pricer; priced + unpriced = posted + held + dead-lettered at the ledger; "
    "the ledger has the latest revision; every due hour since the first reading has a reading or an estimate "
    "for every meter; no measurement (charge revision) came again with other content than the stored one.",
)

AUDIT = _admin(
    "GET", "/admin/audit", "The audit trail of the commands (api, collector, ledger, pricer), newest first",
    {200: Answer(AuditPage)}, query=AdminAuditQuery,
    refusals={
        422: "to is not after from.",
        502: "An owning service cannot be reached or answered something else.",
        504: "An owning service did not answer in time.",
    },
    description="Every command request each service recorded, refused ones and replays included: who (the token's "
    "subject), what, when and the outcome. Ordered by recorded time, then service, then each service's own order.",
)

OPERATIONS: tuple[Operation, ...] = (
    CUSTOMERS, BALANCE, USAGE, TRANSACTIONS, STATEMENT, ENTITLEMENTS, GRANT, REVOKE, COMPLETENESS, AUDIT,
)

assert set(GRANULARITIES) == {"hour", "day", "month"}
assert set(GROUP_BYS) == {"org", "space", "resource", "meter", "kind"}
assert set(TRANSACTION_TYPES) == {"funding", "usage", "late_usage", "expiry", "reversal", "correction"}
