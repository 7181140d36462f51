"""BitLinear: the W1.58A8 projection. All of BitNet's quantization lives in this file.

Forward, in both weight modes (formats.md §1):
    s   = 127 / max(|x|, 1e-5)                    per token, over the last axis
    x_q = clip(round(x * s), -128, 127)           int8; jnp.round is half-to-even like torch.round
    y   = (x_q @ T.T) / s * w                     T ternary codes [out, in], w the per-tensor multiplier

The integer product is computed exactly, int8 x int8 -> int32 (`lax.dot_general(preferred_element_type=int32)`).
Measured on this project's CPU (XLA, 6912x2560 projection): int32 accumulation 3.7 ms at 64 tokens and 19 ms
at 512, against 68 ms and 158 ms for float32 accumulation (which must also cast the codes every call), with
bit-identical results (sums stay below 2^24 either way). One quirk: XLA's CPU int8 dot for a *single* row
takes a slow path (31-65 ms); padding to two rows brings it to 1.2-1.6 ms, so one-token decode pads.

Weight modes:
  * inference: `packed` uint8 [out/4, in], the codes 2-bit packed four consecutive output rows per byte
    (packed.py's layout), and `multiplier` float32 [] (mean|W| of the masters). The product unpacks the codes
    block by block into an int8 x int8 -> int32 dot (`packed.packed_matmul`): a quarter of the memory (0.52 GB
    of ternary weights for 2B4T rather than 2.08 GB), exactly what the Flax format stores and the generation
    engine runs. The price, measured with benchmarks/bench_model_prefill.py (4 layers at 2B4T widths, 2-core
    CPU, best of 7, int8 codes -> packed): 23-26 -> 25 ms at 2 tokens, 24-28 -> 30-35 ms at 16, 43-54 -> 59-87 ms
    at 64, 153 -> 214 ms at 256 (the unpack itself is ~0.5 ms per 6912x2560 matrix; the rest is the dot running
    on freshly unpacked blocks; whole-matrix unpack or other block sizes measured no better). out_features must be a multiple of 4 (every BitNet shape
    is): a model of other widths is refused here rather than padded, which would leak padding rows into the
    state, the file format and every consumer of it.
  * training: float32 master `weight` [out, in] (an nnx.Param). Absmean ternarization in the forward,
    `m = max(mean|W|, 1e-5)`, `T = clip(round(W / m), -1, 1)`, multiplier m, with a straight-through
    estimator on both the weight and the activation quantizer, as transformers' AutoBitLinear online mode.
    The codes are freshly made in every step, so they stay int8 (`ternary_matmul`: the same exact int32 dot
    without the unpack); a trained model exported to packed codes + multiplier (`export_inference`) gives
    bit-identical outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import packed as packed_ops

INFERENCE = "inference"
TRAINING = "training"
MODES = (INFERENCE, TRAINING)

ACT_MAX = 127.0  # int8 activations: round(x * 127 / max|x|) lands in [-127, 127]; clip to int8 as transformers
ACT_MIN = -128.0
EPS = 1e-5  # floor on max|x| and mean|W|: an all-zero token or weight must not divide by zero


class Quantized(nnx.Variable):
    """Frozen inference weights (ternary codes, multipliers): not an nnx.Param, so optimizers never see them."""


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float [..., in] -> (int8 codes [..., in], float32 scale s [..., 1]); x ~= x_q / s."""
    x = x.astype(jnp.float32)
    scale = ACT_MAX / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), EPS)
    x_q = jnp.clip(jnp.round(x * scale), ACT_MIN, ACT_MAX).astype(jnp.int8)
    return x_q, scale


def ternarize(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Absmean ternarization of master weights [out, in] -> (int8 codes [out, in], float32 multiplier [])."""
    weight = weight.astype(jnp.float32)
    # As transformers (and formats.hf.ternarize_master): multiply by scale = 1/m rather than divide by m, which
    # can round differently, and use 1/scale as the multiplier (its effective weight is T / scale).
    scale = 1.0 / jnp.maximum(jnp.mean(jnp.abs(weight)), EPS)
    codes = jnp.clip(jnp.round(weight * scale), -1, 1).astype(jnp.int8)
    return codes, 1.0 / scale


def ternary_matmul(x_q: jax.Array, scale: jax.Array, codes: jax.Array, multiplier: jax.Array) -> jax.Array:
    """(x_q @ codes.T) / scale * multiplier with exact int32 accumulation. x_q int8 [..., in], int8 codes
    [out, in] -> f32 [..., out]. The training forward's product (codes made in the step, never packed)."""
    lead = x_q.shape[:-1]
    rows = x_q.reshape(-1, x_q.shape[-1])  # [N, in]
    n = rows.shape[0]
    if n == 1:  # see module docstring: XLA CPU's one-row int8 dot is ~30x slower than two rows
        rows = jnp.concatenate([rows, rows])
    acc = jax.lax.dot_general(
        rows, codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
    )  # [N, out]
    acc = acc[:n].reshape(*lead, codes.shape[0])
    return acc.astype(jnp.float32) / scale * multiplier


def packed_ternary_matmul(
    x_q: jax.Array, scale: jax.Array, packed: jax.Array, multiplier: jax.Array, *, block_bytes: int = 0
) -> jax.Array:
    """As `ternary_matmul` with the codes held 2-bit packed (uint8 [out/4, in]): the inference product."""
    acc = packed_ops.packed_matmul(x_q, packed, block_bytes=block_bytes)  # int32 [..., out], exact
    return acc.astype(jnp.float32) / scale * multiplier


def pack_ternary(codes) -> jax.Array:
    """int8 codes [out, in] (host or device) -> the inference leaf `packed`, uint8 [out/4, in]."""
    return jnp.asarray(packed_ops.pack(np.asarray(codes, np.int8)))


@jax.custom_vjp
def ternary_linear_ste(x: jax.Array, weight: jax.Array) -> jax.Array:
    """float32 x [..., in], float32 weight [out, in] -> float32 [..., out]. Training forward: ternarize `weight`, quantize `x`, integer product. Gradients pass straight through
    both quantizers: as if y = x_dq @ W_q.T with x_dq = x_q / s and W_q = T * m treated as identities."""
    y, _ = _ste_fwd(x, weight)
    return y


def _ste_fwd(x, weight):
    codes, multiplier = ternarize(weight)
    x_q, scale = quantize_activations(x)
    return ternary_matmul(x_q, scale, codes, multiplier), (x_q, scale, codes, multiplier)


def _ste_bwd(residuals, grad_y):  # grad_y [..., out]
    x_q, scale, codes, multiplier = residuals
    x_dq = x_q.astype(jnp.float32) / scale  # [..., in]
    w_q = codes.astype(jnp.float32) * multiplier  # [out, in]
    grad_y = grad_y.astype(jnp.float32)
    grad_x = jnp.einsum("...o,oi->...i", grad_y, w_q, precision=jax.lax.Precision.HIGHEST)
    grad_w = jnp.einsum("...o,...i->oi", grad_y, x_dq, precision=jax.lax.Precision.HIGHEST)
    return grad_x, grad_w


ternary_linear_ste.defvjp(_ste_fwd, _ste_bwd)


class BitLinear(nnx.Module):
    """A bias-free W1.58A8 projection, in inference form (packed codes + multiplier) or training form (masters).

    `block_bytes` (static): unpacked int8 codes per block of the inference product; by default what suits
    JAX's default backend (packed.default_block_bytes). Sharding sets 0: blocks would cut across the rows
    that a mesh splits over devices (sharding.shard_model).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        mode: str = INFERENCE,
        rngs: nnx.Rngs | None = None,
        block_bytes: int | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"BitLinear mode must be one of {MODES}, not {mode!r}")
        if out_features % packed_ops.VALUES_PER_BYTE or out_features <= 0:
            raise ValueError(
                f"BitLinear with {out_features} output features: packed codes hold {packed_ops.VALUES_PER_BYTE} "
                f"output rows per byte, so out_features must be a positive multiple of {packed_ops.VALUES_PER_BYTE}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.block_bytes = packed_ops.default_block_bytes() if block_bytes is None else block_bytes
        if mode == INFERENCE:
            # Placeholders (code 1 = value 0 in every field): real codes come from a checkpoint
            # (bitnet_model.params) or `export_inference`.
            rows = out_features // packed_ops.VALUES_PER_BYTE
            self.packed = Quantized(jnp.full((rows, in_features), 0b01010101, jnp.uint8))
            self.multiplier = Quantized(jnp.ones((), jnp.float32))
        else:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            init = jax.nn.initializers.normal(stddev=0.02)
            self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> f32 [..., out]
        if self.mode == TRAINING:
            return ternary_linear_ste(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        x_q, scale = quantize_activations(x)
        return packed_ternary_matmul(
            x_q, scale, self.packed[...], self.multiplier[...], block_bytes=self.block_bytes
        )
