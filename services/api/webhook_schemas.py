"""The api's webhook routes as contracts (``shared.edge.Operation``; ``webhooks.py`` binds them): the
subscriptions an admin makes per customer, and the deliveries made to each with every attempt."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, UrlConstraints, field_validator

from services.api.schemas import MAX_LIMIT, PageQuery, _admin
from shared.edge import Answer, Page, Params, Reply, Uuid

__all__ = [
    "DELIVERIES",
    "EVENT_TYPES",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "WEBHOOKS",
    "Attempt",
    "DeliveriesQuery",
    "Delivery",
    "DeliveryPage",
    "EventType",
    "Webhook",
    "WebhookCreated",
    "WebhookIn",
    "WebhookPage",
    "WebhookPath",
    "WebhooksQuery",
]

EventType = Literal["alert.raised", "statement.issued", "statement.amended"]
EVENT_TYPES: tuple[str, ...] = ("alert.raised", "statement.issued", "statement.amended")
EVENTS_HELP = (
    "`alert.raised`: a customer's used share of funded credits crossed 50, 75, 90 or 100%; `statement.issued`: "
    "a month was closed (statement version 1); `statement.amended`: a closed month's statement was amended by "
    "corrections (version 2, 3, ...; the message is the amended version, with original, correction and amended "
    "figures)."
)
Url = Annotated[AnyHttpUrl, UrlConstraints(max_length=2048, allowed_schemes=["http", "https"])]
Secret = Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")]


class WebhookIn(BaseModel):
    """Subscribe a URL to a customer's events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: Uuid
    url: Url = Field(description="Where each event is POSTed (http or https; https only in production).")
    events: list[EventType] = Field(min_length=1, max_length=len(EVENT_TYPES), description=EVENTS_HELP)
    secret: Secret | None = Field(
        default=None,
        description="The HMAC-SHA256 key (16-256 printable ASCII characters); generated when left out. Answered "
        "once, on creation.",
    )

    @field_validator("events", mode="after")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("events must be distinct")
        return value


class WebhooksQuery(PageQuery):
    customer_id: Uuid | None = Field(default=None, description="Only this customer's subscriptions.")


class WebhookPath(Params):
    webhook_id: Uuid = Field(description="The subscription's id.")


class DeliveriesQuery(PageQuery):
    status: Literal["pending", "delivered", "failed"] | None = Field(default=None, description="Only these.")


class Webhook(Reply):
    """A subscription (its secret is never listed)."""

    id: UUID
    customer_id: UUID
    url: str
    events: list[EventType]
    active: bool
    created_at: datetime
    created_by: str


class WebhookCreated(Webhook):
    secret: str = Field(description="The signing secret: answered this once only.")


class WebhookPage(Page[Webhook]):
    pass


class Attempt(Reply):
    """One POST of a delivery."""

    n: int = Field(ge=1)
    at: datetime
    status_code: int | None = Field(description="The receiver's answer; null when there was none (see error).")
    error: str | None = Field(description="Why there was no answer (connection refused, timeout), else null.")
    duration_ms: int = Field(ge=0)


class Delivery(Reply):
    """One event for one subscription: pending until a 2xx answer (delivered), retried with exponential
    backoff (30 s doubling, at most an hour apart) and failed after 24 hours without one."""

    id: UUID = Field(description="Sent as Billing-Webhook-Id on every attempt.")
    event_id: UUID = Field(description="The event's id, `id` in the body.")
    event_type: EventType
    status: Literal["pending", "delivered", "failed"]
    attempts: int = Field(ge=0)
    next_attempt_at: datetime | None = Field(description="When it is tried next; null once finished.")
    created_at: datetime
    finished_at: datetime | None
    attempt_log: list[Attempt] = Field(description="Every attempt, oldest first.")


class DeliveryPage(Page[Delivery]):
    pass


NO_WEBHOOK = "No such subscription (or it was deleted)."

WEBHOOKS = _admin(
    "GET", "/admin/webhooks", "The active webhook subscriptions, by id", {200: Answer(WebhookPage)},
    query=WebhooksQuery,
)
SUBSCRIBE = _admin(
    "POST", "/admin/webhooks", "Subscribe a URL to a customer's alerts and statements",
    {201: Answer(WebhookCreated, "Created; the secret is in this answer only")},
    body=WebhookIn, command="api.webhook.create",
    refusals={
        404: "No such customer (neither the read model nor the ledger knows it).",
        422: "Not an http(s) URL, or http in production.",
        502: "The ledger cannot be reached to check a customer the read model does not know yet.",
        504: "The ledger did not answer in time.",
    },
    description="Each event is POSTed as JSON `{id, type, created_at, customer_id, data}` with the headers "
    "Billing-Webhook-Id (the delivery's id), Billing-Webhook-Timestamp (Unix seconds) and Billing-Webhook-Signature "
    "`v1=<hex HMAC-SHA256(secret, timestamp + \".\" + body)>`. A receiver should refuse timestamps more than 5 "
    "minutes away and answer 2xx quickly; anything else is retried for 24 hours. `billing webhook-receiver` "
    f"verifies them. At most {MAX_LIMIT} per page when listed.",
)
UNSUBSCRIBE = _admin(
    "DELETE", "/admin/webhooks/{webhook_id}", "Delete a subscription (its pending deliveries end failed)",
    {204: Answer(None, "Deleted")}, path_params=WebhookPath, refusals={404: NO_WEBHOOK},
    command="api.webhook.delete",
)
DELIVERIES = _admin(
    "GET", "/admin/webhooks/{webhook_id}/deliveries", "A subscription's deliveries, newest first, with attempts",
    {200: Answer(DeliveryPage)}, path_params=WebhookPath, query=DeliveriesQuery,
    refusals={404: "No such subscription."},
)
