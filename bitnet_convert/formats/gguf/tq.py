"""llama.cpp's ternary block types TQ1_0 (id 34) and TQ2_0 (id 35), through gguf-py's own quantizers.

Both cut each row into 256-value blocks with one f16 scale `d` (docs/formats.md §6). We quantize the *codes* as
floats, so every block that holds a non-zero gets `d = 1.0` exactly (a block of zeros gets `d = 0`, as gguf-py
and llama.cpp write it), then `set_d` puts the projection's magnitude into those blocks, as llama.cpp's own
converter leaves it (stored.block_scale chooses it: the multiplier itself wherever f16 holds it). Decoding
returns the codes and each block's `d`, whichever layout the file has.

TQ2_0 also has a direct packer from int8 codes: gguf-py works in float32 and rounds every value, which is
needless for values that are already -1/0/+1. It is byte-identical to gguf-py's output (tested) and used
for the big tensors, as is `tq2_0_from_hf2bit`, which regroups HF packed bytes without making int8 codes;
TQ1_0 (base-3 digits) goes through gguf-py.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from bitnet_core import parallel
from bitnet_core.codecs import hf2bit, i2s, native
from bitnet_core.codecs._bits import pack_biased
from bitnet_core.errors import CorruptData

TQ1_0 = GGMLQuantizationType.TQ1_0
TQ2_0 = GGMLQuantizationType.TQ2_0
BLOCK_VALUES = 256
_D_BYTES = 2  # the f16 `d` closes every block of both types
_ONE_F16 = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
_QS_BYTES = BLOCK_VALUES // 4
_TQ2_0_BLOCK_BYTES = _QS_BYTES + _D_BYTES
_ZERO_CODES_WORD = np.uint64(0x5555555555555555)  # eight bytes of four biased zeros (code 1) each


def row_bytes(qtype: GGMLQuantizationType, in_features: int) -> int:
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    return in_features // block_values * block_bytes


def _check_shape(codes: np.ndarray, qtype) -> None:
    if codes.ndim != 2 or codes.shape[1] % BLOCK_VALUES:
        raise ValueError(f"{qtype.name} needs [out, in] rows of a multiple of {BLOCK_VALUES} values, got {codes.shape}")


def pack(codes: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """int8 codes [out, in] in {-1, 0, +1} -> uint8 [out, row_bytes] with d = 1 (0 for all-zero blocks)."""
    if qtype == TQ2_0:
        return pack_tq2_0(codes)  # checks shape and values itself
    codes = np.asarray(codes)
    _check_shape(codes, qtype)
    i2s.check_codes(codes)
    return quants.quantize(codes.astype(np.float32), qtype)


def pack_tq2_0(codes: np.ndarray) -> np.ndarray:
    """TQ2_0 straight from int8 codes [out, in]: per 128-value chunk, byte m holds values m + 32*l at bits 2*l."""
    codes = np.asarray(codes)
    _check_shape(codes, TQ2_0)
    i2s.check_codes(codes)
    n_out, n_in = codes.shape
    codes = np.ascontiguousarray(codes, dtype=np.int8)
    chunks = codes.reshape(-1, BLOCK_VALUES // 128, 4, 32)  # [block, 128-value chunk, l, m]
    out = np.empty((chunks.shape[0], _TQ2_0_BLOCK_BYTES), np.uint8)
    qs = out[:, :_QS_BYTES].view(np.int8).reshape(-1, BLOCK_VALUES // 128, 32)
    pack_biased([chunks[:, :, l] for l in range(4)], (0, 2, 4, 6), qs)
    zero = np.bitwise_or.reduce(codes.reshape(-1, BLOCK_VALUES).view(np.uint64), axis=1) == 0
    _write_d(out, zero)
    return out.reshape(n_out, row_bytes(TQ2_0, n_in))


def tq2_0_from_hf2bit(packed: np.ndarray, out_features: int) -> np.ndarray:
    """= pack_tq2_0(hf2bit.unpack(packed, out_features)), without making the int8 codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if not hf2bit.transcodable(packed, out_features, BLOCK_VALUES):
        return pack_tq2_0(hf2bit.unpack(packed, out_features))
    hf2bit.check(packed, out_features)
    rows, n_in = packed.shape
    planes = hf2bit.to_rows(packed, reverse_groups=False)  # value m + 32l at bits 2l
    qs = planes.reshape(-1, _QS_BYTES)  # [blocks of the [out, in] matrix, 64], in row-major order
    out = np.empty((qs.shape[0], _TQ2_0_BLOCK_BYTES), np.uint8)
    if native.available():
        one = int(_ONE_F16.view(np.uint16)[0])
        parallel.for_row_ranges(qs.shape[0], out.nbytes, lambda a, b: native.tq2_0_blocks(qs[a:b], out[a:b], one))
        return out.reshape(4 * rows, row_bytes(TQ2_0, n_in))

    def part(start: int, stop: int) -> None:
        out[start:stop, :_QS_BYTES] = qs[start:stop]
        # A block holds only zero codes when each of its 8 words is _ZERO_CODES_WORD. One pass per word column,
        # faster than numpy's reduce along rows of 8 (BENCHMARKS.md, design measurements).
        words = qs[start:stop].view(np.uint64)  # [blocks, 8]
        differ = words[:, 0] ^ _ZERO_CODES_WORD
        for k in range(1, words.shape[1]):
            differ |= words[:, k] ^ _ZERO_CODES_WORD
        zero = differ == 0
        _write_d(out[start:stop], zero)

    parallel.for_row_ranges(qs.shape[0], out.nbytes, part)
    return out.reshape(4 * rows, row_bytes(TQ2_0, n_in))


def _write_d(blocks: np.ndarray, zero: np.ndarray) -> None:
    """The f16 `d` closing each block [.., 66]: 1.0, or +0.0 for a block whose 256 codes are all zero."""
    blocks[:, _QS_BYTES] = _ONE_F16[0]
    blocks[:, _QS_BYTES + 1] = np.where(zero, np.uint8(0), _ONE_F16[1])


def set_d(data: np.ndarray, qtype: GGMLQuantizationType, d: np.float16) -> np.ndarray:
    """Blocks packed by `pack` / `tq2_0_from_hf2bit` ([.., row_bytes], d = 1 or 0) with `d` in place of 1.0.

    Blocks of zeros keep d = 0, as llama.cpp's converter writes them; but where *every* block is zero, all get
    `d`, so the file still holds the magnitude (the codes compute zeros whatever d is)."""
    d_bits = np.float16(d).view(np.uint16)
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    stored = blocks[:, -_D_BYTES:].view(np.uint16)[:, 0]  # a view: written through
    if stored.size and not stored.any():
        stored[:] = d_bits
    else:
        stored[stored != 0] = d_bits
    return data


def unpack(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [out, row_bytes] -> (int8 codes [out, in], float32 d [out, in/256]).

    The codes are the stored digits whatever `d` is (decoded with `d` forced to 1); the value llama.cpp
    computes is `codes * d` per block.
    """
    out, n_in = shape
    if n_in % BLOCK_VALUES:
        raise CorruptData(f"{qtype.name} tensor of shape {list(shape)}: rows are not whole 256-value blocks")
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    raw = np.asarray(raw, np.uint8)
    if raw.size != out * row_bytes(qtype, n_in):
        raise CorruptData(f"{qtype.name} tensor of shape {list(shape)} needs {out * row_bytes(qtype, n_in)} bytes, found {raw.size}")
    blocks = raw.reshape(-1, block_bytes)
    d = blocks[:, -_D_BYTES:].copy().view(np.float16).astype(np.float32).reshape(out, n_in // BLOCK_VALUES)
    if qtype == TQ2_0:
        codes = unpack_tq2_0(blocks[:, :-_D_BYTES]).reshape(out, n_in)
    else:
        unit = blocks.copy()
        unit[:, -_D_BYTES:] = _ONE_F16
        codes = quants.dequantize(unit, qtype).reshape(out, n_in)
    if np.abs(codes).max(initial=0) > 1:  # TQ2_0 code 3 decodes to +2
        raise CorruptData(f"{qtype.name} weight holds the invalid code 3")
    return codes.astype(np.int8), d


def unpack_tq2_0(qs: np.ndarray) -> np.ndarray:
    """The inverse of pack_tq2_0's bit layout: uint8 [blocks, 64] -> int8 [blocks, 256] (code 3 -> +2)."""
    chunks = qs.reshape(-1, BLOCK_VALUES // 128, 1, 32)  # [b, chunk, 1, m]
    fields = (chunks >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3  # [b, chunk, l, m]
    return (fields.astype(np.int8) - 1).reshape(qs.shape[0], BLOCK_VALUES)
