"""The ledger's internal HTTP interface: what each route takes (bodies, path and query parameters) and
answers, and the routes themselves as contracts (``shared.edge.Operation`` without a handler;
``handlers.py`` binds them). The api forwards its /admin ledger commands here and documents them with
these same models. Every route needs a token with ``usage.admin`` (README, "Security model")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from shared import audit
from shared.auth import SCOPE_ADMIN
from shared.completeness import LedgerCompleteness
from shared.completeness import operation as completeness_operation
from shared.edge import Answer, Count, CursorText, Month, Operation, Page, Params, Reply, Time, Uuid, count, declarer

__all__ = [
    "AMEND",
    "ASSIGN_ORG",
    "AUDIT",
    "BALANCE",
    "CLOSE_MONTH",
    "COMPLETENESS",
    "CREATE_AGREEMENT",
    "CREATE_CUSTOMER",
    "CREATE_TIER",
    "EXPIRE",
    "GET_CUSTOMER",
    "HELD",
    "LIST_AGREEMENTS",
    "LIST_ASSIGNMENTS",
    "LIST_CUSTOMERS",
    "LIST_TIERS",
    "MAX_MICROCREDITS",
    "OPERATIONS",
    "REVERSE",
    "STATEMENT",
    "AgreementCreatedOut",
    "AgreementIn",
    "AgreementOut",
    "AgreementsQuery",
    "AmendOut",
    "AmendedOut",
    "AssignmentCreatedOut",
    "AssignmentIn",
    "AssignmentOut",
    "AssignmentsQuery",
    "BalanceOut",
    "BalanceQuery",
    "CustomerIn",
    "CustomerOut",
    "CustomerPath",
    "ExpiredOut",
    "HeldChargeOut",
    "MonthClosedOut",
    "MonthPath",
    "PageQuery",
    "ReverseIn",
    "StatementOut",
    "StatementPath",
    "StatementQuery",
    "StatementVersionOut",
    "TierIn",
    "TierOut",
    "TransactionOut",
    "TransactionPath",
]

MAX_MICROCREDITS = 2**62
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
Microcredits = Annotated[int, Field(gt=0, le=MAX_MICROCREDITS)]
Text = Annotated[str, Field(min_length=1, pattern=r"\S")]  # not only whitespace


# ---------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierIn(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")]
    credits_per_period: Microcredits = Field(
        description="Microcredits an agreement of this tier funds unless it names its own amount."
    )


class CustomerIn(_Body):
    name: Annotated[Text, Field(max_length=256)]
    tier: Annotated[Text, Field(max_length=64)]


class AssignmentIn(_Body):
    org_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(description="A Cloud Foundry org guid.")
    customer_id: Uuid
    starts_at: Time


class AgreementIn(_Body):
    customer_id: Uuid
    starts_at: Time
    ends_at: Time
    credits: Microcredits | None = Field(
        default=None, description="Microcredits funded; the customer's tier default when absent."
    )


class ReverseIn(_Body):
    reason: Annotated[str, Field(max_length=500)] = ""


# ---------------------------------------------------------------- parameters


class PageQuery(Params):
    limit: Count = count(DEFAULT_LIMIT, MAX_LIMIT)
    cursor: CursorText | None = Field(default=None, description="`next_cursor` of the previous page.")


class AssignmentsQuery(PageQuery):
    org_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = Field(
        default=None, description="Only this org."
    )
    customer_id: Uuid | None = Field(default=None, description="Only this customer.")


class AgreementsQuery(PageQuery):
    customer_id: Uuid | None = Field(default=None, description="Only this customer.")


class BalanceQuery(Params):
    as_of: Time | None = Field(default=None, description="Count transactions that occurred by then (default: now).")


class CustomerPath(Params):
    customer_id: Uuid = Field(description="A customer id.")


class StatementPath(CustomerPath):
    month: Month = Field(description="YYYY-MM (America/New_York).")


class StatementQuery(Params):
    version: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = Field(
        default=None, description="An earlier version (default: the latest)."
    )


class MonthPath(Params):
    month: Month = Field(description="YYYY-MM (America/New_York).")


class TransactionPath(Params):
    transaction_id: Uuid = Field(description="A ledger transaction id.")


# ---------------------------------------------------------------- answers


class TierOut(Reply):
    name: str
    credits_per_period: int
    created_at: datetime


class CustomerOut(Reply):
    id: UUID
    name: str
    tier: str
    created_at: datetime


class AssignmentOut(Reply):
    org_id: str
    customer_id: UUID
    starts_at: datetime
    created_at: datetime


class AssignmentCreatedOut(AssignmentOut):
    held_charges_posted: int = Field(ge=0, description="Held charges of the org posted with the assignment.")


class AgreementOut(Reply):
    id: UUID
    customer_id: UUID
    starts_at: datetime
    ends_at: datetime
    credits: int
    remaining: int
    created_at: datetime
    expired_at: datetime | None
    expiry_transaction_id: UUID | None


class AgreementCreatedOut(AgreementOut):
    funding_transaction_id: UUID


class PoolOut(Reply):
    id: UUID
    starts_at: datetime
    ends_at: datetime
    credits: int
    remaining: int
    expired_at: datetime | None


class BalanceOut(Reply):
    """Integer microcredits: remaining = funded - used - expired."""

    customer_id: UUID
    as_of: datetime
    funded: int
    used: int
    expired: int
    remaining: int
    agreements: list[PoolOut]


class KindLine(Reply):
    meter: str
    resource_kind: str = ""
    microcredits: int = Field(description="The month's usage of the line (amended: original + correction).")
    price_id: UUID | None = Field(default=None, description="The price applied; null when unpriced.")
    original: int | None = Field(default=None, description="Version 1's figure; null on version 1.")
    correction: int | None = Field(default=None, description="The month's corrections so far; null on version 1.")


class StatementVersionOut(Reply):
    version: int = Field(ge=1)
    id: UUID
    issued_at: datetime
    used: int
    correction: int | None


class StatementOut(Reply):
    """A closed month (America/New_York), integer microcredits. Version 1 is issued when the month closes;
    each correction of the month (a re-rating) gets it an amended version with ``used`` restated
    (``original_used`` + ``correction``, line by line too), its balances, funded and expired as version 1's
    (the correction's balance effect is settled in the month it is dated in)."""

    customer_id: UUID
    month: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}$")
    id: UUID
    version: int = Field(ge=1)
    opening_balance: int
    funded: int
    used: int
    expired: int
    closing_balance: int
    used_by_kind: list[KindLine]
    issued_at: datetime
    original_used: int | None = Field(description="Version 1's `used`; null on version 1.")
    correction: int | None = Field(description="The month's corrections so far; null on version 1.")
    reasons: list[str] = Field(description='The corrections covered, as "correction <job id>: <reason>".')
    versions: list[StatementVersionOut] = Field(description="Every version of the month's statement, in order.")


class AmendedOut(Reply):
    month: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}$")
    customer_id: UUID
    version: int = Field(ge=2)
    id: UUID


class AmendOut(Reply):
    issued: list[AmendedOut] = Field(description="The amended statement versions issued now (none: nothing due).")


class MonthClosedOut(Reply):
    month: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}$")
    closed_at: datetime
    statements: int
    already_closed: bool


class EntryOut(Reply):
    account: str
    side: Literal["debit", "credit"]
    amount: int = Field(ge=1)


class UsageLineOut(Reply):
    org_id: str
    meter: str
    resource_kind: str
    price_id: UUID | None
    month: str
    microcredits: int


class TransactionOut(Reply):
    id: UUID
    customer_id: UUID
    type: str
    occurred_at: datetime
    posted_at: datetime
    reading_hour: datetime | None
    description: str
    idempotency_key: str
    reverses: UUID | None
    agreement_id: UUID | None
    corrects_month: str | None = Field(default=None, description="A correction: the closed month it restates.")
    entries: list[EntryOut]
    usage: list[UsageLineOut]


class ExpiredOut(Reply):
    expired: int = Field(ge=0, description="Agreements whose unused credits expired now.")


class HeldChargeOut(Reply):
    measurement_id: UUID
    revision: int
    reading_hour: datetime
    org_id: str
    meter: str
    resource_kind: str
    resource_id: str
    price_id: UUID | None
    amount_numerator: int
    amount_denominator: int = Field(ge=1)
    held_at: datetime


# ---------------------------------------------------------------- routes (contracts)

NO_CUSTOMER = "No such customer."


_op = declarer(SCOPE_ADMIN, "ledger")


CREATE_TIER = _op(
    "POST", "/internal/tiers", "Create a tier", {201: Answer(TierOut, "Created")},
    body=TierIn, refusals={409: "A tier of that name exists."}, command="ledger.tier.create",
)
LIST_TIERS = _op("GET", "/internal/tiers", "Tiers, by name", {200: Answer(Page[TierOut])}, query=PageQuery)
CREATE_CUSTOMER = _op(
    "POST", "/internal/customers", "Create a customer on a tier", {201: Answer(CustomerOut, "Created")},
    body=CustomerIn, refusals={404: "No such tier."}, command="ledger.customer.create",
)
LIST_CUSTOMERS = _op("GET", "/internal/customers", "Customers", {200: Answer(Page[CustomerOut])}, query=PageQuery)
GET_CUSTOMER = _op(
    "GET", "/internal/customers/{customer_id}", "One customer", {200: Answer(CustomerOut)},
    path_params=CustomerPath, refusals={404: NO_CUSTOMER},
)
BALANCE = _op(
    "GET", "/internal/customers/{customer_id}/balance", "Funded, used, expired and remaining microcredits as of a time",
    {200: Answer(BalanceOut)}, path_params=CustomerPath, query=BalanceQuery, refusals={404: NO_CUSTOMER},
)
STATEMENT = _op(
    "GET", "/internal/customers/{customer_id}/statements/{month}",
    "A closed month's statement: its latest version, or the one asked for, with the list of versions",
    {200: Answer(StatementOut)}, path_params=StatementPath, query=StatementQuery,
    refusals={404: "No such customer, the month is not closed, or no such version."},
)
AMEND = _op(
    "POST", "/internal/statements/amend",
    "Issue now the amended statements due (closed months with corrections no version covers yet)",
    {200: Answer(AmendOut)}, command="ledger.statements.amend",
)
ASSIGN_ORG = _op(
    "POST", "/internal/org-assignments", "Assign an org to a customer from a time (held charges of the org are posted)",
    {201: Answer(AssignmentCreatedOut, "Created")}, body=AssignmentIn,
    refusals={
        404: NO_CUSTOMER,
        409: "The org is assigned at that time already, or it had another customer in a closed month the "
        "assignment would cover (Month closed).",
    },
    command="ledger.org_assignment.create",
)
LIST_ASSIGNMENTS = _op(
    "GET", "/internal/org-assignments", "Org assignments", {200: Answer(Page[AssignmentOut])}, query=AssignmentsQuery
)
CREATE_AGREEMENT = _op(
    "POST", "/internal/agreements", "Fund a customer's credit pool for a period of performance",
    {201: Answer(AgreementCreatedOut, "Created")}, body=AgreementIn,
    refusals={
        404: NO_CUSTOMER,
        409: "The agreement starts in or before a closed month (Month closed).",
        422: "ends_at is not after starts_at (invalid-body).",
    },
    command="ledger.agreement.create",
)
LIST_AGREEMENTS = _op(
    "GET", "/internal/agreements", "Agreements", {200: Answer(Page[AgreementOut])}, query=AgreementsQuery
)
CLOSE_MONTH = _op(
    "POST", "/internal/months/{month}/close", "Close a month (America/New_York): a statement per customer",
    {201: Answer(MonthClosedOut, "Closed now"), 200: Answer(MonthClosedOut, "It was closed already")},
    path_params=MonthPath, refusals={409: "The month has not ended."}, command="ledger.month.close",
)
REVERSE = _op(
    "POST", "/internal/transactions/{transaction_id}/reverse", "Post the mirror image of a transaction (once)",
    {201: Answer(TransactionOut, "Reversed now"), 200: Answer(TransactionOut, "It was reversed already")},
    path_params=TransactionPath, body=ReverseIn, body_required=False,
    refusals={404: "No such transaction.", 409: "A reversal cannot be reversed."}, command="ledger.transaction.reverse",
)
EXPIRE = _op(
    "POST", "/internal/expire-agreements", "Expire the unused credits of agreements that have ended",
    {200: Answer(ExpiredOut)}, command="ledger.agreements.expire",
)
HELD = _op(
    "GET", "/internal/held", "Charges held because their org has no customer", {200: Answer(Page[HeldChargeOut])},
    query=PageQuery,
)
COMPLETENESS = completeness_operation(LedgerCompleteness, "ledger")
AUDIT = audit.operation("ledger")

OPERATIONS: tuple[Operation, ...] = (
    CREATE_TIER, LIST_TIERS, CREATE_CUSTOMER, LIST_CUSTOMERS, GET_CUSTOMER, BALANCE, STATEMENT, ASSIGN_ORG,
    LIST_ASSIGNMENTS, CREATE_AGREEMENT, LIST_AGREEMENTS, CLOSE_MONTH, AMEND, REVERSE, EXPIRE, HELD, COMPLETENESS,
    AUDIT,
)
