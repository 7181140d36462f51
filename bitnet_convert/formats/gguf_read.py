"""GGUF -> Checkpoint: files written by us, by llama.cpp's converter and by bitnet.cpp's.

Projections are read back as codes + one multiplier, whatever the storage:
- I2_S: codes and the float32 multiplier of the tail;
- TQ1_0 / TQ2_0: the stored digits and the blocks' f16 `d`; every block holding a non-zero must carry the same
  |d| (llama.cpp's converter folds the multiplier into d; our files have d = 1 and a `.scale` tensor);
- F16 / BF16 / F32: values that are 0 or +-m for one m (m = 1 in our files, the multiplier in llama.cpp's).
A `blk.N.<proj>.scale` tensor multiplies in, as llama.cpp applies it. Anything else is refused with the file
named: a tensor whose blocks carry different scales is not one ternary matrix times one multiplier.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, quants
from gguf.gguf_reader import ReaderTensor

from .. import integrity, validate
from ..checkpoint import Checkpoint, TensorEntry, Ternary, dense_entry, ternary_entry
from ..codecs import i2s, tq
from ..errors import ConvertError, CorruptData
from ..names import expected_tensors, gguf_to_hf, is_projection
from . import gguf_tokenizer
from .gguf_types import ARCHITECTURES, I2_S, KEY_HIDDEN_ACT, KEY_PROVENANCE, MODEL_KEYS, SCALE_SUFFIX

T = GGMLQuantizationType
MAGIC = b"GGUF"
PROJECTION_TYPES = (T.TQ1_0, T.TQ2_0, I2_S, T.F16, T.BF16, T.F32)
# Dense tensors: GGML type -> numpy dtype they are read as (block types are dequantized to float32).
DENSE_TYPES = {T.F32: np.float32, T.F16: np.float16, T.BF16: ml_dtypes.bfloat16, T.Q8_0: np.float32}


def detect(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


NAME = "gguf"

# GGUF value types: id -> fixed byte size (None: string, array) — for walking the key/values before gguf-py does.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _check_kv_bounds(path: Path, data: np.ndarray) -> None:
    """Walk the header's key/values and refuse any length or count that runs past the end of the file.

    gguf-py trusts these fields: an array count of 2^40 makes it loop (and allocate) 2^40 times before it
    notices the file ended. Checking every count against the bytes left bounds work and memory by file size."""
    size = data.size
    pos = 24  # magic, version, tensor count, kv count

    def u(n: int, at: int) -> int:
        if at + n > size:
            raise ConvertError(f"{path}: truncated or corrupt GGUF (header runs past the end of the file)")
        return int.from_bytes(data[at:at + n].tobytes(), "little")

    def skip_value(vtype: int, at: int) -> int:
        if vtype in _SCALAR_BYTES:
            return at + _SCALAR_BYTES[vtype]
        if vtype == _STRING:
            return at + 8 + u(8, at)
        if vtype == _ARRAY:
            item, count = u(4, at), u(8, at + 4)
            at += 12
            smallest = _SCALAR_BYTES.get(item, 8 if item == _STRING else 12)
            if count * smallest > size - at:
                raise ConvertError(f"{path}: truncated or corrupt GGUF (an array claims {count} items)")
            if item in _SCALAR_BYTES:
                return at + count * _SCALAR_BYTES[item]
            for _ in range(count):
                at = skip_value(item, at)
                if at > size:
                    break
            return at
        raise ConvertError(f"{path}: corrupt GGUF (unknown value type {vtype})")

    kv_count = u(8, 16)
    if kv_count * 12 > size:
        raise ConvertError(f"{path}: truncated or corrupt GGUF (header claims {kv_count} keys)")
    for _ in range(kv_count):
        pos = pos + 8 + u(8, pos)  # key
        pos = skip_value(u(4, pos), pos + 4)
        if pos > size:
            raise ConvertError(f"{path}: truncated or corrupt GGUF (header runs past the end of the file)")


def open_gguf(path) -> GGUFReader:
    """gguf-py's reader (memory-mapped), with its exceptions turned into one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if not detect(path):
        raise ConvertError(f"{path}: not a GGUF file (no GGUF magic)")
    _check_kv_bounds(path, np.memmap(path, mode="r"))
    try:
        reader = GGUFReader(path)
    except ValueError as exc:
        if "GGMLQuantizationType" in str(exc):
            raise ConvertError(f"{path}: unsupported tensor type ({exc})") from None
        raise ConvertError(f"{path}: truncated or corrupt GGUF ({exc})") from None
    except (IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as exc:
        raise ConvertError(f"{path}: truncated or corrupt GGUF ({type(exc).__name__}: {exc})") from None
    size = reader.data.size
    for t in reader.tensors:
        if t.data_offset + stored_nbytes(t) > size:
            raise ConvertError(f"{path}: truncated: tensor {t.name} ends at byte "
                               f"{t.data_offset + stored_nbytes(t)}, file has {size}")
    return reader


def stored_nbytes(t: ReaderTensor) -> int:
    """gguf-py's n_bytes leaves out the I2_S tail (see gguf_types)."""
    return i2s.nbytes(t.n_elements) if t.tensor_type == I2_S else int(t.n_bytes)


def raw_bytes(reader: GGUFReader, t: ReaderTensor) -> np.ndarray:
    return reader.data[t.data_offset : t.data_offset + stored_nbytes(t)]


def field_reader(reader: GGUFReader) -> Callable[[str], object]:
    def field(key: str):
        f = reader.get_field(key)
        try:
            return None if f is None else f.contents()
        except UnicodeDecodeError:
            raise ConvertError(f"{getattr(reader.data, 'filename', 'GGUF')}: key {key} holds a string that is not UTF-8") from None

    return field


def stored_tensor_bytes(path) -> Iterator[tuple[str, memoryview]]:
    """Every tensor's stored bytes (I2_S tails included, alignment padding not), in file order."""
    reader = open_gguf(path)
    for t in sorted(reader.tensors, key=lambda t: t.data_offset):
        yield t.name, memoryview(raw_bytes(reader, t)).cast("B")


def recorded_provenance(path) -> dict | None:
    return _recorded(field_reader(open_gguf(path)), path)


def _recorded(field, path) -> dict | None:
    value = field(KEY_PROVENANCE)
    if value is None:
        return None
    try:
        record = json.loads(value)
    except json.JSONDecodeError:
        raise ConvertError(f"{path}: {KEY_PROVENANCE} is not valid JSON") from None
    return record if isinstance(record, dict) else None


def read(path: str, *, revision: str | None = None) -> Checkpoint:
    del revision  # a local file has none
    path = Path(path)
    reader = open_gguf(path)
    field = field_reader(reader)
    arch = field("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{path}: architecture {arch!r} is not BitNet (expected one of {', '.join(ARCHITECTURES)})")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ConvertError(f"{path}: no token_embd.weight tensor")
    config = _config(field, arch, by_name, path)
    vocab = gguf_tokenizer.vocab_from_fields(field, str(path))

    entries: dict[str, TensorEntry] = {}
    for t in reader.tensors:
        if t.name.endswith(SCALE_SUFFIX):
            continue
        try:
            hf_name = gguf_to_hf(t.name)
        except KeyError:
            raise ConvertError(f"{path}: unexpected tensor {t.name}") from None
        scale = by_name.get(t.name.removesuffix(".weight") + SCALE_SUFFIX)
        if is_projection(hf_name):
            entries[hf_name] = _ternary_entry(reader, t, scale, hf_name, path)
        else:
            entries[hf_name] = _dense_entry(reader, t, hf_name, path)
    order = expected_tensors(validate.model_config(config, str(path)))
    entries = {n: entries[n] for n in order if n in entries} | entries  # checkpoint order, extras last
    tokenizer_files = {}
    if vocab is not None:
        tokenizer_files = gguf_tokenizer.tokenizer_files(vocab, config["max_position_embeddings"], str(path))
    provenance = integrity.reader_provenance(NAME, path, _recorded(field, path), source=str(path.resolve()),
                                             architecture=arch)
    ckpt = Checkpoint(config, entries, tokenizer_files, provenance)
    validate.check_tensors(ckpt, str(path))
    return ckpt


def _config(field, arch: str, by_name: dict[str, ReaderTensor], path: Path) -> dict:
    """config.json of BitNetForCausalLM from the model keys."""
    config: dict = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet"}
    for hf_key, (key, vtype) in MODEL_KEYS.items():
        value = field(f"{arch}.{key}")
        if value is None:
            if hf_key == "num_key_value_heads":
                continue
            raise ConvertError(f"{path}: missing key {arch}.{key}")
        config[hf_key] = int(value) if vtype == "u32" else float(str(np.float32(value)))  # 1e-05, not 9.99e-06
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    head_dim = field(f"{arch}.rope.dimension_count") or field(f"{arch}.attention.key_length")
    config["head_dim"] = int(head_dim or config["hidden_size"] // config["num_attention_heads"])
    config["vocab_size"] = int(by_name["token_embd.weight"].shape[-1])  # dims are listed ne0 first
    config["hidden_act"] = field(KEY_HIDDEN_ACT) or ARCHITECTURES[arch]
    config["tie_word_embeddings"] = "output.weight" not in by_name
    for hf_key, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if field(key) is not None:
            config[hf_key] = int(field(key))
    config.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0, torch_dtype="bfloat16")
    return config


def _logical_shape(t: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (the row length) first


def _dense_entry(reader: GGUFReader, t: ReaderTensor, hf_name: str, path: Path) -> TensorEntry:
    if t.tensor_type not in DENSE_TYPES:
        raise ConvertError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, not one of "
                           f"{', '.join(k.name for k in DENSE_TYPES)}")
    shape, ggml_type = _logical_shape(t), t.tensor_type

    def load() -> np.ndarray:
        raw = raw_bytes(reader, t)
        if ggml_type == T.BF16:
            return raw.view(ml_dtypes.bfloat16).reshape(shape).copy()
        if ggml_type == T.Q8_0:
            return quants.dequantize(raw.reshape(-1, raw.size // shape[0]), ggml_type).reshape(shape)
        return raw.view(DENSE_TYPES[ggml_type]).reshape(shape).copy()

    return dense_entry(hf_name, shape, DENSE_TYPES[ggml_type], load)


def _ternary_entry(reader, t: ReaderTensor, scale: ReaderTensor | None, hf_name: str, path: Path) -> TensorEntry:
    if t.tensor_type not in PROJECTION_TYPES:
        raise ConvertError(f"{path}: projection {t.name} has type {t.tensor_type.name}, not ternary "
                           f"({', '.join(k.name for k in PROJECTION_TYPES)})")
    if scale is not None and (scale.tensor_type != T.F32 or scale.n_elements != 1):
        raise ConvertError(f"{path}: {scale.name} should be one F32 value")
    shape = _logical_shape(t)
    if len(shape) != 2:
        raise ConvertError(f"{path}: projection {t.name} has shape {list(shape)}, expected [out, in]")

    def load() -> Ternary:
        raw = raw_bytes(reader, t)
        try:
            codes, multiplier = _decode(raw, t.tensor_type, shape)
        except CorruptData as exc:
            raise CorruptData(f"{path}: {t.name}: {exc}") from None
        if scale is not None:
            multiplier = np.float32(multiplier * raw_bytes(reader, scale).view(np.float32)[0])
        if not (np.isfinite(multiplier) and multiplier > 0):
            raise CorruptData(f"{path}: {t.name}: multiplier {multiplier} is not a finite positive number")
        return Ternary(codes, multiplier)

    return ternary_entry(hf_name, shape, load)


def _decode(raw: np.ndarray, ggml_type, shape) -> tuple[np.ndarray, np.float32]:
    """(codes, multiplier) of a stored projection; the multiplier excludes any `.scale` tensor."""
    if ggml_type == I2_S:
        return i2s.unpack(raw, shape)
    if ggml_type in (T.TQ1_0, T.TQ2_0):
        codes, d = tq.unpack(raw, ggml_type, shape)
        codes *= np.repeat(np.sign(d), tq.BLOCK_VALUES, axis=1).astype(np.int8)  # d = 0 blocks compute zeros
        return codes, _common_magnitude(np.abs(d), "blocks carry different scales d")
    values = raw.view(ml_dtypes.bfloat16 if ggml_type == T.BF16 else DENSE_TYPES[ggml_type]).astype(np.float32)
    values = values.reshape(shape)
    multiplier = _common_magnitude(np.abs(values), "values are not 0 or one magnitude")
    return np.sign(values).astype(np.int8), multiplier


def _common_magnitude(magnitudes: np.ndarray, what: str) -> np.float32:
    """The one non-zero magnitude of a ternary tensor (1.0 when it is all zeros)."""
    nonzero = magnitudes[magnitudes != 0]
    if nonzero.size == 0:
        return np.float32(1.0)
    m = nonzero.flat[0]
    if not np.isfinite(m) or (nonzero != m).any():
        raise CorruptData(f"not a ternary tensor with one multiplier: {what} "
                          f"(between {nonzero.min()} and {nonzero.max()})")
    return np.float32(m)
