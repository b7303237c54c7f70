"""The services' stored documents read back (and, for tests that damage state on purpose, written) the way
the services do: compressed against their schema's frames (shared/blobs.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared.blobs import Frames

__all__ = ["packed", "unpacked"]


async def unpacked(conn: Any, schema: str, stored: Iterable[bytes]) -> list[bytes]:
    """The documents ``stored`` in ``schema`` (a connection or pool of any role that can read it)."""
    return await Frames(table=f"{schema}.blob_frames").unpack_all(conn, stored)


def packed(document: bytes) -> bytes:
    """``document`` in a stored form every service reads (compressed alone, no frame)."""
    return Frames().pack("", document)
