"""GGUF metadata arrays packed in bulk: the same bytes gguf-py writes, without one struct call per element.

gguf-py's GGUFWriter packs an array value element by element through Python, so a Llama-3 tokenizer's 128,256
tokens, token types and 280,147 merges cost a Python call each. `BulkGGUFWriter` packs string arrays (u64 length +
UTF-8 bytes per item) and numeric arrays (one numpy `tobytes`) at once and hands everything else to gguf-py,
so the file is byte for byte what gguf-py would write (tests/test_gguf_bulk.py holds them together).
`_pack_val` and `WriterState` are gguf-py's private surface (it has no hook for a bulk packer): pyproject.toml
pins the release series the suite has run them on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gguf import GGUFEndian, GGUFValueType, GGUFWriter
from gguf.gguf_writer import WriterState

from bitnet_convert.fileio.direct import DirectFile

# numeric GGUF array element types -> numpy dtype (little endian; a big-endian file goes through gguf-py)
NUMERIC = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


def string_array_body(items: Sequence[str]) -> bytes:
    """The elements of a GGUF string array: for each, its UTF-8 length as u64 (little endian), then its bytes.

    Built by numpy in whole-array steps (no Python work per item beyond measuring it): a mask of the output
    marks each item's 8 length bytes (False) and its text (True), made by one np.repeat of the pattern over
    the run lengths; the concatenated UTF-8 and the lengths' bytes then go in by two masked assignments. A
    scatter through an int64 index of every byte needs 8 bytes of fresh memory per output byte, and touching
    that memory the first time costs more than the work (BENCHMARKS.md, design measurements)."""
    if all(map(str.__instancecheck__, items)):
        # UTF-8 of the concatenation is the concatenation of the UTF-8s: one encode instead of a join of many
        lengths = np.fromiter(map(len, map(str.encode, items)), dtype=np.int64, count=len(items))
        data = np.frombuffer("".join(items).encode("utf-8"), dtype=np.uint8)
    else:
        encoded = [item.encode("utf-8") if isinstance(item, str) else bytes(item) for item in items]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    count = len(lengths)
    runs = np.empty(2 * count, np.int64)  # 8 length bytes, then the item's text, for each item
    runs[0::2] = 8
    runs[1::2] = lengths
    is_text = np.repeat(np.tile(np.array([False, True]), count), runs)
    out = np.empty(is_text.size, dtype=np.uint8)
    out[is_text] = data
    out[~is_text] = lengths.astype("<u8").view(np.uint8)
    return out.tobytes()


class BulkGGUFWriter(GGUFWriter):
    """gguf-py's writer, with arrays packed in bulk and its file a DirectFile (fileio/direct.py)."""

    def open_output_file(self, path=None) -> None:
        if self.state is WriterState.EMPTY and self.fout is not None and (path is None or path == self.path):
            return
        super().open_output_file(path)  # plans the files and opens them empty; reopened to write them directly
        names = [fout.name for fout in self.fout]
        for fout in self.fout:
            fout.close()
        self.fout = [DirectFile(name) for name in names]

    def use_file(self, fh) -> None:
        """Write to the open file object `fh` (the output pipeline's) instead of opening a path."""
        self.fout = [fh]
        self.state = WriterState.EMPTY

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if vtype != GGUFValueType.ARRAY or self.endianess != GGUFEndian.LITTLE or not val or isinstance(val, bytes):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        element = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
        if element == GGUFValueType.STRING and set(map(type, val)) == {str}:  # decided in C: 408k items
            body = string_array_body(val)
        elif element in NUMERIC and not isinstance(val[0], bool):
            body = np.asarray(val, dtype=NUMERIC[element]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", element) + self._pack("Q", len(val))
        return head + body
