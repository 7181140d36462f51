"""Host buffers that XLA's CPU client adopts as they are.

`jax.device_put` of a numpy array whose data starts on a 64-byte boundary aliases it on the CPU backend;
anything else is copied, so for a moment the tensor exists twice (the 0.66 GB bf16 head of 2B4T: a 0.6 GiB
peak). numpy's own large allocations start 16 bytes past a page. Readers and the engine's loader allocate
tensor buffers here, so loading a model costs its size once.
"""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64  # bytes: XLA's CPU client adopts host buffers aligned to this without copying


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + count * dtype.itemsize].view(dtype).reshape(shape)
