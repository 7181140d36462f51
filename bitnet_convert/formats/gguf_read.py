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

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, quants

from bitnet_convert.fileio import integrity
from bitnet_convert.fileio.sources import SourceWatch, parse_json, shown
from bitnet_convert.formats import gguf_rope, gguf_tokenizer
from bitnet_convert.formats import gguf_tq as tq
from bitnet_convert.formats.gguf_header import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    MAGIC,
    STRING,
    GGUFHeader,
    TensorInfo,
    typed_value,
)
from bitnet_convert.formats.gguf_types import (
    ARCHITECTURES,
    I2_S,
    KEY_HIDDEN_ACT,
    SENTENCEPIECE_ACT,
    KEY_LENGTH,
    KEY_PROVENANCE,
    MODEL_KEYS,
    ROPE_DIMENSIONS,
    SCALE_SUFFIX,
    U32,
)
from bitnet_core import validate
from bitnet_core.aligned import aligned_empty
from bitnet_core.checkpoint import (
    Checkpoint,
    TensorEntry,
    Ternary,
    dense_entry,
    ternary_entry,
)
from bitnet_core.codecs import i2s
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_core.names import expected_tensors, gguf_to_hf, is_projection
from bitnet_core.quantize import check_multiplier

T = GGMLQuantizationType
PROJECTION_TYPES = (T.TQ1_0, T.TQ2_0, I2_S, T.F16, T.BF16, T.F32)
# Dense tensors: GGML type -> numpy dtype they are read as (block types are dequantized to float32).
DENSE_TYPES = {T.F32: np.float32, T.F16: np.float16, T.BF16: ml_dtypes.bfloat16, T.Q8_0: np.float32}


def detect(path: Path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".gguf" and path.exists():  # a FIFO named m.gguf is refused by the reader, by name
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


NAME = "gguf"

def open_gguf(path, watch: SourceWatch | None = None) -> GGUFHeader:
    """The parsed header (gguf_header.py: bounded, lazy), through a descriptor held by `watch` (or its own)."""
    path = Path(path)
    return GGUFHeader((watch or SourceWatch()).hold(path), path)


def stored_nbytes(t: TensorInfo) -> int:
    return t.stored_nbytes


def raw_bytes(reader: GGUFHeader, t: TensorInfo) -> np.ndarray:
    """A tensor's stored bytes as a view of the mapped file (inspection)."""
    return reader.data[t.data_offset : t.data_offset + stored_nbytes(t)]


def _read_tensor(reader: GGUFHeader, t: TensorInfo) -> np.ndarray:
    """A private copy of a tensor's stored bytes, read with pread (what loads use: see SourceWatch)."""
    out = aligned_empty(stored_nbytes(t), np.uint8)  # adopted as it is by a JAX CPU array
    got = reader.held.readinto(t.data_offset, memoryview(out))
    if got != out.size:
        raise ConvertError(f"{reader.path}: tensor {t.name} is cut short ({got} of {out.size} bytes; truncated?)")
    return out


def field_reader(reader: GGUFHeader) -> Callable[[str], object]:
    """key -> its value (None when absent); strings that are not UTF-8 are refused naming the key."""
    return reader.value


# The content hash's one config document: the key/values as stored (the tokenizer's among them).
KEY_VALUES_DOCUMENT = "key/values"
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # gguf-py's fields for the file header


def stored_tensor_bytes(path) -> integrity.StoredModel:
    """What the content hash covers: every tensor as stored (GGML type, dims ne0 first, bytes incl. I2_S tails,
    no alignment padding) in file order, and the key/values (`stored_key_values`)."""
    reader = open_gguf(path)

    def tensors() -> Iterator[integrity.TensorBytes]:
        for t in sorted(reader.tensors, key=lambda t: t.data_offset):
            dims = tuple(int(d) for d in t.shape)
            yield integrity.TensorBytes(t.name, t.tensor_type.name, dims, memoryview(raw_bytes(reader, t)).cast("B"))

    return integrity.StoredModel(tensors, {KEY_VALUES_DOCUMENT: stored_key_values(reader)}, {})


def stored_key_values(reader: GGUFHeader) -> bytes:
    """Every key/value entry exactly as stored (key, type, value), in file order, but the provenance key (it
    holds the hash). Our writer stores provenance last, so this is the key/value section up to it."""
    entries = []
    for field in reader.fields.values():
        if field.name in _HEADER_FIELDS or field.name == KEY_PROVENANCE:
            continue
        size = sum(int(part.nbytes) for part in field.parts)
        entries.append(reader.data[field.offset : field.offset + size].tobytes())
    return b"".join(entries)


def recorded_provenance(path) -> dict | None:
    return _recorded(field_reader(open_gguf(path)), path)


def _recorded(field, path) -> dict | None:
    value = field(KEY_PROVENANCE)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConvertError(f"{shown(path)}: key {KEY_PROVENANCE} is {type(value).__name__}, expected a JSON string")
    record = parse_json(value.encode(), shown(path), f"key {KEY_PROVENANCE}", non_finite=True)
    return record if isinstance(record, dict) else None


def read(path: str, *, revision: str | None = None) -> Checkpoint:
    del revision  # a local file has none
    path = Path(path)
    watch = SourceWatch()  # the file, held open for the whole run and checked again after each tensor load
    reader = open_gguf(path, watch)
    field = field_reader(reader)
    arch = typed_value(reader, "general.architecture", frozenset((STRING,)), "a string")
    from bitnet_convert.formats import gguf_embedding  # imports this module

    if arch in gguf_embedding.READ_AS:  # bitnet.cpp's embedding branch (docs/formats.md §12)
        return gguf_embedding.read(path, reader, watch, arch)
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{path}: architecture {arch!r} is not BitNet (expected one of "
                           f"{', '.join([*ARCHITECTURES, *gguf_embedding.READ_AS])})")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ConvertError(f"{path}: no token_embd.weight tensor")
    config = _config(reader, arch, by_name)
    vocab = gguf_tokenizer.vocab_from_fields(field, str(path), n_vocab=config["vocab_size"])

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
            heads = gguf_rope.heads_of(hf_name, config) if ARCHITECTURES[arch].interleaved_rope else None
            entries[hf_name] = _ternary_entry(reader, t, scale, hf_name, path, heads)
        else:
            entries[hf_name] = _dense_entry(reader, t, hf_name, path)
    order = expected_tensors(validate.model_config(config, str(path)))
    entries = watch.guard({n: entries[n] for n in order if n in entries} | entries)  # model order, extras last
    tokenizer_files = {}
    if vocab is not None:
        tokenizer_files = gguf_tokenizer.tokenizer_files(vocab, config["max_position_embeddings"], str(path))
    provenance = integrity.reader_provenance(NAME, path, _recorded(field, path), source=str(path.resolve()),
                                             architecture=arch)
    ckpt = Checkpoint(config, entries, tokenizer_files, provenance)
    validate.check_tensors(ckpt, str(path))
    return ckpt


def _config(reader: GGUFHeader, arch: str, by_name: dict[str, TensorInfo]) -> dict:
    """config.json from the model keys, each of the GGUF type it must have (its range is validate.model_config's
    to check): BitNetForCausalLM for the sub-norm graphs, LlamaForCausalLM (BitNet-quantized) for `llama`."""
    read_as = ARCHITECTURES[arch]
    config: dict = {"architectures": [read_as.hf_architecture],
                    "model_type": "bitnet" if read_as.sub_norms else "llama"}
    for hf_key, (template, vtype) in MODEL_KEYS.items():
        key = template.format(arch=arch)
        value = _model_key(reader, key, vtype)
        if value is None:
            if hf_key == "num_key_value_heads":
                continue
            raise ConvertError(f"{reader.path}: missing key {key}")
        config[hf_key] = value
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    head_dim = _model_key(reader, ROPE_DIMENSIONS.format(arch=arch), U32) or \
        _model_key(reader, KEY_LENGTH.format(arch=arch), U32)
    if head_dim or config["num_attention_heads"] > 0:  # else validation names the head count
        config["head_dim"] = head_dim or config["hidden_size"] // config["num_attention_heads"]
    config["vocab_size"] = int(by_name["token_embd.weight"].shape[-1])  # dims are listed ne0 first
    config["hidden_act"] = typed_value(reader, KEY_HIDDEN_ACT, frozenset((STRING,)), "a string") or \
        _default_activation(reader, read_as)
    config["tie_word_embeddings"] = "output.weight" not in by_name
    for hf_key, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = _model_key(reader, key, U32)
        if value is not None:
            config[hf_key] = value
    config.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0, torch_dtype="bfloat16")
    return config


def _default_activation(reader: GGUFHeader, read_as) -> str:
    """The activation of a file without our key: the architecture's, but a `bitnet` file with a SentencePiece
    vocabulary is one of bitnet.cpp's 1bitLLM conversions (SiLU), not 2B4T (Llama-3 BPE, relu2)."""
    model = typed_value(reader, "tokenizer.ggml.model", frozenset((STRING,)), "a string")
    return SENTENCEPIECE_ACT if read_as.sub_norms and model == "llama" else read_as.hidden_act


def _model_key(reader: GGUFHeader, key: str, vtype: GGUFValueType) -> int | float | None:
    """A u32 key as an int (any integer type is accepted), an f32 key as the float its float32 prints as
    (1e-05, not 9.99e-06; a value beyond float32 stays as it is, for validation to name)."""
    if vtype == U32:
        return typed_value(reader, key, INTEGER_TYPES, "an integer (u32)")
    value = typed_value(reader, key, FLOAT_TYPES | INTEGER_TYPES, "a number (f32)")
    if value is None:
        return None
    with np.errstate(over="ignore"):
        as_f32 = np.float32(value)
    return float(str(as_f32)) if np.isfinite(as_f32) else float(value)


def _logical_shape(t: TensorInfo) -> tuple[int, ...]:
    return tuple(reversed(t.shape))  # GGUF lists ne0 (the row length) first


def _dense_entry(reader: GGUFHeader, t: TensorInfo, hf_name: str, path: Path) -> TensorEntry:
    if t.tensor_type not in DENSE_TYPES:
        raise ConvertError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, not one of "
                           f"{', '.join(k.name for k in DENSE_TYPES)}")
    shape, ggml_type = _logical_shape(t), t.tensor_type

    def load() -> np.ndarray:
        raw = _read_tensor(reader, t)
        if ggml_type == T.BF16:
            return raw.view(ml_dtypes.bfloat16).reshape(shape)
        if ggml_type == T.Q8_0:
            return quants.dequantize(raw.reshape(-1, raw.size // shape[0]), ggml_type).reshape(shape)
        return raw.view(DENSE_TYPES[ggml_type]).reshape(shape)

    entry = dense_entry(hf_name, shape, DENSE_TYPES[ggml_type], load)
    return dataclasses.replace(entry, encoding="q8_0") if ggml_type == T.Q8_0 else entry


def _ternary_entry(reader: GGUFHeader, t: TensorInfo, scale: TensorInfo | None, hf_name: str,
                   path: Path, heads: int | None = None) -> TensorEntry:
    """A projection; `heads`: its rows are in interleaved-RoPE order by that many heads (put back in HF's)."""
    if t.tensor_type not in PROJECTION_TYPES:
        raise ConvertError(f"{path}: projection {t.name} has type {t.tensor_type.name}, not ternary "
                           f"({', '.join(k.name for k in PROJECTION_TYPES)})")
    if scale is not None and (scale.tensor_type != T.F32 or scale.n_elements != 1):
        raise ConvertError(f"{path}: {scale.name} should be one F32 value")
    shape = _logical_shape(t)
    if len(shape) != 2:
        raise ConvertError(f"{path}: projection {t.name} has shape {list(shape)}, expected [out, in]")

    def load() -> Ternary:
        raw = _read_tensor(reader, t)
        try:
            codes, multiplier = _decode(raw, t.tensor_type, shape)
        except CorruptData as exc:
            raise CorruptData(f"{path}: {t.name}: {exc}") from None
        if scale is not None:
            multiplier = np.float32(multiplier * _read_tensor(reader, scale).view(np.float32)[0])
        if heads is not None:
            codes = gguf_rope.from_interleaved(codes, heads)
        return Ternary(codes, check_multiplier(multiplier, f"{path}: {t.name}"))

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
