"""GGUF tensors read back as checkpoint entries, whatever architecture the file is (the reader's half of a
stored tensor; stored.py is the writer's).

Projections are read back as codes + one multiplier, whatever the storage:
- I2_S: codes and the float32 multiplier of the tail;
- TQ1_0 / TQ2_0: the stored digits and the blocks' f16 `d`; every block with a non-zero d must carry the same
  |d| (llama.cpp's converter and our writer put the multiplier there; earlier versions of ours wrote d = 1 and a
  `.scale` tensor; blocks of zeros have d = 0, and a tensor that is all zeros has multiplier 1 unless it
  carries it in d or `.scale`);
- F16 / BF16 / F32: values that are 0 or +-m for one m (m = 1 in our files, the multiplier in llama.cpp's).
A `blk.N.<proj>.scale` tensor multiplies in, as llama.cpp applies it. Anything else is refused with the file
named: a tensor whose blocks carry different scales is not one ternary matrix times one multiplier.
Model keys are read each of the GGUF type it must have (`model_key`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGUFValueType, quants
from gguf import GGMLQuantizationType as GGMLType

from bitnet_convert.formats.gguf import rope as gguf_rope
from bitnet_convert.formats.gguf import tq as tq
from bitnet_convert.formats.gguf.header import FLOAT_TYPES, INTEGER_TYPES, GGUFHeader, GGUFSet, TensorInfo, typed_value
from bitnet_convert.formats.gguf.types import I2_S, U32
from bitnet_core.aligned import aligned_empty
from bitnet_core.checkpoint import TensorEntry, Ternary, dense_entry, ternary_entry
from bitnet_core.codecs import i2s
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_core.quantize import check_multiplier

PROJECTION_TYPES = (GGMLType.TQ1_0, GGMLType.TQ2_0, I2_S, GGMLType.F16, GGMLType.BF16, GGMLType.F32)
# Dense tensors: GGML type -> numpy dtype they are read as (block types are dequantized to float32).
DENSE_TYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: ml_dtypes.bfloat16,
               GGMLType.Q8_0: np.float32}


def read_tensor(reader: GGUFSet, t: TensorInfo) -> np.ndarray:
    """A private copy of a tensor's stored bytes, read with pread from its file (what loads use: see SourceWatch)."""
    reader = t.header or reader
    out = aligned_empty(t.stored_nbytes, np.uint8)  # adopted as it is by a JAX CPU array
    got = reader.held.readinto(t.data_offset, memoryview(out))
    if got != out.size:
        raise ConvertError(f"{reader.path}: tensor {t.name} is cut short ({got} of {out.size} bytes; truncated?)")
    return out


def model_key(reader: GGUFHeader, key: str, vtype: GGUFValueType) -> int | float | None:
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


def vocab_size(reader: GGUFSet, by_name: dict[str, TensorInfo]) -> int:
    """The rows of token_embd (dims are listed ne0 first), or in a vocab-only file the tokenizer's token count."""
    if "token_embd.weight" in by_name:
        return int(by_name["token_embd.weight"].shape[-1])
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        raise ConvertError(f"{reader.path}: no token_embd.weight tensor and no tokenizer.ggml.tokens")
    return int(tokens.count)


def logical_shape(t: TensorInfo) -> tuple[int, ...]:
    return tuple(reversed(t.shape))  # GGUF lists ne0 (the row length) first


def dense(reader: GGUFHeader, t: TensorInfo, hf_name: str, path: Path) -> TensorEntry:
    if t.tensor_type not in DENSE_TYPES:
        raise ConvertError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, not one of "
                           f"{', '.join(k.name for k in DENSE_TYPES)}")
    shape, ggml_type = logical_shape(t), t.tensor_type

    def load() -> np.ndarray:
        raw = read_tensor(reader, t)
        if ggml_type == GGMLType.BF16:
            return raw.view(ml_dtypes.bfloat16).reshape(shape)
        if ggml_type == GGMLType.Q8_0:
            return quants.dequantize(raw.reshape(-1, raw.size // shape[0]), ggml_type).reshape(shape)
        return raw.view(DENSE_TYPES[ggml_type]).reshape(shape)

    entry = dense_entry(hf_name, shape, DENSE_TYPES[ggml_type], load)
    return dataclasses.replace(entry, encoding="q8_0") if ggml_type == GGMLType.Q8_0 else entry


def projection(reader: GGUFHeader, t: TensorInfo, scale: TensorInfo | None, hf_name: str,
                   path: Path, heads: int | None = None) -> TensorEntry:
    """A projection; `heads`: its rows are in interleaved-RoPE order by that many heads (put back in HF's)."""
    if t.tensor_type not in PROJECTION_TYPES:
        raise ConvertError(f"{path}: projection {t.name} has type {t.tensor_type.name}, not ternary "
                           f"({', '.join(k.name for k in PROJECTION_TYPES)})")
    if scale is not None and (scale.tensor_type != GGMLType.F32 or scale.n_elements != 1):
        raise ConvertError(f"{path}: {scale.name} should be one F32 value")
    shape = logical_shape(t)
    if len(shape) != 2:
        raise ConvertError(f"{path}: projection {t.name} has shape {list(shape)}, expected [out, in]")

    def load() -> Ternary:
        raw = read_tensor(reader, t)
        try:
            codes, multiplier = _decode(raw, t.tensor_type, shape)
        except CorruptData as exc:
            raise CorruptData(f"{path}: {t.name}: {exc}") from None
        if scale is not None:
            multiplier = np.float32(multiplier * read_tensor(reader, scale).view(np.float32)[0])
        if heads is not None:
            codes = gguf_rope.from_interleaved(codes, heads)
        return Ternary(codes, check_multiplier(multiplier, f"{path}: {t.name}"))

    return ternary_entry(hf_name, shape, load)


def _decode(raw: np.ndarray, ggml_type, shape) -> tuple[np.ndarray, np.float32]:
    """(codes, multiplier) of a stored projection; the multiplier excludes any `.scale` tensor."""
    if ggml_type == I2_S:
        return i2s.unpack(raw, shape)
    if ggml_type in (GGMLType.TQ1_0, GGMLType.TQ2_0):
        codes, d = tq.unpack(raw, ggml_type, shape)
        codes *= np.repeat(np.sign(d), tq.BLOCK_VALUES, axis=1).astype(np.int8)  # d = 0 blocks compute zeros
        return codes, _common_magnitude(np.abs(d), "blocks carry different scales d")
    values = raw.view(ml_dtypes.bfloat16 if ggml_type == GGMLType.BF16 else DENSE_TYPES[ggml_type]).astype(np.float32)
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
