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
`content_hash` is `sha256-model-v2` (docs/formats.md §9) over every member but the provenance record: the
`tensor/...` members (key without `.npy`, npy dtype, shape, array bytes) in file order, the `tokenizer/...`
members and the `meta/...` ones. Byte arrays decode with `bytes(z["meta/config.json"])`.

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

Why base-3 and why uncompressed: base-3 is 20 % smaller than 2-bit packing at the same speed, and deflate wins
under 0.1 bit per weight on base-3 bytes while costing tens of ms of inflating per matrix, so members are stored,
not compressed (BENCHMARKS.md, design measurements). For 2B4T (2.08 G ternary weights) the projections take
417 MB instead of 521 MB; with the bf16 embedding the file is about 1.07 GB against 1.18 GB for the HF packed
safetensors, and the embedding is the largest thing ever in memory while reading or writing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from bitnet_convert.fileio.atomic import atomic_path, replacing_outputs_of
from bitnet_convert.fileio.integrity import (
    ModelHasher,
    StoredModel,
    TensorBytes,
    provenance_record,
    reader_provenance,
)
from bitnet_convert.fileio.direct import DirectFile
from bitnet_convert.fileio.prefetch import prefetch
from bitnet_convert.fileio.progress import progress_bar
from bitnet_convert.fileio.sources import SourceWatch, parse_json, shown
from bitnet_convert.formats import tokenizer_files
from bitnet_convert.formats.folder import carried_tokenizer_files, is_tokenizer_file, read_from, warn_not_carried
from bitnet_core.checkpoint import (
    DENSE,
    TERNARY,
    Checkpoint,
    RowBlocks,
    TensorEntry,
    Ternary,
    dense_entry,
    row_blocks,
    ternary_entry,
)
from bitnet_core.codecs import trits
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_core.quantize import check_multiplier, projection_bytes
from bitnet_core.validate import check_tensors

NAME = "npz"
FORMAT_ID = "bitnet-convert-npz"
FORMAT_VERSION = 1
TERNARY_PACKING = "base3-5"

log = logging.getLogger("bitnet_convert")
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


WRITER_OPTIONS = {}  # nothing to choose: one layout


def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True) -> Path:
    """Write `ckpt` to the single file `out`, one tensor in memory at a time; returns the path."""
    where = read_from(ckpt)  # the file read, not the model it first came from: what the user gave
    check_tensors(ckpt, where)
    index = []
    total = sum(entry.nbytes_hint for entry in ckpt)
    with replacing_outputs_of(NAME, recorded_provenance), atomic_path(out, force=force) as tmp:
        # The content hash covers every member but the provenance record (stored_tensor_bytes).
        with DirectFile(tmp) as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, progress_bar(
            total, f"npz {Path(out).name}", quiet
        ) as bar, contextlib.closing(ModelHasher(background=True)) as hasher:
            format_record = {"format": FORMAT_ID, "version": FORMAT_VERSION, "ternary_packing": TERNARY_PACKING}
            hasher.add_config(FORMAT_KEY, _write_json(zf, FORMAT_KEY, format_record))
            hasher.add_config(CONFIG_KEY, _write_json(zf, CONFIG_KEY, ckpt.config))
            for fname, data in carried_tokenizer_files(ckpt.tokenizer_files, read_from(ckpt)).items():
                _write_array(zf, TOKENIZER_PREFIX + fname, np.frombuffer(bytes(data), np.uint8))
                hasher.add_tokenizer_file(fname, data)

            # Each tensor's arrays are made on a second core while the previous ones are written (prefetch.py).
            # A RowBlocks (an embedding) comes as its member's header, then its blocks: (key, dtype, shape, None),
            # then (key, None, None, block)s.
            pieces = ((entry, *piece) for entry in ckpt for piece in _member_pieces(_stored_arrays(entry, out, index)))
            previous, member = None, None
            try:
                with prefetch(pieces) as made:
                    for entry, key, dtype, shape, data in made:
                        if previous is not None and entry is not previous:
                            bar.update(previous.nbytes_hint)
                        previous = entry
                        if dtype is not None:  # a member starts
                            if member is not None:
                                member.close()
                            member = _open_member(zf, key, dtype, shape)
                            hasher.begin(key, _npy_descr(dtype), shape, int(np.prod(shape)) * dtype.itemsize)
                        if data is not None:
                            member.write(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
                            hasher.update(data)
            finally:  # zipfile refuses to close the archive while a member is open (a failure above)
                if member is not None:
                    member.close()
            if previous is not None:
                bar.update(previous.nbytes_hint)
            hasher.add_config(INDEX_KEY, _write_json(zf, INDEX_KEY, index))
            record = provenance_record(
                ckpt.provenance, hasher.hexdigest(), NAME, format_version=FORMAT_VERSION, ternary_packing=TERNARY_PACKING
            )
            _write_json(zf, PROVENANCE_KEY, record)
    return Path(out)


def _stored_arrays(entry: TensorEntry, out, index: list) -> Iterator[tuple[str, np.ndarray]]:
    """Load one tensor and yield the arrays that store it; appends its index record."""
    where = f"{out}: tensor {entry.name}"
    if entry.kind == TERNARY:  # HF packed bytes go straight to base-3: no int8 codes (4x the packed size)
        packed, multiplier = projection_bytes(entry, trits.from_hf2bit, trits.pack, str(out))
        if packed.size != trits.packed_size(math.prod(entry.shape)):
            raise ConvertError(f"{where}: packed codes do not hold shape {list(entry.shape)}")
        index.append({"name": entry.name, "kind": TERNARY, "shape": list(entry.shape), "dtype": None})
        yield codes_key(entry.name), packed
        yield multiplier_key(entry.name), np.array([multiplier], _MULTIPLIER_DTYPE)
        return
    blocks = row_blocks(entry)  # an embedding a block of rows at a time, where the source offers it
    if blocks is not None:
        dtype_name = _dtype_name(blocks.dtype, where)
        index.append({"name": entry.name, "kind": DENSE, "shape": list(entry.shape), "dtype": dtype_name})
        yield data_key(entry.name), RowBlocks(np.dtype(DENSE_DTYPES[dtype_name][1]), blocks.shape, blocks.blocks)
        return
    value = entry.load()
    if isinstance(value, Ternary):
        raise ConvertError(f"{where}: expected a plain array, got ternary codes")
    array = np.asarray(value)
    if array.shape != entry.shape:
        raise ConvertError(f"{where}: has shape {list(array.shape)}, expected {list(entry.shape)}")
    dtype_name = _dtype_name(array.dtype, where)
    index.append({"name": entry.name, "kind": DENSE, "shape": list(entry.shape), "dtype": dtype_name})
    yield data_key(entry.name), np.ascontiguousarray(array).view(DENSE_DTYPES[dtype_name][1])


def _dtype_name(dtype: np.dtype, where: str) -> str:
    """The npz index's name of a dense dtype (DENSE_DTYPES), or ConvertError."""
    name = next((n for n, (mem, _) in DENSE_DTYPES.items() if dtype == mem), None)
    if name is None:
        raise ConvertError(f"{where}: dtype {dtype} cannot be stored (npz keeps {', '.join(DENSE_DTYPES)})")
    return name


def _member_pieces(arrays) -> Iterator[tuple]:
    """(key, dtype, shape, data) for each stored array: a whole array opens its member and carries its data; a
    RowBlocks opens it, then each block follows as (key, None, None, block)."""
    for key, stored in arrays:
        if not isinstance(stored, RowBlocks):
            yield key, stored.dtype, stored.shape, stored
            continue
        yield key, stored.dtype, stored.shape, None
        rows = 0
        for block in stored.blocks:
            rows += len(block)
            yield key, None, None, np.ascontiguousarray(block).view(stored.dtype)
        if rows != stored.shape[0]:
            raise ConvertError(f"{key}: produced {rows} rows of {stored.shape[0]}")


def _write_array(zf: zipfile.ZipFile, key: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    with _open_member(zf, key, array.dtype, array.shape) as fh:
        fh.write(memoryview(array.reshape(-1).view(np.uint8)))


def _open_member(zf: zipfile.ZipFile, key: str, dtype: np.dtype, shape: tuple):
    """A member `key` open for its array's bytes, the .npy header np.save writes already in it. The data then
    goes in as it comes (write_array would copy it through 16 MiB tobytes() chunks first, an extra pass)."""
    info = zipfile.ZipInfo(_member(key), date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16  # rw-r--r-- when someone unzips it
    # The member's size is unknown until written: zip64 headers up front keep members > 2 GiB legal.
    fh = zf.open(info, "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(fh, header)
    return fh


def _write_json(zf: zipfile.ZipFile, key: str, value) -> bytes:
    """Store `value` as a JSON member; returns the bytes stored (what the content hash covers)."""
    encoded = json.dumps(value, indent=1).encode()
    _write_array(zf, key, np.frombuffer(encoded, np.uint8))
    return encoded


def _npy_descr(dtype: np.dtype) -> str:
    """A member's dtype as its .npy header names it ("<u2", "|u1", "<f4"): what the content hash records."""
    return np.lib.format.dtype_to_descr(np.dtype(dtype))


# ---------------------------------------------------------------------------------------------------- read


def detect(path) -> bool:
    """An existing file named *.npz, or any zip holding our `meta/format.json`."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.exists():  # a FIFO named m.npz is refused by the reader, by name
        return True
    if not path.is_file():
        return False
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
    watch = SourceWatch()  # the archive, held open for the whole run and checked again after each tensor load
    zf = _open_zip(path, watch)
    headers = _member_headers(path, zf)
    if FORMAT_KEY not in headers:
        raise ConvertError(f"{path}: not a bitnet-convert .npz (it has no {FORMAT_KEY} member)")
    fmt = _read_json(path, zf, headers, FORMAT_KEY, watch)
    if not isinstance(fmt, dict) or fmt.get("format") != FORMAT_ID:
        raise ConvertError(f"{path}: {FORMAT_KEY} does not name the {FORMAT_ID} format")
    if fmt.get("version") != FORMAT_VERSION or fmt.get("ternary_packing") != TERNARY_PACKING:
        raise ConvertError(
            f"{path}: npz format version {fmt.get('version')!r} / packing {fmt.get('ternary_packing')!r} "
            f"is not one this bitnet-convert reads (version {FORMAT_VERSION}, {TERNARY_PACKING})"
        )
    config = _read_json(path, zf, headers, CONFIG_KEY, watch)
    index = _read_json(path, zf, headers, INDEX_KEY, watch)
    # Only the known tokenizer files are read; any other tokenizer/ member (a stray, `tokenizer/../../x`) stays
    # behind unread, named in a warning: no member name ever becomes a path, so nothing can escape.
    members = [key for key in headers if key.startswith(TOKENIZER_PREFIX)]
    tokenizer = {key[len(TOKENIZER_PREFIX):]: bytes(_read_bytes(path, zf, headers, key, watch))
                 for key in members if is_tokenizer_file(key[len(TOKENIZER_PREFIX):])}
    warn_not_carried(path, [key for key in members if not is_tokenizer_file(key[len(TOKENIZER_PREFIX):])])
    foreign = [key for key in headers if not key.startswith((TOKENIZER_PREFIX, TENSOR_PREFIX)) and key not in
               (FORMAT_KEY, CONFIG_KEY, INDEX_KEY, PROVENANCE_KEY)]
    if foreign:  # a newer version's record, or anything else: never read, never carried
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        log.warning("%s: members that are no part of this format, ignored: %s%s", shown(path),
                    ", ".join(map(shown, foreign[:8])), more)
    tokenizer_files.check(tokenizer, lambda name: f"{path}: member {TOKENIZER_PREFIX}{name}")
    recorded = _read_json(path, zf, headers, PROVENANCE_KEY, watch) if PROVENANCE_KEY in headers else None
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: {CONFIG_KEY} is not a JSON object")
    tensors = watch.guard(_entries(path, zf, index, headers))
    provenance = reader_provenance(NAME, path, recorded, source=str(path.resolve()))
    ckpt = Checkpoint(config, tensors, tokenizer, provenance)
    check_tensors(ckpt, str(path))
    return ckpt


def _index_record(path: Path, record) -> tuple[str, str, tuple[int, ...], str | None]:
    """(name, kind, shape, dtype) of one meta/tensors.json record, each of the JSON type it must have."""
    fields = (record.get("name"), record.get("kind"), record.get("shape"), record.get("dtype")) \
        if isinstance(record, dict) else (None,) * 4
    name, kind, shape, dtype_name = fields
    well_formed = (isinstance(name, str) and isinstance(kind, str) and isinstance(dtype_name, (str, type(None)))
                   and isinstance(shape, list)
                   and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape))
    if not well_formed:
        raise ConvertError(f"{path}: malformed record in {INDEX_KEY}: {str(record)[:80]}")
    return name, kind, tuple(shape), dtype_name


def _entries(path: Path, zf: zipfile.ZipFile, index, headers: dict) -> dict[str, TensorEntry]:
    """Check every index record against the member headers and build a lazy entry for it."""
    if not isinstance(index, list):
        raise ConvertError(f"{path}: {INDEX_KEY} is not a JSON list")
    tensors: dict[str, TensorEntry] = {}
    claimed: set[str] = set()
    for record in index:
        name, kind, shape, dtype_name = _index_record(path, record)
        if name in tensors:
            raise ConvertError(f"{path}: tensor {name} is listed twice in {INDEX_KEY}")
        if kind == TERNARY:
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            _expect(path, headers, codes_key(name), (trits.packed_size(count),), np.dtype(np.uint8))
            _expect(path, headers, multiplier_key(name), (1,), _MULTIPLIER_DTYPE)
            claimed.update((codes_key(name), multiplier_key(name)))
            tensors[name] = ternary_entry(name, shape, _ternary_loader(path, zf, name, shape))
        elif kind == DENSE:
            if dtype_name not in DENSE_DTYPES:
                raise ConvertError(f"{path}: tensor {name} has unknown dtype {dtype_name!r} in {INDEX_KEY}")
            memory, stored = DENSE_DTYPES[dtype_name]
            _expect(path, headers, data_key(name), shape, stored)
            claimed.add(data_key(name))
            tensors[name] = dense_entry(name, shape, memory, _dense_loader(path, zf, name, memory))
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


def _ternary_loader(path: Path, zf: zipfile.ZipFile, name: str, shape: tuple):
    def load() -> Ternary:
        packed = _read_array(path, zf, codes_key(name))
        multiplier = check_multiplier(_read_array(path, zf, multiplier_key(name))[0], f"{path}: tensor {name}")
        try:
            codes = trits.unpack(packed, shape)
        except CorruptData as exc:
            raise CorruptData(f"{path}: tensor {name}: {exc}") from None
        return Ternary(codes, multiplier)

    return load


def _dense_loader(path: Path, zf: zipfile.ZipFile, name: str, memory_dtype: np.dtype):
    def load() -> np.ndarray:
        return _read_array(path, zf, data_key(name)).view(memory_dtype)

    return load


# ------------------------------------------------------------------------------------- stored bytes, provenance


def stored_tensor_bytes(path) -> StoredModel:
    """What the content hash covers: every member but the provenance record, keyed without `.npy`. The
    `tensor/...` members are the tensors (npy dtype, shape, array bytes) in file order, the `tokenizer/...`
    members the tokenizer files, every other member (meta/format, config, tensors.json) a config document."""
    path = Path(path)
    with _open_zip(path) as zf:
        headers = _member_headers(path, zf)  # in file order
        side = {key: _read_array(path, zf, key).tobytes() for key in headers
                if not key.startswith(TENSOR_PREFIX) and key != PROVENANCE_KEY}

    def tensors() -> Iterator[TensorBytes]:
        with _open_zip(path) as zf:
            for key, (shape, dtype) in headers.items():
                if key.startswith(TENSOR_PREFIX):
                    data = memoryview(np.ascontiguousarray(_read_array(path, zf, key))).cast("B")
                    yield TensorBytes(key, _npy_descr(dtype), shape, data)

    tokenizer = {key[len(TOKENIZER_PREFIX):]: data for key, data in side.items() if key.startswith(TOKENIZER_PREFIX)}
    config = {key: data for key, data in side.items() if not key.startswith(TOKENIZER_PREFIX)}
    return StoredModel(tensors, config, tokenizer)


def recorded_provenance(path) -> dict | None:
    """The provenance record stored at write time; None for an .npz that did not come from bitnet-convert."""
    path = Path(path)
    with _open_zip(path) as zf:
        if _member(PROVENANCE_KEY) not in zf.NameToInfo:
            return None
        raw = bytes(_read_array(path, zf, PROVENANCE_KEY))
    record = parse_json(raw, shown(path), f"member {PROVENANCE_KEY}", non_finite=True)
    return record if isinstance(record, dict) else None


# -------------------------------------------------------------------------------------------- zip plumbing


def _open_zip(path: Path, watch: SourceWatch | None = None) -> zipfile.ZipFile:
    """The archive, read through a descriptor held by `watch` (or one of its own): never a FIFO or a device."""
    held = (watch or SourceWatch()).hold(path)
    try:
        return zipfile.ZipFile(os.fdopen(os.dup(held.fd), "rb"))  # preads of `held` never move the shared offset
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
        if info.flag_bits & _ENCRYPTED:
            raise ConvertError(f"{path}: member {info.filename} is encrypted (numpy writes none; never read)")
        if info.compress_type not in _COMPRESSIONS:
            raise ConvertError(f"{path}: member {info.filename} uses zip compression method {info.compress_type}, "
                               f"which zipfile cannot read (stored, deflate, bzip2 and lzma are read)")
        key = info.filename[: -len(".npy")]
        try:
            with zf.open(info) as fh:
                headers[key] = _npy_header(path, info, key, fh, _archive_size(zf))
        except zipfile.BadZipFile as exc:  # zipfile reads small members whole: a CRC mismatch shows up here
            raise CorruptData(f"{path}: member {key} is damaged: {exc}") from None
        except (ValueError, EOFError, OSError) as exc:
            raise ConvertError(f"{path}: member {key} is not a valid .npy array: {exc}") from None
    return headers


_ENCRYPTED = 0x1  # zip general purpose flag bit 0
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)  # what zipfile reads

# deflate expands data at most ~1032 times: bounds what a compressed member can claim to hold
_MAX_DEFLATE_RATIO = 1032


def _archive_size(zf: zipfile.ZipFile) -> int:
    """The size of the archive as opened (its descriptor, not its path: that may name another file by now)."""
    return os.fstat(zf.fp.fileno()).st_size


def _npy_header(path: Path, info: zipfile.ZipInfo, key: str, fh, archive_size: int) -> tuple[tuple[int, ...], np.dtype]:
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
    limit = archive_size * (1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO)
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
            shape, dtype = _npy_header(path, info, key, fh, _archive_size(zf))
            nbytes = math.prod(shape) * dtype.itemsize
            data = fh.read(nbytes)  # reading to the member's end makes zipfile check its CRC
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
        # BadZipFile here is a CRC mismatch or a short member: the bytes on disk are damaged.
        raise CorruptData(f"{path}: member {key} cannot be read: {exc}") from None
    if len(data) != nbytes:
        raise CorruptData(f"{path}: member {key} holds {len(data)} of its {nbytes} bytes (truncated)")
    return np.frombuffer(data, dtype).reshape(shape)


def _read_bytes(path: Path, zf: zipfile.ZipFile, headers: dict, key: str, watch: SourceWatch) -> np.ndarray:
    """A side member (metadata, tokenizer file) whole, refused beyond the side-file limits before inflating."""
    if key not in headers:
        raise ConvertError(f"{path}: missing member {key}")
    shape, dtype = headers[key]
    if dtype != np.uint8 or len(shape) != 1:
        raise ConvertError(f"{path}: member {key} should be a uint8 byte array, is {dtype} {list(shape)}")
    what = "tokenizer file" if key.startswith(TOKENIZER_PREFIX) else "metadata member"
    watch.charge(shape[0], f"{path}: member {key}", what)
    return _read_array(path, zf, key)


def _read_json(path: Path, zf: zipfile.ZipFile, headers: dict, key: str, watch: SourceWatch):
    return parse_json(bytes(_read_bytes(path, zf, headers, key, watch)), str(path), f"member {key}",
                      non_finite=key == PROVENANCE_KEY)  # a record, only shown: NaN kept, printed as null


__all__ = ["NAME", "detect", "read", "write", "stored_tensor_bytes", "recorded_provenance"]
