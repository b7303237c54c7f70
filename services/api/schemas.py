"""Request bodies of the api's own routes (the forwarded admin commands are validated by their owners)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EntitlementIn", "Subject", "SUBJECT_PATTERN"]

# A token subject an admin may entitle: what OIDC providers put in `sub` (UAA user and client ids, GUIDs,
# "provider|id", e-mail-like names, base64url), without spaces, quotes or other punctuation.
SUBJECT_PATTERN = r"^[A-Za-z0-9._@:+|/=~-]{1,256}$"
Subject = Annotated[str, Field(min_length=1, max_length=256, pattern=SUBJECT_PATTERN)]


class EntitlementIn(BaseModel):
    """Entitle a token subject to read a customer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: Subject = Field(description="The `sub` claim of the tokens this entitlement applies to.")
    customer_id: UUID
