"""The GGUF container, parsed by us: header, key/values and tensor infos, with work bounded by the file.

    magic "GGUF", version u32 (2 or 3), tensor count u64, key/value count u64,
    key/values:   key (u64 length + UTF-8), value type u32, value (scalar | string | array: item type u32,
                  count u64, items),
    tensor infos: name (string), n_dims u32, dims u64 x n_dims (ne0 first), GGML type u32, offset u64,
    padding to `general.alignment` (default 32), then the tensor data.

Why not gguf-py's GGUFReader: it makes numpy views per array element while it opens a file, so a small file
with one long array costs memory and time out of all proportion (BENCHMARKS.md, design measurements), and it
trusts every count.
Here each count is checked against the bytes left before anything is walked, arrays of numbers are one
slice, strings are decoded only when a key is asked for, nested arrays are refused (as llama.cpp's gguf.cpp
does), and string arrays hold at most MAX_STRINGS items in all (a real tokenizer: ~0.4 M tokens and merges).

The header is read through the source's held descriptor (fileio/sources.py), in growing chunks with pread,
so a file truncated while it is parsed gives an error, never a SIGBUS from a mapping. The object offers the
parts of gguf-py's reader that inspection uses (`fields[k].offset/.parts`, `tensors`, `data`).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from bitnet_convert.fileio.sources import HeldFile
from bitnet_convert.formats.gguf.types import I2_S, KEY_SPLIT_TENSORS
from bitnet_core.codecs import i2s
from bitnet_core.errors import ConvertError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRINGS = 1 << 21  # all string-array items of one file together
_FIRST_CHUNK = 1 << 20
_U64 = struct.Struct("<Q")

# value type id -> (name, struct format) of the scalar types; 8 string, 9 array
SCALARS: dict[int, tuple[str, str]] = {
    0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"), 5: ("i32", "<i"),
    6: ("f32", "<f"), 7: ("bool", "<?"), 10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d"),
}
STRING, ARRAY = 8, 9
INTEGER_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))
FLOAT_TYPES = frozenset((6, 12))
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


def type_name(vtype: int, item: int | None = None) -> str:
    if vtype == ARRAY:
        return f"an array of {type_name(item) if item is not None else '?'}"
    return "a string" if vtype == STRING else SCALARS.get(vtype, (f"type {vtype}",))[0]


@dataclasses.dataclass(frozen=True)
class Field:
    """One key/value entry: where it lies, its type, and (for arrays) its item type and count."""

    name: str
    offset: int  # the entry's first byte (its key length)
    nbytes: int  # the whole entry: key, type, value
    vtype: int
    value_at: int  # the value's first byte (an array's item type)
    item: int | None = None  # array item type
    count: int = 1  # array length
    header: GGUFHeader | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def parts(self) -> tuple[np.ndarray]:
        """gguf-py's ReaderField.parts, reduced to one part spanning the entry (what inspection sums)."""
        return (self.header.data[self.offset : self.offset + self.nbytes],)

    def kind(self) -> str:
        return type_name(self.vtype, self.item)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor info record, checked: a known GGML type, whole blocks, data inside the file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # dims as GGUF lists them: ne0 (the row length) first
    n_elements: int
    n_bytes: int  # by block arithmetic (as gguf-py): without the I2_S tail
    data_offset: int  # absolute, in the file of `header`
    header: GGUFHeader | None = dataclasses.field(default=None, repr=False, compare=False)  # the file it is in

    @property
    def stored_nbytes(self) -> int:
        """The bytes the tensor occupies: I2_S adds its 32-byte tail (types.py)."""
        return i2s.nbytes(self.n_elements) if self.tensor_type == I2_S else self.n_bytes


class _Bytes:
    """The file's first bytes, read with pread in growing chunks as the parse reaches further."""

    def __init__(self, held: HeldFile, path: Path):
        self.held, self.path = held, path
        self.size = held.size
        self.buf = bytearray(held.pread(0, min(self.size, _FIRST_CHUNK)))

    def need(self, end: int) -> None:
        if end > self.size:
            raise ConvertError(f"{self.path}: truncated or corrupt GGUF (header runs past the end of the file)")
        if end > len(self.buf):
            grow = min(max(end - len(self.buf), len(self.buf)), self.size - len(self.buf))
            self.buf += self.held.pread(len(self.buf), grow)
            if end > len(self.buf):
                raise ConvertError(f"{self.path}: truncated while it was read")

    def unpack(self, fmt: str, at: int):
        self.need(at + struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, at)[0]

    def text(self, at: int) -> tuple[str, int]:
        """(the string at `at`, the offset after it)."""
        raw, end = self.raw_string(at)
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError:
            raise ConvertError(f"{self.path}: corrupt GGUF (a key or tensor name is not UTF-8)") from None

    def skip_strings(self, at: int, count: int) -> int:
        """The offset after `count` strings starting at `at` (a tight loop: tokenizers hold ~0.4 M of them)."""
        length = _U64.unpack_from
        for _ in range(count):
            if at + 8 > len(self.buf):
                self.need(at + 8)
            at += 8 + length(self.buf, at)[0]
        self.need(at)
        return at

    def strings(self, at: int, count: int) -> list[bytearray]:
        """The `count` strings from `at`, raw (a region the parse has walked: every length is known to fit)."""
        length, buf, out = _U64.unpack_from, self.buf, []
        for _ in range(count):
            n = length(buf, at)[0]
            out.append(buf[at + 8 : at + 8 + n])
            at += 8 + n
        return out

    def raw_string(self, at: int) -> tuple[bytes, int]:
        n = self.unpack("<Q", at)
        self.need(at + 8 + n)
        return bytes(self.buf[at + 8 : at + 8 + n]), at + 8 + n


class GGUFHeader:
    """A parsed GGUF file: `fields` (key -> Field), `tensors` (TensorInfo, file order), `value(key)`."""

    def __init__(self, held: HeldFile, path: Path):
        self.held, self.path = held, Path(path)
        self._bytes = _Bytes(held, self.path)
        self.fields: dict[str, Field] = {}
        self.tensors: list[TensorInfo] = []
        self._strings = 0
        at = self._preamble()
        tensor_count, kv_count = self._bytes.unpack("<Q", 8), self._bytes.unpack("<Q", 16)
        self._check_count(kv_count, 12, "keys")  # each entry: key length 8 + value type 4, at least
        self._check_count(tensor_count, 24, "tensors")  # name length 8, n_dims 4, type 4, offset 8
        for _ in range(kv_count):
            at = self._field(at)
        self.alignment = self._alignment()
        infos = []
        for _ in range(tensor_count):
            info, at = self._tensor_info(at)
            infos.append(info)
        self.data_start = -(-at // self.alignment) * self.alignment
        for info in infos:
            self.tensors.append(self._tensor(*info))
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ConvertError(f"{self.path}: corrupt GGUF (two tensors have the same name)")

    @property
    def data(self) -> np.ndarray:
        """The whole file, memory-mapped (inspection only: loads read with pread)."""
        return self.held.mapping()

    def get_field(self, key: str) -> Field | None:
        return self.fields.get(key)

    # --- key/values

    def _preamble(self) -> int:
        b = self._bytes
        if bytes(b.buf[:4]) != MAGIC:
            raise ConvertError(f"{self.path}: not a GGUF file (no GGUF magic)")
        b.need(24)
        version = b.unpack("<I", 4)
        if version & 0xFFFF == 0 and version:
            raise ConvertError(f"{self.path}: a big-endian GGUF; only little-endian files are supported")
        if version not in VERSIONS:
            raise ConvertError(f"{self.path}: GGUF version {version} is not supported (only versions 2 and 3)")
        return 24

    def _check_count(self, count: int, smallest: int, what: str) -> None:
        if count * smallest > self._bytes.size:
            raise ConvertError(f"{self.path}: truncated or corrupt GGUF (header claims {count} {what})")

    def _field(self, at: int) -> int:
        name, value_type_at = self._bytes.text(at)
        if name in self.fields:
            raise ConvertError(f"{self.path}: corrupt GGUF (key {name} appears twice)")
        vtype = self._bytes.unpack("<I", value_type_at)
        value_at = value_type_at + 4
        item, count, end = None, 1, self._skip(vtype, value_at, name)
        if vtype == ARRAY:
            item, count = self._bytes.unpack("<I", value_at), self._bytes.unpack("<Q", value_at + 4)
        self.fields[name] = Field(name, at, end - at, vtype, value_at, item, count, self)
        return end

    def _skip(self, vtype: int, at: int, name: str) -> int:
        """The offset after a value of `vtype` at `at`, every length checked against the file first."""
        if vtype in SCALARS:
            return at + struct.calcsize(SCALARS[vtype][1])
        if vtype == STRING:
            return at + 8 + self._bytes.unpack("<Q", at)
        if vtype != ARRAY:
            raise ConvertError(f"{self.path}: corrupt GGUF (key {name} has unknown value type {vtype})")
        item, count = self._bytes.unpack("<I", at), self._bytes.unpack("<Q", at + 4)
        at += 12
        if item in SCALARS:
            end = at + count * struct.calcsize(SCALARS[item][1])
            self._bytes.need(end)
            return end
        if item != STRING:
            what = "an array of arrays" if item == ARRAY else f"an array of unknown type {item}"
            raise ConvertError(f"{self.path}: key {name} is {what} (not supported)")
        self._check_count(count, 8, f"strings in key {name}")
        self._strings += count
        if self._strings > MAX_STRINGS:
            raise ConvertError(f"{self.path}: key {name} brings the metadata to {self._strings} strings, more "
                               f"than any tokenizer (at most {MAX_STRINGS})")
        return self._bytes.skip_strings(at, count)

    def value(self, key: str):
        """The key's value as Python (int, float, bool, str, or a list of them), or None when absent."""
        field = self.fields.get(key)
        if field is None:
            return None
        if field.vtype in SCALARS:
            return self._bytes.unpack(SCALARS[field.vtype][1], field.value_at)
        if field.vtype == STRING:
            return self._string(field.value_at, key)
        start = field.value_at + 12
        if field.item in SCALARS:  # one slice, however long
            dtype = np.dtype(_NUMPY[field.item])
            raw = bytes(self._bytes.buf[start : start + field.count * dtype.itemsize])
            return np.frombuffer(raw, dtype).tolist()
        try:
            return [raw.decode("utf-8") for raw in self._bytes.strings(start, field.count)]
        except UnicodeDecodeError:
            raise ConvertError(f"{self.path}: key {key} holds a string that is not UTF-8") from None

    def _string(self, at: int, key: str) -> str:
        raw, _ = self._bytes.raw_string(at)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError(f"{self.path}: key {key} holds a string that is not UTF-8") from None

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        if field.vtype != 4:
            raise ConvertError(f"{self.path}: key general.alignment is {field.kind()}, expected u32")
        value = self.value("general.alignment")
        if value == 0 or value & (value - 1):
            raise ConvertError(f"{self.path}: key general.alignment is {value}, expected a power of two")
        return value

    # --- tensor infos

    def _tensor_info(self, at: int) -> tuple[tuple, int]:
        b = self._bytes
        name, at = b.text(at)
        n_dims = b.unpack("<I", at)
        if not 1 <= n_dims <= MAX_DIMS:
            raise ConvertError(f"{self.path}: corrupt GGUF (tensor {name} has {n_dims} dimensions)")
        dims = tuple(b.unpack("<Q", at + 4 + 8 * i) for i in range(n_dims))
        at += 4 + 8 * n_dims
        raw_type, offset = b.unpack("<I", at), b.unpack("<Q", at + 4)
        return (name, dims, raw_type, offset), at + 12

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> TensorInfo:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ConvertError(f"{self.path}: unsupported tensor type {raw_type} (tensor {name})") from None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        n_elements = int(np.prod(dims, dtype=object))
        if dims[0] % block:
            raise ConvertError(f"{self.path}: tensor {name} has rows of {dims[0]} values, not whole "
                               f"{ggml_type.name} blocks of {block}")
        if offset % self.alignment:
            raise ConvertError(f"{self.path}: corrupt GGUF (tensor {name} data is not {self.alignment}-aligned)")
        info = TensorInfo(name, ggml_type, dims, n_elements, n_elements // block * block_bytes,
                          self.data_start + offset, self)
        end = info.data_offset + info.stored_nbytes
        if end > self._bytes.size:
            raise ConvertError(f"{self.path}: truncated: tensor {name} ends at byte {end}, file has {self._bytes.size}")
        return info


def typed_value(header: GGUFHeader, key: str, accepts: frozenset[int], expected: str,
                check: Callable[[object], bool] = lambda v: True):
    """`header.value(key)` when the key is of one of the value types `accepts` (None when absent), else a
    ConvertError naming the file, the key and both types."""
    field = header.get_field(key)
    if field is None:
        return None
    if field.vtype not in accepts:
        raise ConvertError(f"{header.path}: key {key} is {field.kind()}, expected {expected}")
    value = header.value(key)
    if not check(value):
        raise ConvertError(f"{header.path}: key {key} is {str(value)[:40]}, expected {expected}")
    return value


class GGUFSet:
    """One GGUF file, or the files of a split set read as one: the key/values of the first file (the others
    hold only their place in the set), the tensors of all in file order (each knows its file: TensorInfo.header)."""

    def __init__(self, headers: list[GGUFHeader], declared: int | None = None) -> None:
        self.headers = headers
        first = headers[0]
        self.path, self.fields, self.held = first.path, first.fields, first.held
        self.tensors = [t for header in headers for t in header.tensors]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ConvertError(f"{self.path}: corrupt split GGUF (two files hold a tensor of the same name)")
        if declared is not None and declared != len(self.tensors):
            raise ConvertError(f"{self.path}: {KEY_SPLIT_TENSORS} says {declared} tensors; its files hold "
                               f"{len(self.tensors)}")

    @property
    def data(self) -> np.ndarray:
        return self.headers[0].data

    def value(self, key: str):
        return self.headers[0].value(key)

    def get_field(self, key: str):
        return self.headers[0].get_field(key)

    @property
    def files(self) -> list[Path]:
        return [header.path for header in self.headers]
