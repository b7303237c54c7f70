"""A context manager pausing Python's cyclic garbage collector.

Building tens of thousands of small acyclic tuples/dicts (a world snapshot, a page of JSON)
triggers many GC passes over a large heap that can free nothing; pausing the GC makes those
steps several times faster. Reference counting still frees everything as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
