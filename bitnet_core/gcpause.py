"""Pause Python's cyclic garbage collector while a burst of objects is made.

Parsing a real tokenizer.json (128k tokens, 280k merges: ~1M lists and dicts) and building GGUF's vocabulary
from it set off collection after collection, each walking every tracked object so far, all of it on the
conversion's critical path (BENCHMARKS.md, design measurements). What they make holds no reference cycles, so
nothing is left for the collector afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside; the collector's previous state after (nesting keeps the outer one)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
