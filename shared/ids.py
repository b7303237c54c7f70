"""Identifiers: deterministic ids for facts (re-publishing a fact yields the same id, so every consumer
can deduplicate) and time-ordered UUIDv7 for new entities (cheap primary keys)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import datetime

import uuid_utils

from shared.clock import as_utc

__all__ = ["NAMESPACE", "charge_id", "measurement_id", "measurement_ids", "org_assignment_id", "reading_id", "uuid7"]

# Fixed namespace of this system's name-based (UUIDv5) ids. Never change it: ids are a public contract.
NAMESPACE = uuid.UUID("6f0c1d1e-6a52-5b7e-9a4c-2f0b9a7c4e11")


def measurement_id(reading_hour: datetime, meter: str, resource_id: str) -> uuid.UUID:
    """The id of one meter's measurement of one resource in one UTC hour."""
    hour = as_utc(reading_hour).strftime("%Y-%m-%dT%H:00:00Z")
    return uuid.uuid5(NAMESPACE, f"measurement|{hour}|{meter}|{resource_id}")


def measurement_ids(reading_hour: datetime, meter: str) -> Callable[[str], uuid.UUID]:
    """``measurement_id`` for one hour and meter, as a fast function of the resource id (a reading
    computes tens of thousands)."""
    prefix = NAMESPACE.bytes + f"measurement|{as_utc(reading_hour).strftime('%Y-%m-%dT%H:00:00Z')}|{meter}|".encode()

    def make(resource_id: str) -> uuid.UUID:
        # uuid5 by hand: SHA-1 of namespace + name, version and variant bits set (RFC 9562, 5.5).
        digest = bytearray(hashlib.sha1(prefix + resource_id.encode()).digest()[:16])
        digest[6] = (digest[6] & 0x0F) | 0x50
        digest[8] = (digest[8] & 0x3F) | 0x80
        return uuid.UUID(bytes=bytes(digest))

    return make


def charge_id(measurement: uuid.UUID, revision: int) -> uuid.UUID:
    """The id of revision ``revision`` of the charge for ``measurement``."""
    return uuid.uuid5(NAMESPACE, f"charge|{measurement}|{revision}")


def reading_id(reading_hour: datetime) -> uuid.UUID:
    """The id of the reading of an hour (there is at most one per hour)."""
    hour = as_utc(reading_hour).strftime("%Y-%m-%dT%H:00:00Z")
    return uuid.uuid5(NAMESPACE, f"reading|{hour}")


def org_assignment_id(org_id: str, starts_at: datetime) -> uuid.UUID:
    """The id of an org's assignment starting at ``starts_at`` (an org has at most one per instant). The
    instant is written with microseconds, ``%Y-%m-%dT%H:%M:%S.%fZ`` in UTC (the ledger's migration
    009 computes the same in SQL)."""
    return uuid.uuid5(NAMESPACE, f"org_assignment|{org_id}|{as_utc(starts_at).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}")


def uuid7() -> uuid.UUID:
    """A new time-ordered UUIDv7."""
    return uuid.UUID(bytes=uuid_utils.uuid7().bytes)
