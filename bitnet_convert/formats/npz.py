"""The packed-ternary `.npz`: one file that plain numpy reads, `np.load(path, allow_pickle=False)`.

An `.npz` is a zip archive of `.npy` members; `np.load` returns a lazy mapping that reads a member only when
it is indexed, so a consumer can pull one projection out of a 2B model without touching the rest.

Keys (zip member = key + ".npy"; all members stored uncompressed, written in this order)
-----------------------------------------------------------------------------------------
| key                            | dtype         | shape                  | content                                  |
|--------------------------------|---------------|------------------------|------------------------------------------|
| `meta/format.json`             | uint8         | [n]                    | UTF-8 JSON `{"format": "bitnet-convert-npz", "version": 1, "ternary_packing": "base3-5"}` |
| `meta/config.json`             | uint8         | [n]                    | the HF `config.json`, without `quantization_config` |
| `meta/metadata.json`           | uint8         | [n]                    | only when a user set keys (`--metadata`): JSON object |
| `tokenizer/<file name>`        | uint8         | [n]                    | each tokenizer file verbatim (tokenizer.json, tokenizer_config.json, ...) |
| `tensor/<hf name>/codes`       | uint8         | [ceil(out*in/5)]       | ternary projection, base-3 packed (below) |
| `tensor/<hf name>/multiplier`  | float32       | [1]                    | its multiplier: `W = codes * multiplier` (mean abs of the masters) |
| `tensor/<hf name>/data`        | float32 / float16 / uint16 | logical shape | any other tensor in its stored precision; bfloat16 is stored as its uint16 bit pattern |
| `meta/tensors.json`            | uint8         | [n]                    | UTF-8 JSON list, in file order, of `{"name", "kind", "shape", "dtype"}`, kind `"ternary"` or `"dense"`; `dtype` is `"bfloat16"`, `"float16"` or `"float32"` for dense tensors (the dtype record that turns uint16 bits back into bf16), null for ternary |
| `meta/provenance.json`         | uint8         | [n]                    | `integrity.provenance_record`: source, producer, `content_hash` |

Arrays are C order, little-endian. `<hf name>` is the Hugging Face tensor name, e.g. `tensor/model.layers.0.mlp.down_proj.weight/codes`.
`content_hash` is `blake3-model-v4` (docs/formats.md §9) over every member but the provenance record: the
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

import json
import logging
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from bitnet_convert.fileio import output
from bitnet_convert.fileio.integrity import (
    StoredModel,
    TensorBytes,
    reader_provenance,
)
from bitnet_convert.fileio.output import Output, Plan, PlannedTensor
from bitnet_convert.fileio.sources import SourceWatch, parse_json, shown
from bitnet_convert.formats import tokenizer_files
from bitnet_convert.formats.folder import carried_tokenizer_files, is_tokenizer_file, read_from, warn_not_carried
from bitnet_core.checkpoint import (
    DENSE,
    TERNARY,
    Checkpoint,
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
METADATA_KEY = "meta/metadata.json"  # the keys a user set (--metadata), when any
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
    """`plan` written to `out` by the output pipeline (fileio/output.py)."""
    return output.write(plan(ckpt), out, force=force, quiet=quiet)


def plan(ckpt: Checkpoint, *, metadata: dict | None = None) -> Plan:
    """The .npz of `ckpt`: its side members, one member per stored array (one tensor in memory at a time), the
    index, and the provenance record. The content hash covers every member but the record (stored_tensor_bytes)."""
    where = read_from(ckpt)  # the file read, not the model it first came from: what the user gave
    check_tensors(ckpt, where)
    # A tensor's errors name the file being written (set by the layout; a dry run names the source).
    naming = {"where": where}
    index, tensors = [], []
    for entry in ckpt:
        record, arrays = _stored_arrays(entry, naming)
        index.append(record)
        tensors += arrays
    format_record = {"format": FORMAT_ID, "version": FORMAT_VERSION, "ternary_packing": TERNARY_PACKING}
    documents = {FORMAT_KEY: _json(format_record), CONFIG_KEY: _json(ckpt.config), INDEX_KEY: _json(index)}
    if metadata:  # the keys a user set: a member of their own, which the content hash covers
        documents[METADATA_KEY] = _json(dict(metadata))
    tokenizer = {name: bytes(data) for name, data in carried_tokenizer_files(ckpt.tokenizer_files, where).items()}

    def layout(out: Output) -> None:
        naming["where"] = str(out.target)
        with out.open() as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_bytes(zf, FORMAT_KEY, documents[FORMAT_KEY])
            _write_bytes(zf, CONFIG_KEY, documents[CONFIG_KEY])
            if METADATA_KEY in documents:
                _write_bytes(zf, METADATA_KEY, documents[METADATA_KEY])
            for name, data in tokenizer.items():
                _write_bytes(zf, TOKENIZER_PREFIX + name, data)
            for tensor in tensors:
                dtype, shape = tensor.info
                with _open_member(zf, tensor.name, dtype, shape) as member:
                    out.write_tensor(member, tensor)
            _write_bytes(zf, INDEX_KEY, documents[INDEX_KEY])
            _write_bytes(zf, PROVENANCE_KEY, _json(out.record()))

    record = dict(format_version=FORMAT_VERSION, ternary_packing=TERNARY_PACKING)
    return Plan(NAME, tensors, layout, ckpt.provenance, record, recorded_provenance, documents=documents,
                tokenizer_files=tokenizer, metadata=dict(metadata or {}))


def _stored_arrays(entry: TensorEntry, naming: dict) -> tuple[dict, list[PlannedTensor]]:
    """One tensor's index record and the members that store it (a projection's two share one load)."""
    if entry.kind == TERNARY:  # HF packed bytes go straight to base-3: no int8 codes (4x the packed size)
        count = trits.packed_size(math.prod(entry.shape))
        pending: dict[str, np.float32] = {}

        def codes() -> list[np.ndarray]:
            where = naming["where"]
            packed, pending["multiplier"] = projection_bytes(entry, trits.from_hf2bit, trits.pack, where)
            if packed.size != count:
                raise ConvertError(f"{where}: tensor {entry.name}: packed codes do not hold shape {list(entry.shape)}")
            return [packed]

        record = {"name": entry.name, "kind": TERNARY, "shape": list(entry.shape), "dtype": None}
        return record, [_member_tensor(codes_key(entry.name), np.dtype(np.uint8), (count,), codes),
                        _member_tensor(multiplier_key(entry.name), _MULTIPLIER_DTYPE, (1,),
                                       lambda: [np.array([pending.pop("multiplier")], _MULTIPLIER_DTYPE)])]
    dtype_name = _dtype_name(np.dtype(entry.dtype), f"{naming['where']}: tensor {entry.name}")
    memory, stored = DENSE_DTYPES[dtype_name]
    record = {"name": entry.name, "kind": DENSE, "shape": list(entry.shape), "dtype": dtype_name}
    return record, [_member_tensor(data_key(entry.name), stored, tuple(entry.shape),
                                   lambda: _dense_pieces(entry, memory, stored, f"{naming['where']}: tensor {entry.name}"))]


def _member_tensor(key: str, dtype: np.dtype, shape: tuple, produce) -> PlannedTensor:
    dtype = np.dtype(dtype)
    return PlannedTensor(key, _npy_descr(dtype), shape, math.prod(shape) * dtype.itemsize, produce, (dtype, shape))


def _dense_pieces(entry: TensorEntry, memory: np.dtype, stored: np.dtype, label: str) -> Iterator[np.ndarray]:
    blocks = row_blocks(entry)  # an embedding a block of rows at a time, where the source offers it
    if blocks is not None:
        rows = 0
        for block in blocks.blocks:
            rows += len(block)
            yield np.ascontiguousarray(block).view(stored)
        if rows != entry.shape[0]:
            raise ConvertError(f"{label}: produced {rows} rows of {entry.shape[0]}")
        return
    value = entry.load()
    if isinstance(value, Ternary):
        raise ConvertError(f"{label}: expected a plain array, got ternary codes")
    array = np.asarray(value)
    if array.shape != entry.shape or array.dtype != memory:
        raise ConvertError(f"{label}: is {array.dtype} {list(array.shape)}, expected {memory} {list(entry.shape)}")
    yield np.ascontiguousarray(array).view(stored)


def _dtype_name(dtype: np.dtype, where: str) -> str:
    """The npz index's name of a dense dtype (DENSE_DTYPES), or ConvertError."""
    name = next((n for n, (mem, _) in DENSE_DTYPES.items() if dtype == mem), None)
    if name is None:
        raise ConvertError(f"{where}: dtype {dtype} cannot be stored (npz keeps {', '.join(DENSE_DTYPES)})")
    return name


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


def _json(value) -> bytes:
    """A JSON member's bytes as stored (what the content hash covers)."""
    return json.dumps(value, indent=1).encode()


def _write_bytes(zf: zipfile.ZipFile, key: str, data: bytes) -> None:
    """A byte member (JSON, a tokenizer file): a uint8 array of `data`."""
    with _open_member(zf, key, np.dtype(np.uint8), (len(data),)) as fh:
        fh.write(data)


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
               (FORMAT_KEY, CONFIG_KEY, INDEX_KEY, PROVENANCE_KEY, METADATA_KEY)]
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


__all__ = ["NAME", "detect", "read", "plan", "write", "stored_tensor_bytes", "recorded_provenance"]
