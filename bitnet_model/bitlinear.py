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
  * inference: `codes` int8 [out, in] in {-1, 0, +1} and `multiplier` float32 [] (mean|W| of the masters).
    int8 rather than 2-bit packed in memory: unpacking in every forward measured 1.4-2x slower (5.1 vs 3.7 ms at
    64 tokens, 32 vs 19 ms at 512); the cost is 4x the memory of packed codes (2.1 GB vs 0.53 GB for 2B4T).
  * training: float32 master `weight` [out, in] (an nnx.Param). Absmean ternarization in the forward,
    `m = max(mean|W|, 1e-5)`, `T = clip(round(W / m), -1, 1)`, multiplier m, with a straight-through
    estimator on both the weight and the activation quantizer, as transformers' AutoBitLinear online mode.
    The forward value is computed by the very same integer path as inference, so a trained model exported to
    codes + multiplier (`ternarize`) gives bit-identical outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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
    """(x_q @ codes.T) / scale * multiplier with exact int32 accumulation. x_q int8 [..., in] -> f32 [..., out]."""
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
    """A bias-free W1.58A8 projection, in inference form (codes + multiplier) or training form (masters)."""

    def __init__(self, in_features: int, out_features: int, *, mode: str = INFERENCE, rngs: nnx.Rngs | None = None):
        if mode not in MODES:
            raise ValueError(f"BitLinear mode must be one of {MODES}, not {mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        if mode == INFERENCE:
            # Placeholders: real codes come from a checkpoint (bitnet_model.params) or `export_inference`.
            self.codes = Quantized(jnp.zeros((out_features, in_features), jnp.int8))
            self.multiplier = Quantized(jnp.ones((), jnp.float32))
        else:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            init = jax.nn.initializers.normal(stddev=0.02)
            self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> f32 [..., out]
        if self.mode == TRAINING:
            return ternary_linear_ste(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        x_q, scale = quantize_activations(x)
        return ternary_matmul(x_q, scale, self.codes[...], self.multiplier[...])
