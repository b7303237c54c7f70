"""Signed webhooks: the one signing and verification scheme the api's sender and ``billing webhook-receiver``
share (HMAC-SHA256 over ``"{timestamp}.{body}"``, the scheme Stripe and GitHub use), the retry schedule,
and the deterministic id of a delivery.

Headers of every delivery:
- ``Billing-Webhook-Id``: the delivery's id, the same on every retry (a receiver deduplicates by it, or by
  the event's ``id`` in the body);
- ``Billing-Webhook-Timestamp``: Unix seconds when this attempt was signed;
- ``Billing-Webhook-Signature``: ``v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>``; several
  space-separated ``v1=`` values are accepted by ``verify`` (a secret being rotated).

A receiver refuses a signature that does not match, and a timestamp more than ``TOLERANCE`` away from its
clock (a replayed request)."""

from __future__ import annotations

import hashlib
import hmac
import random
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from shared.clock import as_utc
from shared.ids import NAMESPACE

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "GIVE_UP_AFTER",
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE",
    "SignatureError",
    "backoff",
    "delivery_id",
    "sign",
    "signed_headers",
    "verify",
]

ID_HEADER = "Billing-Webhook-Id"
TIMESTAMP_HEADER = "Billing-Webhook-Timestamp"
SIGNATURE_HEADER = "Billing-Webhook-Signature"
TOLERANCE = timedelta(minutes=5)

BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_CAP = timedelta(hours=1)
GIVE_UP_AFTER = timedelta(hours=24)


class SignatureError(ValueError):
    """A request that does not carry a valid, recent signature."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value of ``body`` signed at ``timestamp`` (Unix seconds): ``v1=<hex>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signed_headers(secret: str, delivery: uuid.UUID, moment: datetime, body: bytes) -> dict[str, str]:
    """The headers of one attempt of ``delivery`` at ``moment``."""
    timestamp = int(as_utc(moment).timestamp())
    return {
        "content-type": "application/json",
        ID_HEADER: str(delivery),
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: datetime) -> None:
    """Raise SignatureError unless ``headers`` carry a timestamp within ``TOLERANCE`` of ``now`` and a ``v1``
    signature of ``body`` with ``secret`` (compared in constant time). ``headers``: any case-insensitive or
    lower-case mapping (Starlette's and httpx's are case-insensitive)."""
    lower = {k.lower(): v for k, v in headers.items()}
    stamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    given = lower.get(SIGNATURE_HEADER.lower(), "")
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
        raise SignatureError(f"missing or malformed {TIMESTAMP_HEADER}")
    timestamp = int(stamp)
    if abs(as_utc(now).timestamp() - timestamp) > TOLERANCE.total_seconds():
        raise SignatureError(f"{TIMESTAMP_HEADER} is more than {TOLERANCE} away from now")
    expected = sign(secret, timestamp, body)
    candidates = [part for part in given.split() if part.startswith("v1=")]
    if not candidates:
        raise SignatureError(f"missing or malformed {SIGNATURE_HEADER}")
    if not any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates):
        raise SignatureError("the signature does not match")


def backoff(attempts: int, jitter: Callable[[], float] = random.random) -> timedelta:
    """How long to wait after the ``attempts``-th failed attempt (1 = the first): ``BACKOFF_BASE`` ·
    2^(attempts-1), capped at ``BACKOFF_CAP``, then shortened by up to a quarter at random (``jitter`` in
    [0, 1)), so that receivers coming back are not hit by every sender at once."""
    if attempts < 1:
        raise ValueError("attempts counts from 1")
    exponent = min(attempts - 1, 20)  # 2^20 · 30 s is far past the cap already
    delay = min(BACKOFF_BASE * (1 << exponent), BACKOFF_CAP)
    return delay * (1 - 0.25 * jitter())


def delivery_id(subscription: uuid.UUID, event: uuid.UUID) -> uuid.UUID:
    """The id of the delivery of ``event`` to ``subscription``: the same however often the event comes."""
    return uuid.uuid5(NAMESPACE, f"webhook-delivery|{subscription}|{event}")
