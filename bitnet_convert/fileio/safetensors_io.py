"""safetensors without holding a model in memory: memory-mapped reading and a streaming writer.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
JSON ``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`` padded with
spaces so the data starts on an 8-byte boundary, then the tensors' bytes back to back (C order, little endian),
offsets relative to the start of the data.

Reading parses and checks the header ourselves and maps the data with `np.memmap`: a tensor is a zero-copy,
read-only view (safetensors' own `safe_open(framework="np")` reads bf16 too, but copies every tensor, ~100x
slower than the view). Every defect (short file, bad JSON, offsets outside the file, sizes
that disagree with shapes) is a ConvertError naming the file.

Writing takes the list of tensors up front, writes the header, then asks for each tensor's data in turn, so
only one tensor is in memory at a time. The files read back identically with `safetensors.safe_open`,
`safetensors.numpy.load_file` and `safetensors.torch.load_file`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from bitnet_core.aligned import aligned_empty
from bitnet_core.checkpoint import RowBlocks

from bitnet_convert.fileio.direct import DirectFile
from bitnet_convert.fileio.prefetch import prefetch
from bitnet_convert.fileio.sources import HeldFile, SourceWatch, read_json_file
from bitnet_core.errors import ConvertError

# safetensors dtype code <-> numpy dtype (bf16 and fp8 come from ml_dtypes).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODE_OF = {dtype: code for code, dtype in DTYPES.items()}

HEADER_ALIGNMENT = 8
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def dtype_code(dtype) -> str:
    """numpy dtype -> safetensors code ("BF16", "U8" ...)."""
    dtype = np.dtype(dtype)
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("<")
    try:
        return _CODE_OF[dtype]
    except KeyError:
        raise ConvertError(f"safetensors cannot store dtype {np.dtype(dtype)}") from None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the writer promises in the header before any data exists."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> TensorSpec:
        return cls(name, array.dtype, array.shape)


# --------------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor inside a safetensors file: header facts and its bytes, read through the file's held descriptor."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    file: SafetensorsFile = dataclasses.field(repr=False)
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def path(self) -> Path:
        return self.file.path

    def raw(self) -> memoryview:
        """The stored bytes, as they are on disk."""
        return memoryview(self.file.data()[self.start : self.end])

    def array(self) -> np.ndarray:
        """A read-only array viewing the memory-mapped file (copy it to modify)."""
        flat = self.file.data()[self.start : self.end]
        return flat.view(self.dtype).reshape(self.shape)

    def read(self) -> np.ndarray:
        """A private, writable copy of the tensor, read with pread instead of through the mapping.

        For streaming: a mapped page a process has touched stays in its resident set until the mapping goes,
        so viewing every tensor of a 1.2 GB file through `array()` ends at 1.2 GB RSS however little is kept.
        Read this way, the bytes go from the page cache into a buffer that is freed with the array; and a copy
        is what a source watch can vouch for (fileio/sources.py): a mapping shows later writes to the file.
        """
        out = aligned_empty(self.end - self.start, np.uint8)  # adopted as it is by a JAX CPU array
        self._read_into(self.start, out)
        return out.view(self.dtype).reshape(self.shape)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor, read as `read` reads it whole (a private copy, through pread)."""
        row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows {start}:{stop} of a tensor of {self.shape[0]}")
        out = np.empty((stop - start) * row_bytes, np.uint8)
        self._read_into(self.start + start * row_bytes, out)
        return out.view(self.dtype).reshape(stop - start, *self.shape[1:])

    def _read_into(self, offset: int, out: np.ndarray) -> None:
        got = self.file.held.readinto(offset, memoryview(out))
        if got != out.size:
            raise ConvertError(f"{self.path}: tensor {self.name} is cut short ({got} of {out.size} bytes; truncated?)")


class SafetensorsFile:
    """A .safetensors file whose header is parsed and checked on open, through one descriptor held from then on
    (`held`, from `watch` when given); data is mapped on first use of `data()`."""

    def __init__(self, path: str | os.PathLike, watch: SourceWatch | None = None):
        self.path = Path(path)
        self.held = watch.hold(self.path) if watch is not None else HeldFile(self.path)
        self.metadata, data_start, entries = _read_header(self.path, self.held)
        self.tensors: dict[str, StoredTensor] = {
            name: StoredTensor(name, dtype, shape, self, data_start + begin, data_start + end)
            for begin, end, name, dtype, shape in entries
        }

    def data(self) -> np.ndarray:
        return self.held.mapping()

    def __iter__(self) -> Iterator[StoredTensor]:
        """Tensors in the order their bytes sit in the file."""
        return iter(self.tensors.values())


def _read_header(path: Path, held: HeldFile) -> tuple[dict[str, str], int, list[tuple]]:
    """(metadata, absolute start of the data, [(begin, end, name, dtype, shape)] in byte order), all checked."""
    def bad(why: str) -> ConvertError:
        return ConvertError(f"{path}: not a valid safetensors file: {why}")

    size = held.size
    prefix = held.pread(0, 8)
    if len(prefix) < 8:
        raise bad(f"{size} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise bad(f"header length {header_len} does not fit in the {size}-byte file (truncated?)")
    header_bytes = held.pread(8, header_len)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also integers of more than 4300 digits
        raise bad(f"header is not JSON ({exc})") from None
    except RecursionError:
        raise bad("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_len = size - data_start
    entries = [_header_entry(name, info, bad) for name, info in header.items()]

    # The data must be exactly the tensors, back to back: anything else means a truncated or spliced file.
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    for begin, end, name, *_ in entries:
        if begin != cursor:
            raise bad(f"tensor {name} starts at data offset {begin}, expected {cursor} (overlap or gap)")
        cursor = end
    if cursor != data_len:
        state = "truncated" if cursor > data_len else "has trailing bytes"
        raise bad(f"tensors need {cursor} data bytes, file holds {data_len} ({state})")

    return metadata, data_start, entries


def _header_entry(name: str, info, bad: Callable[[str], ConvertError]) -> tuple:
    """(begin, end, name, dtype, shape) of one header entry, each field of the JSON type it must have."""
    if not isinstance(info, dict):
        raise bad(f"tensor {name}: malformed entry {_preview(info)}")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
        raise bad(f"tensor {name}: unknown or missing 'dtype' ({_preview(info.get('dtype'))})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _integers(shape) or not _integers(offsets) or len(offsets) != 2:
        raise bad(f"tensor {name}: malformed entry {_preview(info)}")
    dtype, begin, end = DTYPES[info["dtype"]], offsets[0], offsets[1]
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise bad(f"tensor {name}: negative shape or offsets")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise bad(f"tensor {name}: {end - begin} bytes for shape {list(shape)} of {info['dtype']}")
    return begin, end, name, dtype, tuple(shape)


def _integers(value) -> bool:
    """A JSON list of integers (booleans and floats are not)."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _preview(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def open_safetensors(path: str | os.PathLike, watch: SourceWatch | None = None) -> SafetensorsFile:
    """Open one file; its tensors, in file order, are in `.tensors`."""
    return SafetensorsFile(path, watch)


@dataclasses.dataclass
class TensorFiles:
    """The tensors of a model folder: one `model.safetensors` or shards listed by `model.safetensors.index.json`.

    where: the file to name in messages about the set as a whole (the single file, or the index).
    files: the files in their natural order (shard 1, 2, ...).
    tensors: name -> StoredTensor, file by file, each file in its byte order.
    """

    where: Path
    files: list[SafetensorsFile]
    tensors: dict[str, StoredTensor]

    def stored_bytes(self) -> Iterator[tuple[str, memoryview]]:
        for sf in self.files:
            for tensor in sf:
                yield tensor.name, tensor.raw()


def open_model_files(folder: str | os.PathLike, watch: SourceWatch | None = None) -> TensorFiles:
    """Open the safetensors file(s) of a Hugging Face model folder, checking the index against the shards."""
    folder = Path(folder)
    watch = watch or SourceWatch()
    index_path = folder / INDEX_FILE
    if os.path.lexists(index_path):  # whatever it is: a FIFO or a folder under this name is refused, not skipped
        return _open_sharded(index_path, watch)
    single = folder / SINGLE_FILE
    if not os.path.lexists(single):
        candidates = sorted(folder.glob("*.safetensors"))
        if len(candidates) != 1:
            raise no_weights(folder)
        single = candidates[0]
    sf = open_safetensors(single, watch)
    return TensorFiles(single, [sf], dict(sf.tensors))


# Weight files torch.save writes: pickles, which bitnet-convert never loads (not even with weights_only).
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def has_safetensors_weights(folder: str | os.PathLike) -> bool:
    return any(os.path.lexists(Path(folder) / name) for name in (SINGLE_FILE, INDEX_FILE))


def pickled_weights(folder: str | os.PathLike) -> str | None:
    """The name of the first pickled weight file in `folder`, if any."""
    return next((p.name for pattern in PICKLE_PATTERNS for p in sorted(Path(folder).glob(pattern))), None)


def no_weights(folder: str | os.PathLike) -> ConvertError:
    """The error for a folder without safetensors weights, saying so when it holds pickled ones instead (a
    verify --reference of such a folder once ended in torch.load)."""
    pickle = pickled_weights(folder)
    also = f"; {pickle} is a pickle, which bitnet-convert never loads (only safetensors weights)" if pickle else ""
    return ConvertError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{also}")


def _weight_map(index_path: Path, watch: SourceWatch) -> dict[str, str]:
    """The index's tensor name -> shard file name map, every key and value a string."""
    index = read_json_file(watch, index_path, "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ConvertError(f"{index_path}: weight_map entry {name!r} is {_preview(shard)}, expected a file name")
        if Path(shard).name != shard or shard in ("", ".", ".."):  # the index must not point outside its folder
            raise ConvertError(f"{index_path}: shard name {shard!r} is not a plain file name")
    return weight_map


def _open_sharded(index_path: Path, watch: SourceWatch) -> TensorFiles:
    weight_map = _weight_map(index_path, watch)
    files = [open_safetensors(index_path.parent / shard, watch) for shard in sorted(set(weight_map.values()))]
    tensors: dict[str, StoredTensor] = {}
    for sf in files:
        for tensor in sf:
            listed = weight_map.get(tensor.name)
            if listed != sf.path.name:
                where = f"lists it in {listed}" if listed else "does not list it"
                raise ConvertError(f"{index_path}: tensor {tensor.name} is stored in {sf.path.name} but the index {where}")
            tensors[tensor.name] = tensor
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise ConvertError(f"{index_path}: tensor {missing[0]} is listed but not stored in {weight_map[missing[0]]}")
    return TensorFiles(index_path, files, tensors)


# --------------------------------------------------------------------------------------------------- writing

Produce = Callable[[TensorSpec], "np.ndarray | bytes | memoryview"]
OnWritten = Callable[[TensorSpec, memoryview], None]


def header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for tensors stored back to back in the order of `specs`."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in header or spec.name == "__metadata__":
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        header[spec.name] = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    # Pad with spaces (valid JSON whitespace) so the data starts 8-byte aligned, as safetensors does.
    encoded += b" " * (-(8 + len(encoded)) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded


def _as_bytes(spec: TensorSpec, value) -> memoryview:
    """The C-order little-endian bytes of one produced tensor, checked against its promised spec."""
    if isinstance(value, np.ndarray):
        if value.dtype != spec.dtype or tuple(value.shape) != spec.shape:
            raise ConvertError(
                f"tensor {spec.name}: produced {value.dtype}{list(value.shape)}, header promised {spec.dtype}{list(spec.shape)}"
            )
        if value.dtype.byteorder == ">":
            value = value.astype(value.dtype.newbyteorder("<"))
        # A uint8 view: memoryview cannot describe ml_dtypes' bf16/fp8 itself.
        raw = memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    else:
        raw = memoryview(value).cast("B")
    if raw.nbytes != spec.nbytes:
        raise ConvertError(f"tensor {spec.name}: produced {raw.nbytes} bytes, header promised {spec.nbytes}")
    return raw


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Produce,
    metadata: Mapping[str, str] | None = None,
    *,
    on_written: OnWritten | None = None,
) -> int:
    """Write one safetensors file, streaming: `produce(spec)` is called once per spec, in order.

    `produce` returns an array of exactly `spec.dtype` and `spec.shape` (or the raw bytes, or a RowBlocks of
    them); the bytes are written at once and dropped, so peak memory is one tensor (one block of rows). Tensors are stored in the order of `specs`
    (put wider dtypes first if readers should get aligned views). `on_written(spec, raw)` sees each tensor's
    stored bytes in order, for hashing and progress: in one piece, or one per block of a RowBlocks. Returns the file size. Write into a temporary path
    (`atomic.atomic_path`): an exception leaves a partial file.
    """
    specs = list(specs)
    head = header_bytes(specs, metadata)
    with DirectFile(path) as fh:
        fh.write(head)
        # The next tensor is produced on a second core while this one is written and hashed (prefetch.py).
        with prefetch(piece for spec in specs for piece in _pieces(spec, produce(spec))) as pieces:
            for spec, raw in pieces:
                fh.write(raw)
                if on_written is not None:
                    on_written(spec, raw)
        return fh.tell()


def stored_pieces(spec: TensorSpec, value) -> Iterator[memoryview]:
    """The stored bytes of one produced tensor (an array, bytes, or a RowBlocks), checked against its spec."""
    return (raw for _, raw in _pieces(spec, value))


def _pieces(spec: TensorSpec, value) -> Iterator[tuple[TensorSpec, memoryview]]:
    """(spec, bytes) of one produced tensor: one piece, or one per block of a RowBlocks (at least one)."""
    if not isinstance(value, RowBlocks):
        yield spec, _as_bytes(spec, value)
        return
    if value.dtype != spec.dtype or value.shape != spec.shape:
        raise ConvertError(f"tensor {spec.name}: produced {value.dtype}{list(value.shape)}, header promised "
                           f"{spec.dtype}{list(spec.shape)}")
    rows = 0
    for block in value.blocks:
        block_spec = dataclasses.replace(spec, shape=(len(block), *spec.shape[1:]))
        rows += len(block)
        if rows > spec.shape[0]:
            break
        yield spec, _as_bytes(block_spec, block)
    if rows != spec.shape[0]:
        raise ConvertError(f"tensor {spec.name}: produced {rows} rows, header promised {spec.shape[0]}")
    if rows == 0:
        yield spec, memoryview(b"")


def shard_name(index: int, count: int, prefix: str = "model") -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into runs of at most `max_shard_bytes` data (a bigger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_files(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[tuple[str, list[TensorSpec]]]:
    """(file name, its specs) of each file: `model.safetensors`, or the Hugging Face shards."""
    shards = plan_shards(list(specs), max_shard_bytes)
    if len(shards) == 1:
        return [(SINGLE_FILE, shards[0])]
    return [(shard_name(i, len(shards)), shard) for i, shard in enumerate(shards, start=1)]


def shard_index(files: Sequence[tuple[str, Sequence[TensorSpec]]]) -> bytes | None:
    """The bytes of `model.safetensors.index.json` for sharded `files` (None for one file)."""
    if len(files) == 1:
        return None
    weight_map = {spec.name: name for name, shard in files for spec in shard}
    total = sum(spec.nbytes for _, shard in files for spec in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(index, indent=2) + "\n").encode()


def write_sharded_safetensors(
    folder: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Produce,
    metadata: Mapping[str, str] | None = None,
    *,
    max_shard_bytes: int,
    on_written: OnWritten | None = None,
) -> list[Path]:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`
    when the data exceeds `max_shard_bytes` (the Hugging Face convention). Returns the files written."""
    folder = Path(folder)
    files = shard_files(specs, max_shard_bytes)
    for name, shard in files:
        write_safetensors(folder / name, shard, produce, metadata, on_written=on_written)
    index = shard_index(files)
    if index is not None:
        (folder / INDEX_FILE).write_bytes(index)
    return [folder / name for name, _ in files]
