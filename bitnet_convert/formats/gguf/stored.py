"""What a GGUF stores, from the writer's side: each tensor with the producer of its bytes (`StoredTensor`, made by
`float_tensor` and `projection`), and what the keys say about the model (`GGUFModel`). Architecture plug-ins plan
their tensors with these; writer.py lays them out.

Multipliers travel exactly. TQ1_0/TQ2_0 blocks hold the multiplier in their f16 `d`, as llama.cpp's own
converter writes them, wherever f16 holds it; where it does not, `d` is an f16 next to it and
`blk.N.<proj>.scale` (F32, shape [1], multiplied into the projection's output by llama.cpp) the exact ratio
(block_scale). Float outtypes under a graph that applies `.scale` tensors (llama.cpp's) store the codes
(-1/0/+1) and the float32 multiplier in `.scale`. I2_S keeps the float32 multiplier in its own tail, as
bitnet.cpp reads it. bitnet.cpp's graphs know no
`.scale` tensors, so there a float projection holds codes x multiplier: exact in F32, rounded once in F16/BF16
(declared in the provenance's `multiplier_roundings`). A projection whose rows do not fit the outtype's blocks
is written in an exact float type instead, with a warning naming it.

Tensors are produced in pieces (a 2B4T embedding is 328 M values: converted 8 M at a time, it never exists in
float32). HF packed projections are transcoded straight into I2_S / TQ2_0 bytes (`PackedTernary`), never
unpacked into int8 codes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, quants

from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf import tq
from bitnet_convert.formats.gguf.types import FALLBACK_FLOAT, I2_S, SCALE_SUFFIX, GGMLType, Graph, OutType
from bitnet_core import parallel
from bitnet_core.checkpoint import TensorEntry, Ternary, row_blocks
from bitnet_core.codecs import hf2bit, i2s, native
from bitnet_core.errors import ConvertError
from bitnet_core.quantize import as_ternary, check_multiplier, projection_bytes

log = logging.getLogger("bitnet_convert")
F16_MAX = float(np.finfo(np.float16).max)
F16_TINY = np.finfo(np.float16).tiny  # the least normal f16, 2^-14
CHUNK_VALUES = 1 << 23  # values of a float tensor converted at a time: 32 MiB as float32
BF16 = np.dtype(ml_dtypes.bfloat16)
# bf16 bit patterns (sign cleared) below this are finite and at most 65280 in magnitude; the next bf16 value,
# 65536, is beyond float16's 65504, and it, infinities and NaNs take the checked float32 way.
_BF16_F16_SAFE = 0x4780


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One GGUF tensor as gguf-py's add_tensor_info wants it, and how to make its bytes."""

    name: str
    ggml_type: GGMLQuantizationType
    array_shape: tuple[int, ...]  # shape of the array handed to gguf-py (bytes for block types)
    array_dtype: np.dtype
    nbytes: int
    produce: Callable[[], Iterable[np.ndarray]] = dataclasses.field(repr=False, compare=False)  # the bytes, in pieces


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """What a GGUF's keys say about the model, as its architecture plug-in decided it from the writer options:
    the runtime's graph, the outtype, the embedding type, the config, the tokenizer (built while the first
    tensors are made) and the writer's settings for the provenance (`record`; `casts`: tensor -> its type)."""

    graph: Graph
    projection_type: OutType
    embed_type: GGMLQuantizationType
    cfg: object
    vocab: Callable[[], gguf_tokenizer.GGUFVocab | None]
    record: dict
    casts: dict[str, str]


def float_tensor(entry: TensorEntry, name: str, ggml_type, where: str) -> StoredTensor:
    shape = tuple(entry.shape)
    if ggml_type in (GGMLType.F32, GGMLType.F16):
        dtype = np.dtype(np.float32 if ggml_type == GGMLType.F32 else np.float16)
        array_shape, nbytes = shape, int(np.prod(shape)) * dtype.itemsize
    else:
        _check_blocks(shape, ggml_type, name, where)
        dtype = np.dtype(np.uint8)
        array_shape = quants.quant_shape_to_byte_shape(shape, ggml_type)
        nbytes = int(np.prod(array_shape))

    def produce() -> Iterable[np.ndarray]:
        # Whole rows at a time (block types quantize each row on its own), about CHUNK_VALUES values; read a
        # block at a time too where the source offers it (a whole copy of a 2B4T embedding is 0.66 GB more).
        blocks = row_blocks(entry, CHUNK_VALUES * np.dtype(entry.dtype or np.float32).itemsize)
        if blocks is not None:
            for block in blocks.blocks:
                yield encode_float(block, ggml_type, name, where)
            return
        rows = max(1, CHUNK_VALUES // max(1, int(np.prod(shape[1:]))))
        value = entry.load()
        if isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name} should be a plain array, found ternary")
        value = np.asarray(value)
        if value.ndim < 2:
            yield encode_float(value, ggml_type, name, where)
            return
        for start in range(0, value.shape[0], rows):
            yield encode_float(value[start : start + rows], ggml_type, name, where)

    return StoredTensor(name, ggml_type, array_shape, dtype, nbytes, produce)


def encode_float(values: np.ndarray, ggml_type, name: str, where: str) -> np.ndarray:
    if ggml_type == GGMLType.F16 and values.dtype == BF16:
        # bf16 -> f16 directly: native.bf16_to_f16 (checking the range in the same pass) and ml_dtypes round
        # exactly as bf16 -> f32 -> f16 does (bf16 -> f32 is exact) for every value whose magnitude bits are
        # under _BF16_F16_SAFE; the rest (too large, inf, NaN) take the checked float32 way below.
        out = np.empty(values.shape, np.float16)
        if native.available() and values.flags.c_contiguous:
            bits, out_bits = values.view(np.uint16), out.view(np.uint16)
            fits = []
            parallel.for_row_ranges(len(values), out.nbytes, lambda a, b: fits.append(
                native.bf16_to_f16(bits[a:b], out_bits[a:b], _BF16_F16_SAFE)))
            if all(fits):
                return out
        elif values.size == 0 or int((values.view(np.uint16) & 0x7FFF).max()) < _BF16_F16_SAFE:
            parallel.for_row_ranges(len(values), out.nbytes, lambda a, b: np.copyto(out[a:b], values[a:b],
                                                                                   casting="unsafe"))
            return out
    values = np.asarray(values, np.float32)
    if ggml_type == GGMLType.F16 and np.abs(values).max(initial=0) > F16_MAX:
        raise ConvertError(f"{where}: {name} has values beyond the float16 range; use an embedding type of bf16 or f32")
    return quants.quantize(values, ggml_type)  # BF16 rounds to nearest even like ggml: bf16 sources pass unchanged


def _fits_blocks(shape, ggml_type) -> bool:
    return shape[-1] % quants.GGML_QUANT_SIZES[ggml_type][0] == 0


def _check_blocks(shape, ggml_type, name: str, where: str) -> None:
    if not _fits_blocks(shape, ggml_type):
        raise ConvertError(
            f"{where}: {name} has rows of {shape[-1]} values; {ggml_type.name} needs a multiple of "
            f"{quants.GGML_QUANT_SIZES[ggml_type][0]} (choose a float type)"
        )


def projection(entry: TensorEntry, name: str, projection_type: OutType, graph: Graph, where: str) -> list[StoredTensor]:
    """The weight and, where the multiplier is neither in an I2_S tail nor in the values, its `.scale` tensor."""
    shape = tuple(entry.shape)
    t = projection_type.ggml_type
    if t not in (GGMLType.F16, GGMLType.BF16, GGMLType.F32) and not _fits_blocks(shape, t):
        fallback = FALLBACK_FLOAT[graph.scale_tensors]
        log.warning("%s: %s has rows of %d values, which %s blocks (%d values) do not fit: written as %s, exactly",
                    where, name, shape[-1], t.name, quants.GGML_QUANT_SIZES[t][0], fallback.name)
        t = fallback
    loaded: dict[str, np.float32] = {}  # the weight's producer loads; the scale's producer (next in file) reads

    def stored(from_hf2bit, pack) -> list[np.ndarray]:
        data, loaded["multiplier"] = projection_bytes(entry, from_hf2bit, pack, where)
        return [data]

    if t == I2_S:
        def i2s_bytes() -> list[np.ndarray]:  # the multiplier goes into the tail: pack with a unit one, then set it
            (data,) = stored(lambda d, rows: i2s.from_hf2bit(d, rows, 1.0), lambda c: i2s.pack(c, 1.0))
            i2s.set_multiplier(data, loaded["multiplier"])
            return [data]

        byte_shape = quants.quant_shape_to_byte_shape(shape, t)
        return [StoredTensor(name, t, byte_shape, np.dtype(np.uint8), i2s.nbytes(int(np.prod(shape))), i2s_bytes)]
    if t in (GGMLType.TQ1_0, GGMLType.TQ2_0):
        planned = _planned_multiplier(entry, where)
        d, correction = block_scale(planned)

        def tq_bytes() -> list[np.ndarray]:
            from_hf2bit = tq.tq2_0_from_hf2bit if t == GGMLType.TQ2_0 else \
                (lambda d, rows: tq.pack(hf2bit.unpack(d, rows), t))
            (data,) = stored(from_hf2bit, lambda codes: tq.pack(codes, t))
            multiplier = loaded.pop("multiplier")
            if multiplier != planned:  # the plan chose the layout for the multiplier the source said it had
                raise ConvertError(f"{where}: tensor {entry.name}: multiplier {multiplier!r} read, "
                                   f"{planned!r} when the file was planned (the source changed?)")
            return [tq.set_d(data, t, d)]

        byte_shape = quants.quant_shape_to_byte_shape(shape, t)
        weight = StoredTensor(name, t, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), tq_bytes)
        if correction is None:
            return [weight]
        return [weight, StoredTensor(name.removesuffix(".weight") + SCALE_SUFFIX, GGMLType.F32, (1,),
                                     np.dtype(np.float32), 4, lambda: [np.array([correction], np.float32)])]
    elif graph.scale_tensors:
        def codes() -> np.ndarray:
            value = as_ternary(entry.load())
            loaded["multiplier"] = value.multiplier
            return value.codes

        weight = float_tensor(dataclasses.replace(entry, load=codes), name, t, where)
    else:
        return [float_tensor(dataclasses.replace(entry, load=lambda: _weights_in_values(entry, t, where)),
                              name, t, where)]
    scale = StoredTensor(
        name.removesuffix(".weight") + SCALE_SUFFIX, GGMLType.F32, (1,), np.dtype(np.float32), 4,
        lambda: [np.array([loaded.pop("multiplier")], np.float32)],
    )
    return [weight, scale]


def block_scale(multiplier: np.float32) -> tuple[np.float16, np.float32 | None]:
    """(the f16 `d` of a projection's TQ blocks, the F32 `.scale` it needs or None) for an exact multiplier.

    llama.cpp's converter leaves the multiplier in `d`, and runtimes written against its files read `d` as the
    weight's magnitude and ignore `.scale`. So `d` is the multiplier wherever f16 holds it (every bf16 value in
    f16's normal range; 2B4T's are). Where it does not (Falcon3's 1/weight_scale in float32, a mean of masters),
    `d` is the f16 nearest it, or the next one up, and `.scale` the float32 ratio whose product with `d` gives
    the multiplier back exactly (llama.cpp multiplies it in; our reader takes the float32 product): those
    runtimes then compute with `d`, within 2^-9 of the multiplier, about as the converter's own file makes
    them. In f16's normal range one of the two always has such a ratio (a ratio just under 1 has float32 steps
    finer than the multiplier's); d = 1 and `.scale` = the multiplier is the last resort (outside that range)."""
    m = np.float32(multiplier)
    with np.errstate(over="ignore", under="ignore"):
        nearest = m.astype(np.float16)
    if np.float32(nearest) == m:
        return nearest, None
    for d in (nearest, np.nextafter(nearest, np.float16(np.inf))):
        if np.isfinite(d) and d >= F16_TINY:  # a subnormal d would be far from the multiplier
            ratio = np.float32(m / np.float32(d))
            if np.float32(np.float32(d) * ratio) == m:
                return d, ratio
    return np.float16(1.0), m


def _planned_multiplier(entry: TensorEntry, where: str) -> np.float32:
    """A projection's multiplier before its data is written (the layout depends on it): the one its source
    stores apart from the codes, else loaded (a GGUF source, master weights: read twice)."""
    if entry.multiplier is not None:
        return check_multiplier(entry.multiplier, f"{where}: tensor {entry.name}")
    return check_multiplier(as_ternary(entry.load()).multiplier, f"{where}: tensor {entry.name}")


def _weights_in_values(entry: TensorEntry, ggml_type, where: str) -> np.ndarray:
    """codes x multiplier, for a graph that applies no `.scale` tensor: every value is 0 or +-m, with m rounded
    once to the stored float type (nothing is rounded in F32). Refused where that rounding loses m."""
    value = as_ternary(entry.load())
    multiplier = check_multiplier(value.multiplier, f"{where}: tensor {entry.name}")
    stored = {GGMLType.F16: np.float16, GGMLType.BF16: BF16}.get(ggml_type, np.float32)
    with np.errstate(over="ignore", under="ignore"):
        rounded = np.float32(np.asarray(multiplier).astype(stored))
    if not np.isfinite(rounded) or rounded == 0:
        raise ConvertError(f"{where}: tensor {entry.name} has multiplier {multiplier!r}, which {ggml_type.name} "
                           "cannot hold; choose outtype f32")
    return value.codes.astype(stored) * np.asarray(rounded).astype(stored)
