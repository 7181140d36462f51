"""The absmean quantizer and the conversions between a projection's forms (masters, codes, packed bytes).

Every format writer and the JAX model's loaders quantize master weights with `ternarize_master`, so a model and
the files converted from it agree on every code (docs/formats.md §1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bitnet_core.checkpoint import Ternary
from bitnet_core.codecs import hf2bit, rows4
from bitnet_core.errors import ConvertError, CorruptData

WEIGHT_EPS = np.float32(1e-5)  # floor on mean|W|: an all-zero matrix must not divide by zero


def ternarize_master(w: np.ndarray) -> Ternary:
    """Quantize master weights the way transformers' AutoBitLinear (online) does in its forward.

    transformers: ``scale = 1 / max(mean|W|, 1e-5)``, ``T = clamp(round(W * scale), -1, 1)``, effective weight
    ``T / scale``, all in float32 with round-half-to-even. So T comes from ``W * scale`` (not ``W / m``, which
    can round differently) and the multiplier is ``1 / scale``. The mean is accumulated in float64 and rounded
    once: a correctly rounded, order-independent value; torch's float32 reduction can land one ulp away.
    """
    w32 = np.asarray(w, dtype=np.float32)
    mean = np.float32(np.mean(np.abs(w32), dtype=np.float64))
    scale = np.float32(1.0) / max(mean, WEIGHT_EPS)
    codes = np.clip(np.rint(w32 * scale), -1, 1).astype(np.int8)
    return Ternary(codes, np.float32(1.0) / scale)


def as_ternary(value: Ternary | np.ndarray) -> Ternary:
    """A projection as codes + multiplier, quantizing float master weights if that is what it holds."""
    return value if isinstance(value, Ternary) else ternarize_master(value)


def masters_from_ternary(t: Ternary) -> np.ndarray:
    """Float32 master weights whose absmean ternarization gives back exactly `t`'s codes and multiplier.

    codes * m alone would not: its mean|W| is m times the density of non-zeros. Scaling by m / density makes
    mean|W| = m, and |W| / m = 1 / density >= 1 rounds and clips back to 1 for every non-zero code.
    """
    codes = t.codes.astype(np.float32)
    density = float(np.mean(np.abs(codes))) if codes.size else 0.0
    if density == 0.0:
        return np.zeros_like(codes)
    return codes * np.float32(t.multiplier / np.float32(density))


def projection_bytes(entry, from_hf2bit: Callable[..., np.ndarray], pack: Callable[..., np.ndarray],
                     where: str) -> tuple[np.ndarray, np.float32]:
    """A projection entry in one codec's bytes, with its multiplier: (bytes, float32 multiplier).

    The one place that chooses how: stored HF 2-bit bytes (HF, Flax and model sources offer them as
    `load_packed`) are transcoded field by field, `from_hf2bit(data, out_features)`, never unpacked to int8 codes
    (4x the memory and time); anything else is loaded (master weights ternarized with `ternarize_master`),
    its codes checked, and `pack(codes)`. A codec that needs the multiplier (I2_S's tail) takes it through a
    closure over the second element. CorruptData names `where` and the tensor on an invalid code or multiplier.
    """
    where = f"{where}: " if where else ""
    source = entry.load_packed() if entry.load_packed is not None and len(entry.shape) == 2 else None
    if source is not None and source.layout == hf2bit.LAYOUT:
        multiplier = check_multiplier(source.multiplier, f"{where}tensor {entry.name}")
        return source.transcode(from_hf2bit, entry.shape[0]), multiplier
    value = as_ternary(entry.load())
    if value.shape != tuple(entry.shape):
        raise CorruptData(f"{where}tensor {entry.name}: codes have shape {list(value.shape)}, "
                          f"expected {list(entry.shape)}")
    codes = np.asarray(value.codes)
    if codes.size and (codes.min() < -1 or codes.max() > 1):  # in the codes' own dtype: no wrapping cast
        raise CorruptData(f"{where}tensor {entry.name}: codes must be -1, 0 or +1 (found a code outside {{-1, 0, +1}})")
    return pack(codes), check_multiplier(value.multiplier, f"{where}tensor {entry.name}")


def check_multiplier(value, what: str) -> np.float32:
    """A multiplier is mean|W| of master weights: finite and positive, or CorruptData naming `what`."""
    value = np.float32(value)
    if not (np.isfinite(value) and value > 0):
        raise CorruptData(f"{what}: multiplier is {value} (expected a finite positive number)")
    return value


def packed_projection(entry) -> tuple[np.ndarray, np.float32]:
    """A projection entry as the JAX model's inference state holds it: (uint8 rows4 [out/4, in], multiplier).
    The reference model's loader and the engine's use it: one conversion for both."""
    if len(entry.shape) == 2 and not rows4.packable(entry.shape[0]):
        raise ConvertError(f"tensor {entry.name} has {entry.shape[0]} output rows: the model packs 4 rows per "
                           "byte and needs a multiple of 4")
    return projection_bytes(entry, rows4.from_hf2bit, rows4.pack, "")  # the model's loader names the source
