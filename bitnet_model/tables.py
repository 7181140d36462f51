"""Embedding and output tables read in place from the memory-mapped checkpoint, never copied.

A 2B4T bf16 table is 0.66 GB, and a copy of it is 0.66 GB of the process's own memory whether a step reads it or
not. Read in place, its pages come from the page cache as a kernel touches them: the embedding lookup touches a
few rows, the greedy screen (engine.with_screen) an int8 copy and the few exact rows that can still win, so
greedy generation holds the packed weights and the screen, not the table (sampling reads every row, and then
every page is resident, as a runtime's mapped file is).

XLA adopts host memory without a copy only from a 64-byte aligned address, and a table's bytes sit wherever
the file puts them (2B4T's safetensors table does not start on 64 bytes). So the array handed to XLA starts at
the aligned address at or below the table and runs to its end; the table is `offset` bytes into it (a few
bytes of the header or the tensor before it, never read). Only the native kernels (native.table_matmul,
native.greedy_head, native.table_rows) read such a table; the engine uses it only where they run.

The mapping shows the file as it is: a file rewritten in place while a model generates changes what it reads
(as with a runtime's memory-mapped model); a file replaced by a new one (a rename, as every bitnet-convert
output is published) leaves the mapping on the old one.
"""

from __future__ import annotations

import dataclasses
import mmap

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_core import pages

ALIGNMENT = 64  # XLA's CPU buffers: below this a host array is copied, not adopted
KINDS = {np.dtype(np.uint16): 1, np.dtype(np.float32): 2}  # the kernels' `kind` of a table (bf16 bits, float32)


@dataclasses.dataclass(frozen=True)
class MappedTable:
    """A table [rows, cols] of bf16 bits (uint16) or float32 inside `data`, uint8 [offset + rows * cols * size]
    viewing the file mapping from a 64-byte aligned address."""

    data: jax.Array
    rows: int
    cols: int
    dtype: np.dtype
    offset: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def host(self) -> np.ndarray:
        """The table as a read-only numpy view of the mapping (reading it faults its pages in)."""
        raw = np.asarray(self.data)[self.offset:]
        return raw.view(self.dtype).reshape(self.rows, self.cols)

    def attributes(self) -> dict:
        """The FFI attributes that tell a table kernel where the table is in `data`."""
        return {"offset": np.int64(self.offset), "kind": np.int32(KINDS[self.dtype]), "rows": np.int64(self.rows)}


jax.tree_util.register_dataclass(MappedTable, data_fields=["data"], meta_fields=["rows", "cols", "dtype", "offset"])


def in_place(view: np.ndarray) -> MappedTable | None:
    """A table from `view`, a C-contiguous 2-D array of bf16 (or its uint16 bits) or float32 viewing a memory map,
    without copying it; None where that cannot be done (not a view of a map, another dtype, or no aligned
    address inside the map at or below it)."""
    dtype = np.dtype(np.uint16) if view.dtype == jnp.bfloat16 else view.dtype  # bf16 as its bits
    if view.ndim != 2 or dtype not in KINDS or not view.flags.c_contiguous or view.size == 0:
        return None
    root = view
    while isinstance(root.base, np.ndarray):
        root = root.base
    owner = root.base.obj if isinstance(root.base, memoryview) else root.base
    if not isinstance(owner, mmap.mmap) or not root.flags.c_contiguous:
        return None
    start = view.ctypes.data - root.ctypes.data
    offset = view.ctypes.data % ALIGNMENT
    if start - offset < 0 or start + view.nbytes > root.nbytes:
        return None
    data = root.reshape(-1).view(np.uint8)[start - offset:start + view.nbytes]
    device = jax.device_put(data)
    if device.unsafe_buffer_pointer() != data.ctypes.data:  # copied after all: no better than a plain load
        return None
    return MappedTable(device, view.shape[0], view.shape[1], dtype, offset)


def drop_pages(view: np.ndarray) -> None:
    """Drop the whole pages of a memory-mapped read-only `view` from this process's resident set
    (bitnet_core.pages): what a reader that passed over a table once (building the screen) does not need
    resident."""
    begin = -(-view.ctypes.data // pages.PAGE) * pages.PAGE  # pages wholly inside: a neighbour's rows stay
    end = (view.ctypes.data + view.nbytes) // pages.PAGE * pages.PAGE
    pages.drop_resident(begin, end)
