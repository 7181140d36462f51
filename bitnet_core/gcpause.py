"""Pause Python's cyclic garbage collector while a burst of objects is made.

Parsing a real tokenizer.json (128k tokens, 280k merges: ~1M lists and dicts) and building GGUF's vocabulary
from it set off collection after collection, each walking every tracked object so far, all of it on the
conversion's critical path (BENCHMARKS.md, design measurements). What they make holds no reference cycles, so
nothing is left for the collector afterwards.

What survives a pause (the parsed tokenizer a writer keeps, ~300k objects) is still walked by every later
full collection, each holding the GIL while the producer, hasher and writer threads wait on it. A one-shot
process (the command line) calls `freeze_after_pauses()`: each pause then ends with `gc.freeze()`, which takes
everything made so far out of the collector's view for good (reference counting still frees it). A library
caller's process is left as it is: freezing is process-wide, and would keep cycles its own objects form later
from ever being collected.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_freeze_after = False


def freeze_after_pauses() -> None:
    """From now on every pause ends by freezing what exists (for a process that runs one command and exits)."""
    global _freeze_after
    _freeze_after = True


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside; the collector's previous state after (nesting keeps the outer one)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _freeze_after:
            gc.freeze()
        if was_enabled:
            gc.enable()
