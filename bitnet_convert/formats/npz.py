"""The packed-ternary `.npz`: one file that plain numpy reads, `np.load(path, allow_pickle=False)`.

An `.npz` is a zip archive of `.npy` members; `np.load` returns a lazy mapping that reads a member only when
it is indexed, so a consumer can pull one projection out of a 2B model without touching the rest.

Keys (zip member = key + ".npy"; all members stored uncompressed, written in this order)
-----------------------------------------------------------------------------------------
| key                            | dtype         | shape                  | content                                  |
|--------------------------------|---------------|------------------------|------------------------------------------|
| `meta/format.json`             | uint8         | [n]                    | UTF-8 JSON `{"format": "bitnet-convert-npz", "version": 1, "ternary_packing": "base3-5"}` |
| `meta/config.json`             | uint8         | [n]                    | the HF `config.json`, without `quantization_config` |
| `tokenizer/<file name>`        | uint8         | [n]                    | each tokenizer file verbatim (tokenizer.json, tokenizer_config.json, ...) |
| `tensor/<hf name>/codes`       | uint8         | [ceil(out*in/5)]       | ternary projection, base-3 packed (below) |
| `tensor/<hf name>/multiplier`  | float32       | [1]                    | its multiplier: `W = codes * multiplier` (mean abs of the masters) |
| `tensor/<hf name>/data`        | float32 / float16 / uint16 | logical shape | any other tensor in its stored precision; bfloat16 is stored as its uint16 bit pattern |
| `meta/tensors.json`            | uint8         | [n]                    | UTF-8 JSON list, in file order, of `{"name", "kind", "shape", "dtype"}`, kind `"ternary"` or `"dense"`; `dtype` is `"bfloat16"`, `"float16"` or `"float32"` for dense tensors (the dtype record that turns uint16 bits back into bf16), null for ternary |
| `meta/provenance.json`         | uint8         | [n]                    | `integrity.provenance_record`: source, producer, `content_hash` |

Arrays are C order, little-endian. `<hf name>` is the Hugging Face tensor name, e.g. `tensor/model.layers.0.mlp.down_proj.weight/codes`.
`content_hash` is `sha256-tensors-v1` over every `tensor/...` member (key without `.npy`, then its array
bytes) in file order. Byte arrays decode with `bytes(z["meta/config.json"])`.

Ternary bit layout ("base3-5", `codecs/trits.py`)
-------------------------------------------------
Flatten the `[out, in]` codes row-major, map -1/0/+1 to digits 0/1/2, pad the end with digit 1 to a multiple
of 5, and pack each group of five into one byte, first value in the lowest digit:
`byte = d0 + 3*d1 + 9*d2 + 27*d3 + 81*d4` (0..242; 243..255 are invalid). Decoding with numpy alone:

    z = np.load("model.npz", allow_pickle=False)
    b = z["tensor/model.layers.0.mlp.up_proj.weight/codes"]
    n_out, n_in = 6912, 2560  # the logical shape, from meta/tensors.json (or meta/config.json)
    codes = ((b[:, None] // 3 ** np.arange(5)) % 3 - 1).reshape(-1)[: n_out * n_in].reshape(n_out, n_in)
    w = codes.astype(np.float32) * z["tensor/model.layers.0.mlp.up_proj.weight/multiplier"][0]

Dense projections (bf16 master weights of the HF "online" layout) stay dense `data` arrays, bit-exact: the
`.npz` then round-trips a training checkpoint. Ternarize them first (the HF reader's `ternarize_master`) to get
the 1.6-bit file.

Why base-3 and why uncompressed (measured on a random 6912x2560 ternary matrix, 17.7 M weights, numpy 2.4,
best of 7 on a shared 2-core x86 VM; the two codes distributions were uniform and 50 % zeros):

| packing                         | bits/weight | pack     | unpack   | savez_compressed b/w (uniform / 50 % zeros) | np.load (savez / compressed) |
|---------------------------------|-------------|----------|----------|---------------------------------------------|------------------------------|
| 2-bit, HF block layout (hf2bit) | 2.000       | 18-25 ms | 12-16 ms | 1.610 / 1.531                               | 1.6 ms / 22-34 ms            |
| 2-bit, flat, 4 per byte         | 2.000       | 13-19 ms | 7-14 ms  | 1.610 / 1.531                               | 1.6 ms / 21-29 ms            |
| base-3, 5 per byte (chosen)     | 1.600       | 10-14 ms | 11-12 ms | 1.591 / 1.510                               | 1.3 ms / 17-28 ms            |

Base-3 is 20 % smaller at the same speed (both ~1.5 G weights/s). Deflate wins at most 0.09 bit on base-3
bytes and costs 15-30 ms of inflating per matrix, so members are stored (np.savez), not compressed. For 2B4T
(2.08 G ternary weights) the projections take 417 MB instead of 521 MB; with the bf16 embedding (657 MB) the
whole file is about 1.07 GB against 1.18 GB for the HF packed safetensors. Measured on a synthetic checkpoint of
2B4T's shapes (30 layers, vocab 128256): 1,074.6 MB file, written in ~9 s beyond producing the tensors, every
tensor read back in 4.2 s, `read()` (all headers) 54 ms, peak RSS 690 MB: the bf16 embedding (657 MB) is the
largest thing ever in memory. The tiny test model (1.18 M ternary weights) costs 1.68 bits per ternary weight
with every zip/npy header charged to them.
"""

from __future__ import annotations

import contextlib
import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from ..atomic import atomic_path
from ..checkpoint import (
    DENSE,
    TERNARY,
    Checkpoint,
    TensorEntry,
    Ternary,
    dense_entry,
    ternary_entry,
)
from ..codecs import trits
from ..errors import ConvertError, CorruptData
from ..integrity import TensorHasher, provenance_record, reader_provenance
from ..prefetch import prefetch
from ..progress import progress_bar
from ..validate import check_tensors

NAME = "npz"
FORMAT_ID = "bitnet-convert-npz"
FORMAT_VERSION = 1
TERNARY_PACKING = "base3-5"

FORMAT_KEY = "meta/format.json"
CONFIG_KEY = "meta/config.json"
INDEX_KEY = "meta/tensors.json"
PROVENANCE_KEY = "meta/provenance.json"
TOKENIZER_PREFIX = "tokenizer/"
TENSOR_PREFIX = "tensor/"

BF16 = np.dtype(ml_dtypes.bfloat16)
# Dense dtype name in the index -> (dtype in memory, dtype on disk). npy has no bfloat16 without pickling.
DENSE_DTYPES: dict[str, tuple[np.dtype, np.dtype]] = {
    "bfloat16": (BF16, np.dtype("<u2")),
    "float16": (np.dtype("<f2"), np.dtype("<f2")),
    "float32": (np.dtype("<f4"), np.dtype("<f4")),
}
_MULTIPLIER_DTYPE = np.dtype("<f4")

# Deterministic members: same checkpoint, same bytes (zip stores a timestamp per member otherwise).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def codes_key(name: str) -> str:
    return f"{TENSOR_PREFIX}{name}/codes"


def multiplier_key(name: str) -> str:
    return f"{TENSOR_PREFIX}{name}/multiplier"


def data_key(name: str) -> str:
    return f"{TENSOR_PREFIX}{name}/data"


def _member(key: str) -> str:
    return key + ".npy"


# --------------------------------------------------------------------------------------------------- write


def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True) -> Path:
    """Write `ckpt` to the single file `out`, one tensor in memory at a time; returns the path."""
    check_tensors(ckpt, str(ckpt.provenance.get("source") or "checkpoint"))
    index = []
    total = sum(entry.nbytes_hint for entry in ckpt)
    with atomic_path(out, force=force) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, progress_bar(
            total, f"npz {Path(out).name}", quiet
        ) as bar, contextlib.closing(TensorHasher(background=True)) as hasher:
            format_record = {"format": FORMAT_ID, "version": FORMAT_VERSION, "ternary_packing": TERNARY_PACKING}
            _write_json(zf, FORMAT_KEY, format_record)
            _write_json(zf, CONFIG_KEY, ckpt.config)
            for fname, data in ckpt.tokenizer_files.items():
                _write_array(zf, TOKENIZER_PREFIX + fname, np.frombuffer(bytes(data), np.uint8))

            # Each tensor's arrays are made on a second core while the previous ones are written (prefetch.py).
            stored_arrays = ((entry, key, stored) for entry in ckpt for key, stored in _stored_arrays(entry, out, index))
            previous = None
            for entry, key, stored in prefetch(stored_arrays):
                if previous is not None and entry is not previous:
                    bar.update(previous.nbytes_hint)
                previous = entry
                _write_array(zf, key, stored)
                hasher.add(key, stored)
            if previous is not None:
                bar.update(previous.nbytes_hint)
            _write_json(zf, INDEX_KEY, index)
            record = provenance_record(
                ckpt.provenance, hasher.hexdigest(), NAME, format_version=FORMAT_VERSION, ternary_packing=TERNARY_PACKING
            )
            _write_json(zf, PROVENANCE_KEY, record)
    return Path(out)


def _stored_arrays(entry: TensorEntry, out, index: list) -> Iterator[tuple[str, np.ndarray]]:
    """Load one tensor and yield the arrays that store it; appends its index record."""
    where = f"{out}: tensor {entry.name}"
    source = entry.load_packed() if entry.kind == TERNARY and entry.load_packed is not None else None
    if source is not None and source.layout == "hf2bit" and len(entry.shape) == 2:
        # HF packed bytes straight to base-3: no int8 codes (4x the packed size) are ever made.
        if not np.isfinite(source.multiplier):
            raise ConvertError(f"{where}: multiplier is {source.multiplier}")
        packed = source.transcode(trits.from_hf2bit, entry.shape[0])
        if packed.size != trits.packed_size(math.prod(entry.shape)):
            raise ConvertError(f"{where}: packed codes do not hold shape {list(entry.shape)}")
        index.append({"name": entry.name, "kind": TERNARY, "shape": list(entry.shape), "dtype": None})
        yield codes_key(entry.name), packed
        yield multiplier_key(entry.name), np.array([source.multiplier], _MULTIPLIER_DTYPE)
        return
    value = entry.load()
    if entry.kind == TERNARY:
        if not isinstance(value, Ternary):
            raise ConvertError(f"{where}: expected ternary codes and a multiplier, got {type(value).__name__}")
        if value.shape != entry.shape:
            raise ConvertError(f"{where}: codes have shape {list(value.shape)}, expected {list(entry.shape)}")
        if not np.isfinite(value.multiplier):
            raise ConvertError(f"{where}: multiplier is {value.multiplier}")
        try:
            packed = trits.pack(value.codes)
        except ValueError as exc:
            raise ConvertError(f"{where}: {exc}") from None
        index.append({"name": entry.name, "kind": TERNARY, "shape": list(entry.shape), "dtype": None})
        yield codes_key(entry.name), packed
        yield multiplier_key(entry.name), np.array([value.multiplier], _MULTIPLIER_DTYPE)
        return
    if isinstance(value, Ternary):
        raise ConvertError(f"{where}: expected a plain array, got ternary codes")
    array = np.asarray(value)
    if array.shape != entry.shape:
        raise ConvertError(f"{where}: has shape {list(array.shape)}, expected {list(entry.shape)}")
    dtype_name = next((n for n, (mem, _) in DENSE_DTYPES.items() if array.dtype == mem), None)
    if dtype_name is None:
        raise ConvertError(f"{where}: dtype {array.dtype} cannot be stored (npz keeps {', '.join(DENSE_DTYPES)})")
    index.append({"name": entry.name, "kind": DENSE, "shape": list(entry.shape), "dtype": dtype_name})
    yield data_key(entry.name), np.ascontiguousarray(array).view(DENSE_DTYPES[dtype_name][1])


def _write_array(zf: zipfile.ZipFile, key: str, array: np.ndarray) -> None:
    info = zipfile.ZipInfo(_member(key), date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16  # rw-r--r-- when someone unzips it
    # The member's size is unknown until written: zip64 headers up front keep members > 2 GiB legal.
    array = np.ascontiguousarray(array)
    with zf.open(info, "w", force_zip64=True) as fh:
        # The header np.save writes, then the data in one piece: write_array would copy a zip member's data
        # through 16 MiB tobytes() chunks first (an extra pass over the whole model).
        np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(array))
        fh.write(memoryview(array).cast("B"))


def _write_json(zf: zipfile.ZipFile, key: str, value) -> None:
    _write_array(zf, key, np.frombuffer(json.dumps(value, indent=1).encode(), np.uint8))


# ---------------------------------------------------------------------------------------------------- read


def detect(path) -> bool:
    """An existing file named *.npz, or any zip holding our `meta/format.json`."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".npz":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            return _member(FORMAT_KEY) in zf.NameToInfo
    except (zipfile.BadZipFile, OSError):
        return False


def read(path: str, *, revision: str | None = None) -> Checkpoint:
    """Open `path` lazily: headers and metadata are read now, each tensor's data on its `load()`."""
    if revision is not None:
        raise ConvertError(f"{path}: --revision applies to Hugging Face hub sources only")
    path = Path(path)
    with _open_zip(path) as zf:
        headers = _member_headers(path, zf)
        if FORMAT_KEY not in headers:
            raise ConvertError(f"{path}: not a bitnet-convert .npz (it has no {FORMAT_KEY} member)")
        fmt = _read_json(path, zf, headers, FORMAT_KEY)
        if not isinstance(fmt, dict) or fmt.get("format") != FORMAT_ID:
            raise ConvertError(f"{path}: {FORMAT_KEY} does not name the {FORMAT_ID} format")
        if fmt.get("version") != FORMAT_VERSION or fmt.get("ternary_packing") != TERNARY_PACKING:
            raise ConvertError(
                f"{path}: npz format version {fmt.get('version')!r} / packing {fmt.get('ternary_packing')!r} "
                f"is not one this bitnet-convert reads (version {FORMAT_VERSION}, {TERNARY_PACKING})"
            )
        config = _read_json(path, zf, headers, CONFIG_KEY)
        index = _read_json(path, zf, headers, INDEX_KEY)
        tokenizer_files = {
            key[len(TOKENIZER_PREFIX):]: bytes(_read_bytes(path, zf, headers, key))
            for key in headers
            if key.startswith(TOKENIZER_PREFIX)
        }
        recorded = _read_json(path, zf, headers, PROVENANCE_KEY) if PROVENANCE_KEY in headers else None
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: {CONFIG_KEY} is not a JSON object")
    tensors = _entries(path, index, headers)
    provenance = reader_provenance(NAME, path, recorded, source=str(path.resolve()))
    ckpt = Checkpoint(config, tensors, tokenizer_files, provenance)
    check_tensors(ckpt, str(path))
    return ckpt


def _entries(path: Path, index, headers: dict) -> dict[str, TensorEntry]:
    """Check every index record against the member headers and build a lazy entry for it."""
    if not isinstance(index, list):
        raise ConvertError(f"{path}: {INDEX_KEY} is not a JSON list")
    tensors: dict[str, TensorEntry] = {}
    claimed: set[str] = set()
    for record in index:
        try:
            name, kind, shape, dtype_name = record["name"], record["kind"], tuple(record["shape"]), record["dtype"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: malformed record in {INDEX_KEY}: {record!r}") from None
        if name in tensors:
            raise ConvertError(f"{path}: tensor {name} is listed twice in {INDEX_KEY}")
        if kind == TERNARY:
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            _expect(path, headers, codes_key(name), (trits.packed_size(count),), np.dtype(np.uint8))
            _expect(path, headers, multiplier_key(name), (1,), _MULTIPLIER_DTYPE)
            claimed.update((codes_key(name), multiplier_key(name)))
            tensors[name] = ternary_entry(name, shape, _ternary_loader(path, name, shape))
        elif kind == DENSE:
            if dtype_name not in DENSE_DTYPES:
                raise ConvertError(f"{path}: tensor {name} has unknown dtype {dtype_name!r} in {INDEX_KEY}")
            memory, stored = DENSE_DTYPES[dtype_name]
            _expect(path, headers, data_key(name), shape, stored)
            claimed.add(data_key(name))
            tensors[name] = dense_entry(name, shape, memory, _dense_loader(path, name, memory))
        else:
            raise ConvertError(f"{path}: tensor {name} has unknown kind {kind!r} in {INDEX_KEY}")
    stray = [key for key in headers if key.startswith(TENSOR_PREFIX) and key not in claimed]
    if stray:
        raise ConvertError(f"{path}: member {stray[0]} is not listed in {INDEX_KEY}")
    return tensors


def _expect(path: Path, headers: dict, key: str, shape: tuple, dtype: np.dtype) -> None:
    if key not in headers:
        raise ConvertError(f"{path}: missing member {key}")
    got_shape, got_dtype = headers[key]
    if got_shape != tuple(shape) or got_dtype != dtype:
        raise ConvertError(
            f"{path}: member {key} is {got_dtype} {list(got_shape)}, expected {dtype} {list(shape)}"
        )


def _ternary_loader(path: Path, name: str, shape: tuple):
    def load() -> Ternary:
        with _open_zip(path) as zf:
            packed = _read_array(path, zf, codes_key(name))
            multiplier = _read_array(path, zf, multiplier_key(name))[0]
        if not (np.isfinite(multiplier) and multiplier > 0):
            raise CorruptData(f"{path}: tensor {name} has the multiplier {multiplier} (expected a finite positive number)")
        try:
            codes = trits.unpack(packed, shape)
        except CorruptData as exc:
            raise CorruptData(f"{path}: tensor {name}: {exc}") from None
        return Ternary(codes, multiplier)

    return load


def _dense_loader(path: Path, name: str, memory_dtype: np.dtype):
    def load() -> np.ndarray:
        with _open_zip(path) as zf:
            return _read_array(path, zf, data_key(name)).view(memory_dtype)

    return load


# ------------------------------------------------------------------------------------- stored bytes, provenance


def stored_tensor_bytes(path) -> Iterator[tuple[str, memoryview]]:
    """Every `tensor/...` member's array bytes, keyed without `.npy`, in file order (what the hash covers)."""
    path = Path(path)
    with _open_zip(path) as zf:
        keys = [info.filename[: -len(".npy")] for info in zf.infolist() if info.filename.startswith(TENSOR_PREFIX)]
        for key in keys:
            yield key, memoryview(np.ascontiguousarray(_read_array(path, zf, key))).cast("B")


def recorded_provenance(path) -> dict | None:
    """The provenance record stored at write time; None for an .npz that did not come from bitnet-convert."""
    path = Path(path)
    with _open_zip(path) as zf:
        if _member(PROVENANCE_KEY) not in zf.NameToInfo:
            return None
        raw = bytes(_read_array(path, zf, PROVENANCE_KEY))
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: member {PROVENANCE_KEY} is not valid JSON: {exc}") from None
    return record if isinstance(record, dict) else None


# -------------------------------------------------------------------------------------------- zip plumbing


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ConvertError(f"{path}: not a zip archive, or truncated (an .npz is a zip of .npy members)") from None
    except OSError as exc:
        raise ConvertError(f"{path}: cannot open: {exc.strerror or exc}") from None


def _member_headers(path: Path, zf: zipfile.ZipFile) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of every member, from the .npy headers only (no array data is read)."""
    headers = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise ConvertError(f"{path}: unexpected member {info.filename} (an .npz holds only .npy members)")
        key = info.filename[: -len(".npy")]
        try:
            with zf.open(info) as fh:
                headers[key] = _npy_header(path, info, key, fh)
        except zipfile.BadZipFile as exc:  # zipfile reads small members whole: a CRC mismatch shows up here
            raise CorruptData(f"{path}: member {key} is damaged: {exc}") from None
        except (ValueError, EOFError, OSError) as exc:
            raise ConvertError(f"{path}: member {key} is not a valid .npy array: {exc}") from None
    return headers


# deflate expands data at most ~1032 times: bounds what a compressed member can claim to hold
_MAX_DEFLATE_RATIO = 1032


def _npy_header(path: Path, info: zipfile.ZipInfo, key: str, fh) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the .npy header at the start of `fh`, checked before anything is allocated.

    Object dtypes are refused: such a member holds a pickle, and we never unpickle. So is a shape that needs
    other than exactly the member's bytes: numpy would allocate the whole declared array before reading it.
    """
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"npy format version {version} is not written by numpy's savez")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = read_header(fh)
    except (zipfile.BadZipFile, EOFError, OSError):
        raise  # damaged or short member: the callers say so
    except Exception as exc:  # noqa: BLE001 - numpy parses the header with literal_eval: Syntax/Token/Type errors
        raise ConvertError(f"{path}: member {key} has a corrupt .npy header ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise ConvertError(f"{path}: member {key} holds a pickled object array (refused: never unpickled)")
    if fortran and len(shape) > 1:
        raise ConvertError(f"{path}: member {key} is stored in Fortran order (bitnet-convert writes C order)")
    needed = fh.tell() + math.prod(shape) * dtype.itemsize
    if needed != info.file_size:
        raise ConvertError(f"{path}: member {key} declares {needed} bytes in its .npy header but holds "
                           f"{info.file_size} (corrupt or truncated)")
    limit = path.stat().st_size * (1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO)
    if info.file_size > limit:
        raise ConvertError(f"{path}: member {key} claims {info.file_size} bytes, more than the archive can hold")
    return tuple(shape), dtype


def _read_array(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """One member's array (read-only), its header checked as in `_member_headers`; pickles refused."""
    try:
        info = zf.getinfo(_member(key))
    except KeyError:
        raise ConvertError(f"{path}: missing member {key}") from None
    try:
        with zf.open(info) as fh:
            shape, dtype = _npy_header(path, info, key, fh)
            nbytes = math.prod(shape) * dtype.itemsize
            data = fh.read(nbytes)  # reading to the member's end makes zipfile check its CRC
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
        # BadZipFile here is a CRC mismatch or a short member: the bytes on disk are damaged.
        raise CorruptData(f"{path}: member {key} cannot be read: {exc}") from None
    if len(data) != nbytes:
        raise CorruptData(f"{path}: member {key} holds {len(data)} of its {nbytes} bytes (truncated)")
    return np.frombuffer(data, dtype).reshape(shape)


def _read_bytes(path: Path, zf: zipfile.ZipFile, headers: dict, key: str) -> np.ndarray:
    if key not in headers:
        raise ConvertError(f"{path}: missing member {key}")
    shape, dtype = headers[key]
    if dtype != np.uint8 or len(shape) != 1:
        raise ConvertError(f"{path}: member {key} should be a uint8 byte array, is {dtype} {list(shape)}")
    return _read_array(path, zf, key)


def _read_json(path: Path, zf: zipfile.ZipFile, headers: dict, key: str):
    raw = _read_bytes(path, zf, headers, key)
    try:
        return json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: member {key} is not valid JSON: {exc}") from None


__all__ = ["NAME", "detect", "read", "write", "stored_tensor_bytes", "recorded_provenance"]
