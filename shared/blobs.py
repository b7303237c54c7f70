"""Documents stored compressed against a frame: how the services keep their per-shard blobs small.

Every service keeps one document per shard and hour (the collector's reading batches, the pricer's charge
batches, the ledger's applied and held charges, the api's latest charges per shard). From one hour to the
next a shard's document repeats almost all of itself: the same resource ids, orgs, spaces and names. Each
document compressed alone (zstd) halves; compressed against a *frame* — an earlier document of the same
shard and month, used as zstd's dictionary — it shrinks about four times more (measured on `make demo`'s
data: the collector's batches from 89 to 23 bytes per measurement).

A frame is stored once per scope (``meter/shard/month``) in the schema's ``blob_frames`` table and never
changes. It is written *before* the transaction that uses it, in a statement of its own (``ensure``): a
document may then reference it whatever becomes of that transaction, and a frame that is never used costs
only its row. A scope whose frame is not at hand (not ensured, or the cache dropped it) gets its document
compressed alone: frames save space, correctness never depends on one.

Stored form: one version byte, then for ``FRAMED`` the frame's id (8 bytes, big-endian), then a zstd frame.
Reading a framed document loads its frame by id (``load``), once per process.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar

import zstandard

__all__ = ["ALONE", "FRAMED", "FrameMissingError", "Frames", "scope_of", "shard_scope"]

ALONE = 1  # zstd, no dictionary
FRAMED = 2  # zstd with the frame whose id follows as the dictionary

LEVEL = 1  # against a frame: within 1% of level 3's size here (smaller on some data), ~30% faster
FRAME_LIMIT = 256 * 1024  # a longer seed is cut (a dictionary's use is its repeated substrings)
CACHE = 512  # frames kept per process (a frame is a few kB to ~100 kB: a month of 24 shards of 3 meters)


T = TypeVar("T")


class FrameMissingError(LookupError):
    """A document names a frame its schema does not hold (the table was emptied by hand)."""


class _Conn(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


def scope_of(meter: str, shard: int, hour: datetime) -> str:
    """The scope of a shard's documents: a frame serves one meter's shard for one (UTC) month."""
    return f"{meter}/{shard}/{hour:%Y-%m}"


class _OfShard(Protocol):
    @property
    def meter(self) -> str: ...
    @property
    def shard(self) -> int: ...
    @property
    def reading_hour(self) -> datetime: ...


def shard_scope(of: _OfShard) -> str:
    """``scope_of`` a batch or a shard key (anything with its meter, shard and reading hour)."""
    return scope_of(of.meter, of.shard, of.reading_hour)


def _frame_id(scope: str, frame: bytes) -> int:
    """A frame's id: a 63-bit hash of its scope and content (a bigint, the same in every process)."""
    digest = hashlib.blake2b(scope.encode() + b"\0" + frame, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class _Frame:
    __slots__ = ("compressor", "decompressor", "id")

    def __init__(self, frame_id: int, content: bytes) -> None:
        data = zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        self.id = frame_id
        self.compressor = zstandard.ZstdCompressor(level=LEVEL, dict_data=data)
        self.decompressor = zstandard.ZstdDecompressor(dict_data=data)


class Frames:
    """One schema's frames: ``ensure`` them (outside a transaction), then ``pack`` and ``unpack``.

    ``table`` is the frames table, qualified if the connections' search path does not find it. An
    instance serves one database: tests running several in one process give each its own."""

    def __init__(self, table: str = "blob_frames", cache: int = CACHE) -> None:
        self._table = table
        self._cache = cache
        self._by_scope: OrderedDict[str, _Frame] = OrderedDict()
        self._by_id: OrderedDict[int, _Frame] = OrderedDict()
        self._alone = zstandard.ZstdCompressor(level=LEVEL)
        self._plain = zstandard.ZstdDecompressor()

    def _keep(self, scope: str | None, frame: _Frame) -> None:
        if scope is not None:
            self._by_scope[scope] = frame
            self._by_scope.move_to_end(scope)
            while len(self._by_scope) > self._cache:
                self._by_scope.popitem(last=False)
        self._by_id[frame.id] = frame
        self._by_id.move_to_end(frame.id)
        while len(self._by_id) > self._cache:
            self._by_id.popitem(last=False)

    def lacks(self, scope: str) -> bool:
        """Whether ``scope`` has no frame at hand (``ensure`` would read or write one)."""
        return scope not in self._by_scope

    async def ensure(self, conn: _Conn, seeds: Mapping[str, bytes]) -> None:
        """Make sure each scope of ``seeds`` has its frame at hand: the stored one, or ``seeds[scope]`` stored
        as it (the first writer of a scope wins; every process then reads the winner). ``conn`` must not be
        inside a transaction that may roll back (a pool, or a connection between transactions)."""
        missing = {s: bytes(seed[:FRAME_LIMIT]) for s, seed in seeds.items() if s not in self._by_scope and seed}
        if not missing:
            return
        scopes = sorted(missing)
        rows = await conn.fetch(
            f"""WITH new AS (
                    INSERT INTO {self._table} (id, scope, frame)
                    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[])
                    ON CONFLICT DO NOTHING
                    RETURNING id, scope, frame)
                SELECT id, scope, frame FROM new
                UNION ALL
                SELECT id, scope, frame FROM {self._table} WHERE scope = ANY($2::text[])""",
            [_frame_id(s, missing[s]) for s in scopes],
            scopes,
            [missing[s] for s in scopes],
        )
        for r in rows:
            self._keep(r["scope"], self._by_id.get(r["id"]) or _Frame(r["id"], bytes(r["frame"])))

    async def ensure_first(
        self, conn: _Conn, items: Iterable[T], scope: Callable[[T], str], seed: Callable[[T], bytes]
    ) -> None:
        """``ensure`` the scopes of ``items``, each seeded with the first of its items whose scope has no
        frame at hand (``seed`` is called only for those)."""
        seeds: dict[str, bytes] = {}
        for item in items:
            s = scope(item)
            if s not in seeds and self.lacks(s):
                seeds[s] = seed(item)
        await self.ensure(conn, seeds)

    def pack(self, scope: str, document: bytes) -> bytes:
        """The stored form of ``document``: against its scope's frame when at hand, alone otherwise."""
        frame = self._by_scope.get(scope)
        if frame is None:
            return bytes((ALONE,)) + self._alone.compress(document)
        self._by_scope.move_to_end(scope)
        return bytes((FRAMED,)) + frame.id.to_bytes(8, "big") + frame.compressor.compress(document)

    async def load(self, conn: _Conn, stored: Iterable[bytes]) -> dict[int, _Frame]:
        """The frames that ``stored`` documents need, read from the table when not at hand (one query)."""
        need = {int.from_bytes(b[1:9], "big") for b in stored if b[0] == FRAMED}
        found = {i: self._by_id[i] for i in need if i in self._by_id}
        if len(found) < len(need):
            rows = await conn.fetch(
                f"SELECT id, frame FROM {self._table} WHERE id = ANY($1::bigint[])", sorted(need - set(found))
            )
            for r in rows:
                found[r["id"]] = frame = _Frame(r["id"], bytes(r["frame"]))
                self._keep(None, frame)
            gone = need - set(found)
            if gone:
                raise FrameMissingError(f"{self._table} lacks frame(s) {sorted(gone)} that stored documents use")
        return found

    def unpack(self, stored: bytes, frames: Mapping[int, _Frame] | None = None) -> bytes:
        """The document back, byte for byte. A framed one needs its frame: in ``frames`` (what ``load``
        answered) or at hand."""
        version = stored[0]
        if version == ALONE:
            return self._plain.decompress(stored[1:])
        if version == FRAMED:
            frame_id = int.from_bytes(stored[1:9], "big")
            frame = (frames or self._by_id).get(frame_id) or self._by_id.get(frame_id)
            if frame is None:
                raise FrameMissingError(f"frame {frame_id} is not loaded")
            return frame.decompressor.decompress(stored[9:])
        raise ValueError(f"not a stored document (version byte {version})")

    async def unpack_all(self, conn: _Conn, stored: Iterable[bytes]) -> list[bytes]:
        """Each document back, its frames loaded as needed."""
        stored = list(stored)
        frames = await self.load(conn, stored)
        return [self.unpack(b, frames) for b in stored]
