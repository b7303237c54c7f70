"""Webhook signatures (shared/webhooks.py): what the api signs, the receiver accepts; a wrong secret, a
tampered body, an old or future timestamp and a missing header are refused. The retry schedule doubles from
30 s to at most an hour apart, and a delivery is given up 24 hours after its event; the receiver answers 400
to a bad signature and counts only what it accepted."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from cli.webhook_receiver import Received, receiver_app
from services.api.app import create_app
from services.api.settings import ApiSettings
from services.api.webhooks import Webhooks
from shared.commands import request_digest
from shared.settings import read_settings
from shared.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    backoff,
    delivery_id,
    sign,
    signed_headers,
    verify,
)

SECRET = "whsec-0123456789abcdef"
NOW = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)
BODY = b'{"id":"3f1c6f0e-8d7e-4d44-9d8f-5a0b1b2c3d4e","type":"alert.raised"}'


def test_the_signature_is_the_hmac_sha256_of_timestamp_dot_body() -> None:
    # Computed here independently of sign(): the documented scheme, so other languages can verify it.
    timestamp = int(NOW.timestamp())
    expected = hmac.new(SECRET.encode(), str(timestamp).encode() + b"." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, timestamp, BODY) == f"v1={expected}"
    headers = signed_headers(SECRET, uuid.UUID(int=7), NOW, BODY)
    assert headers[TIMESTAMP_HEADER] == str(timestamp)
    assert headers[ID_HEADER] == str(uuid.UUID(int=7))
    assert headers[SIGNATURE_HEADER] == f"v1={expected}"


def test_a_signed_request_verifies_within_the_tolerance() -> None:
    headers = signed_headers(SECRET, uuid.uuid4(), NOW, BODY)
    verify(SECRET, headers, BODY, NOW)
    verify(SECRET, headers, BODY, NOW + timedelta(minutes=4, seconds=59))
    verify(SECRET, {k.lower(): v for k, v in headers.items()}, BODY, NOW - timedelta(minutes=4))
    # a secret being rotated: either of two signatures
    rotated = headers | {SIGNATURE_HEADER: f"v1={'0' * 64} {headers[SIGNATURE_HEADER]}"}
    verify(SECRET, rotated, BODY, NOW)


@pytest.mark.parametrize(
    ("what", "secret", "body", "now", "change"),
    [
        ("wrong secret", "whsec-another-secret-0000", BODY, NOW, {}),
        ("tampered body", SECRET, BODY.replace(b"alert", b"alarm"), NOW, {}),
        ("old timestamp", SECRET, BODY, NOW + timedelta(minutes=5, seconds=1), {}),
        ("future timestamp", SECRET, BODY, NOW - timedelta(minutes=6), {}),
        ("no signature", SECRET, BODY, NOW, {SIGNATURE_HEADER: ""}),
        ("other scheme", SECRET, BODY, NOW, {SIGNATURE_HEADER: "v0=abc"}),
        ("no timestamp", SECRET, BODY, NOW, {TIMESTAMP_HEADER: ""}),
        ("bad timestamp", SECRET, BODY, NOW, {TIMESTAMP_HEADER: "１２３"}),
    ],
)
def test_what_is_refused(what: str, secret: str, body: bytes, now: datetime, change: dict[str, str]) -> None:
    headers = signed_headers(SECRET, uuid.uuid4(), NOW, BODY) | change
    with pytest.raises(SignatureError):
        verify(secret, headers, body, now)


def test_a_signature_of_another_timestamp_is_refused() -> None:
    headers = signed_headers(SECRET, uuid.uuid4(), NOW, BODY)
    headers[TIMESTAMP_HEADER] = str(int(NOW.timestamp()) + 1)  # replayed with a fresher timestamp
    with pytest.raises(SignatureError):
        verify(SECRET, headers, BODY, NOW)


def test_the_backoff_doubles_from_30_seconds_and_is_capped_at_an_hour() -> None:
    no_jitter = [backoff(n, lambda: 0.0).total_seconds() for n in range(1, 12)]
    assert no_jitter == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600, 3600]
    assert backoff(500, lambda: 0.0) == timedelta(hours=1)
    # jitter shortens by at most a quarter, never lengthens
    assert backoff(1, lambda: 0.999).total_seconds() == pytest.approx(22.5, abs=0.01)
    for n in range(1, 15):
        assert timedelta(0) < backoff(n) <= timedelta(hours=1)
    with pytest.raises(ValueError):
        backoff(0)


def test_delivery_ids_are_the_same_for_the_same_subscription_and_event_only() -> None:
    sub, other, event = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert delivery_id(sub, event) == delivery_id(sub, event)
    assert delivery_id(sub, event) != delivery_id(other, event)
    assert delivery_id(sub, event) != delivery_id(sub, uuid.uuid4())


def _webhooks() -> Webhooks:
    async def known(call: object, customer: uuid.UUID) -> None:
        return None

    w = Webhooks(lambda: None, known)  # type: ignore[arg-type, return-value]
    w.jitter = lambda: 0.0
    return w


def test_a_failed_delivery_is_retried_until_24_hours_after_its_event_then_failed() -> None:
    w, created = _webhooks(), NOW
    assert w.outcome(1, created, created, 204) == ("delivered", created)
    assert w.outcome(1, created, created, 500) == ("pending", created + timedelta(seconds=30))
    assert w.outcome(2, created, created, None) == ("pending", created + timedelta(seconds=60))
    assert w.outcome(3, created, created, 301) == ("pending", created + timedelta(seconds=120))  # not followed
    late = created + timedelta(hours=23, minutes=30)
    assert w.outcome(30, late, created, None) == ("pending", created + timedelta(hours=24))  # a last try at 24 h
    assert w.outcome(31, created + timedelta(hours=24), created, None)[0] == "failed"
    # following the schedule from the first failure, the delivery is given up after 24 hours, not before
    at, n, status = created, 1, "pending"
    while status == "pending":
        status, at = w.outcome(n, at, created, 503)
        n += 1
    assert at == created + timedelta(hours=24)
    assert 25 < n < 40


async def test_the_receiver_accepts_a_signed_delivery_and_refuses_a_wrong_signature() -> None:
    got = Received()
    transport = httpx.ASGITransport(app=receiver_app(SECRET, got, clock=lambda: NOW))
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as client:
        ok = await client.post("/hooks", content=BODY, headers=signed_headers(SECRET, uuid.UUID(int=1), NOW, BODY))
        assert ok.status_code == 204
        wrong = signed_headers("whsec-not-the-secret", uuid.UUID(int=2), NOW, BODY)
        forged = await client.post("/hooks", content=BODY, headers=wrong)
        assert forged.status_code == 400 and forged.headers["content-type"] == "application/problem+json"
        tampered = signed_headers(SECRET, uuid.UUID(int=3), NOW, BODY)
        assert (await client.post("/", content=BODY + b" ", headers=tampered)).status_code == 400
        stale = signed_headers(SECRET, uuid.UUID(int=4), NOW - timedelta(minutes=10), BODY)
        assert (await client.post("/", content=BODY, headers=stale)).status_code == 400
    assert [e["id"] for e in got.events] == ["3f1c6f0e-8d7e-4d44-9d8f-5a0b1b2c3d4e"]
    assert got.delivery_ids == [str(uuid.UUID(int=1))]
    assert got.refused == 3


PRODUCTION_API = {
    "database_url": "postgresql://billing_svc:Xk2-not-the-role@db.billing.internal:5432/billing",
    "kafka_bootstrap_servers": "kafka-0.kafka:9092",
    "oidc_issuer": "https://login.example.gov/oauth2",
    "ledger_url": "http://billing-ledger:8083",
    "pricer_url": "http://billing-pricer:8082",
    "collector_url": "http://billing-collector:8081",
}


@pytest.mark.parametrize(
    ("env", "allow_http", "https_only"),
    [("production", False, True), ("production", True, False), ("local", False, False)],
)
def test_production_accepts_only_https_webhook_urls_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, env: str, allow_http: bool, https_only: bool
) -> None:
    for name in ("BILLING_ENV", "BILLING_ALLOW_LOCAL_HOSTS", "KAFKA_BOOTSTRAP_SERVERS", "API_WEBHOOK_ALLOW_HTTP"):
        monkeypatch.delenv(name, raising=False)
    options = PRODUCTION_API if env == "production" else {}
    settings = read_settings(ApiSettings, billing_env=env, webhook_allow_http=allow_http, **options)
    assert create_app(settings).state.api.webhooks.https_only is https_only


def test_a_subscription_secret_is_not_stored_in_the_audit_trail() -> None:
    body = b'{"customer_id": "c", "url": "https://x.example/h", "events": ["alert.raised"], '
    body += b'"secret": "' + SECRET.encode() + b'"}'
    digest, stored = request_digest("POST", "/admin/webhooks", body)
    assert stored is not None and SECRET not in stored and '"secret":"***"' in stored and "x.example" in stored
    other, _ = request_digest("POST", "/admin/webhooks", body.replace(b"0123", b"9999"))
    assert other != digest  # the same request with another secret is another request (an Idempotency-Key reuse)
