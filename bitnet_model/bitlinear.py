"""BitLinear: the W1.58A8 projection. All of BitNet's quantization lives in this file.

Forward, in both weight modes (docs/formats.md §1):
    s   = 127 / max(|x|, 1e-5)                    per token, over the last axis
    x_q = clip(round(x * s), -128, 127)           int8; jnp.round is half-to-even like torch.round
    y   = (x_q @ T.T) / s * w                     T ternary codes [out, in], w the per-tensor multiplier

The integer product is computed exactly, int8 x int8 -> int32 (`lax.dot_general(preferred_element_type=int32)`):
bit-identical to float32 accumulation (sums stay below 2^24) and several times faster on XLA's CPU; XLA's CPU int8
dot of a single row takes a slow path, so one-token decode pads to two rows (BENCHMARKS.md, design measurements).

Weight modes:
  * inference: `packed` uint8 [out/4, in], the codes 2-bit packed four consecutive output rows per byte
    (packed.py's layout), and `multiplier` float32 [] (mean|W| of the masters). The product unpacks the codes
    block by block into an int8 x int8 -> int32 dot (`packed.packed_matmul`): a quarter of the memory (0.52 GB
    of ternary weights for 2B4T rather than 2.08 GB), exactly what the Flax format stores and the generation
    engine runs, at some cost in prefill speed against int8 codes held unpacked (BENCHMARKS.md, design
    measurements). out_features must be a multiple of 4 (every BitNet shape is): a model of other widths is refused here rather than padded, which would leak padding rows into the
    state, the file format and every consumer of it.
  * training: float32 master `weight` [out, in] (an nnx.Param). Absmean ternarization in the forward,
    `m = max(mean|W|, 1e-5)`, `T = clip(round(W / m), -1, 1)`, multiplier m, with a straight-through
    estimator on both the weight and the activation quantizer, as transformers' AutoBitLinear online mode.
    The codes are freshly made in every step, so they stay int8 (`ternary_matmul`: the same exact int32 dot
    without the unpack); a trained model exported to packed codes + multiplier (`export_inference`) gives
    bit-identical outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitnet_model import native
from bitnet_model import packed as packed_ops

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


def quantize_exact_product(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """As `quantize_activations`, rounding as bitnet.cpp's quantize_row_i8_s does (a verification reference):
    s = 127 / max(|x|, 1e-5) divided in double and rounded to float32, and q the exact product x·s rounded to
    nearest even. Its magic-number rounding `x·s + 1.5·2^23` is contracted into one FMA by GCC under
    -march=native, so the product is not rounded to float32 first: the two differ where float32(x·s) is exactly
    k + ½. A float32 product is exact in float64 (24 + 24 bits), so numpy computes it there, through a callback."""

    def exact(values):
        values = np.asarray(values, np.float32)
        peak = np.maximum(np.abs(values).max(axis=-1, keepdims=True).astype(np.float64), 1e-5)
        scale = (127.0 / peak).astype(np.float32)
        q = np.clip(np.rint(values.astype(np.float64) * scale.astype(np.float64)), ACT_MIN, ACT_MAX)
        return q.astype(np.int8), scale

    x = x.astype(jnp.float32)
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.int8), jax.ShapeDtypeStruct((*x.shape[:-1], 1), jnp.float32))
    return jax.pure_callback(exact, shapes, x)


def ternarize(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Absmean ternarization of master weights [out, in] -> (int8 codes [out, in], float32 multiplier [])."""
    weight = weight.astype(jnp.float32)
    # As transformers (and formats.hf.ternarize_master): multiply by scale = 1/m rather than divide by m, which
    # can round differently, and use 1/scale as the multiplier (its effective weight is T / scale).
    scale = 1.0 / jnp.maximum(jnp.mean(jnp.abs(weight)), EPS)
    codes = jnp.clip(jnp.round(weight * scale), -1, 1).astype(jnp.int8)
    return codes, 1.0 / scale


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * weight, in float32: the one RMSNorm (the model's modules and the engine)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * weight


ACTIVATIONS = {
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # Gemma's GELU, tanh form
}


def ternary_matmul(x_q: jax.Array, scale: jax.Array, codes: jax.Array, multiplier: jax.Array) -> jax.Array:
    """(x_q @ codes.T) / scale * multiplier with exact int32 accumulation. x_q int8 [..., in], int8 codes
    [out, in] -> f32 [..., out]. The training forward's product (codes made in the step, never packed)."""
    lead = x_q.shape[:-1]
    rows = x_q.reshape(-1, x_q.shape[-1])  # [N, in]
    n = rows.shape[0]
    if n == 1:  # XLA CPU's one-row int8 dot takes a slow path; two rows do not (design measurements)
        rows = jnp.concatenate([rows, rows])
    acc = packed_ops.int8_dot(rows, codes)[:n].reshape(*lead, codes.shape[0])  # int32 [..., out]
    return dequantize(acc, scale, multiplier)


def packed_ternary_matmul(x_q: jax.Array, scale: jax.Array, packed: jax.Array, multiplier: jax.Array, *,
                          block_bytes: int = 0, reduce_rows: int = 0) -> jax.Array:
    """As `ternary_matmul` with the codes held 2-bit packed (uint8 [out/4, in]): the inference product.

    Up to `reduce_rows` token rows take one fused multiply-reduce over the unpacked codes instead of the
    block-wise unpack + int8 dot: it reads only the packed bytes, which is what a GPU wants for decode (XLA's
    CPU reduce is not vectorized, so the CPU keeps reduce_rows 0). Both sums are exact int32."""
    if int(np.prod(x_q.shape[:-1])) <= reduce_rows:
        codes = packed_ops.unpack(packed).astype(jnp.int32)  # [out, in], fused into the reduce
        acc = jnp.sum(x_q.astype(jnp.int32)[..., None, :] * codes, axis=-1)
    else:
        acc = packed_ops.packed_matmul(x_q, packed, block_bytes=block_bytes)  # int32 [..., out], exact
    return dequantize(acc, scale, multiplier)


def dequantize(acc: jax.Array, scale: jax.Array, multiplier: jax.Array) -> jax.Array:
    """int32 sums [..., out] -> float32 `acc / s * w` (the native kernels compute exactly this, bit for bit)."""
    return acc.astype(jnp.float32) / scale * multiplier


def fused_bitlinear(h, names, p, m, *, native_kernel: bool = False, layer=None, norm=None, eps: float = 0.0,
                    act=None, up=None, residual=None, block_bytes: int = 0, reduce_rows: int = 0) -> list[jax.Array]:
    """BitLinear of one input through several projections of a layer: f32 [..., in] -> [f32 [..., out] per name].

    The input is first act(h) * up where `act` (a hidden_act name) and `up` are given, then RMSNorm'ed where
    `norm` (weight [in]) is; `residual` is added to the output of a single projection. XLA: those steps,
    quantize once, then `packed_ternary_matmul` each (p, m: this layer's packed codes and multipliers by name).
    `native_kernel`: one call into bitnet_model.native does it all, bit for bit the same product (p, m: the
    whole stacks [L, ...], `layer` the index; the kernel reads its layer in place, where a slice would copy).
    """
    if native_kernel:
        lead = h.shape[:-1]

        def rows(a):  # [..., width] -> [tokens, width], as the kernel takes it
            return None if a is None else a.reshape(-1, a.shape[-1])

        outs = native.bitlinear(rows(h), layer, [(p[name], m[name]) for name in names], norm=norm, eps=eps,
                                act=act, up=rows(up), residual=rows(residual))
        return [out.reshape(*lead, out.shape[-1]) for out in outs]
    if act is not None:
        h = ACTIVATIONS[act](h) * up
    if norm is not None:
        h = rms_norm(h, norm, eps)
    x_q, scale = quantize_activations(h)
    outs = [packed_ternary_matmul(x_q, scale, p[name], m[name], block_bytes=block_bytes, reduce_rows=reduce_rows)
            for name in names]
    if residual is None:
        return outs
    (out,) = outs  # a residual goes with one projection, as in the kernel
    return [residual + out]


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
    `norm_eps`: with a value, the layer first RMSNorms its input (`norm.weight` [in], plain w, this eps), as
    the BitNet-embedding models' BitLinear does (transformers' `use_rms_norm`; docs/formats.md §12).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        mode: str = INFERENCE,
        rngs: nnx.Rngs | None = None,
        block_bytes: int | None = None,
        norm_eps: float | None = None,
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
        self.norm = None if norm_eps is None else InputNorm(in_features, norm_eps)
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
        if self.norm is not None:
            x = self.norm(x)
        if _probe.inputs is not None:
            _probe.inputs.append(x)
        if _probe.forced is not None:
            x = _forced_input(x)
        if self.mode == TRAINING:
            return ternary_linear_ste(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        if not _probe.quantize:  # a verification run: the continuous function, float32 throughout
            weight = packed_ops.unpack(self.packed[...]).astype(jnp.float32) * self.multiplier[...]
            x = round_activations(x.astype(jnp.float32), _probe.float_activations)
            return jnp.einsum("...i,oi->...o", x, weight, precision=jax.lax.Precision.HIGHEST)
        x_q, scale = (quantize_exact_product if _probe.exact_product_rounding else quantize_activations)(x)
        return packed_ternary_matmul(
            x_q, scale, self.packed[...], self.multiplier[...], block_bytes=self.block_bytes
        )


class InputNorm(nnx.Module):
    """The RMSNorm inside a BitLinear (`use_rms_norm`): x / sqrt(mean(x^2) + eps) * weight, on the input of
    the activation quantizer."""

    def __init__(self, size: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


# How a runtime's float products see their float32 input (ggml converts it to the weight's `vec_dot_type`):
# rounded to nearest even in f16 / bf16 (F16C and ggml's bf16 conversion both do), or Q8_0: blocks of 32 values
# as round(x * 127 / max|x|) (half to even, as its AVX2 quantizer) times that block's d = max|x| / 127 in f16.
ROUNDINGS = ("f16", "bf16", "q8_0")
Q8_0_BLOCK = 32


def round_activations(x: jax.Array, rounding: str | None) -> jax.Array:
    """float32 x [..., in] as a runtime's product takes it (ROUNDINGS), back in float32; None: x itself."""
    if rounding is None:
        return x
    if rounding in ("f16", "bf16"):
        return x.astype(jnp.float16 if rounding == "f16" else jnp.bfloat16).astype(jnp.float32)
    if rounding != "q8_0":
        raise ValueError(f"unknown activation rounding {rounding!r} (choose from {', '.join(ROUNDINGS)})")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    inverse = jnp.where(amax > 0, ACT_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    d = (amax / ACT_MAX).astype(jnp.float16).astype(jnp.float32)
    return (jnp.round(blocks * inverse) * d).reshape(x.shape)


@dataclasses.dataclass
class _Probe:
    quantize: bool = True  # False: no activation quantization (x @ (T * w).T in float32)
    inputs: list | None = None  # when a list, every BitLinear appends its input, in call order
    float_activations: str | None = None  # with quantize False: BitLinear inputs rounded so first (ROUNDINGS)
    exact_product_rounding: bool = False  # the quantizer rounds the exact x·s (quantize_exact_product)
    attention: str | None = None  # "f16": Q/K/V after RoPE rounded to f16
    head_input: str | None = None  # the final hidden state rounded so before the head product (ROUNDINGS)
    # Teacher forcing: another implementation's input of each BitLinear, in call order, taken in place of the
    # model's own; `departures` gets, per call, the largest |theirs - own| / max|own| over the tokens.
    forced: list | None = None
    departures: list | None = None


_probe = _Probe()


def _forced_input(x: jax.Array) -> jax.Array:
    own = np.asarray(x, np.float32)  # eager only: the probe's documented use
    theirs = np.asarray(_probe.forced.pop(0), np.float32)
    if theirs.size != own.size:
        raise ValueError(f"a forced input of {theirs.size} values for a BitLinear input of {own.size}")
    theirs = theirs.reshape(own.shape)
    peak = np.maximum(np.abs(own).max(axis=-1, keepdims=True), EPS)
    _probe.departures.append(float((np.abs(theirs - own) / peak).max()))
    return jnp.asarray(theirs)


def probed() -> _Probe:
    """The probe's settings now (the model's modules read them when traced)."""
    return _probe


@contextlib.contextmanager
def probe(*, quantize: bool = True, record: bool = False, float_activations: str | None = None,
          exact_product_rounding: bool = False, attention: str | None = None, head_input: str | None = None,
          forced: list | None = None) -> Iterator[list | None]:
    """How `verify` looks inside the model: record every BitLinear's input (the activation quantizer's input, for
    rounding ties), switch activation quantization off (a continuous function, to compare implementations
    without ties), or compute under a runtime's roundings: its float products' inputs (`float_activations`, with
    quantize False), its quantizer's (`exact_product_rounding`), its f16 attention (`attention`), its head
    product's input (`head_input`); `forced` (a list, consumed) teacher-forces every BitLinear with another
    implementation's inputs, and the context yields the departures (see _Probe). Read when a call is traced:
    use it around eager (unjitted) calls."""
    saved = dataclasses.replace(_probe)
    _probe.quantize, _probe.inputs = quantize, ([] if record else None)
    _probe.float_activations, _probe.exact_product_rounding = float_activations, exact_product_rounding
    _probe.attention, _probe.head_input = attention, head_input
    _probe.forced, _probe.departures = (None, None) if forced is None else (list(forced), [])
    try:
        yield _probe.departures if forced is not None else _probe.inputs
    finally:
        for field in dataclasses.fields(_Probe):
            setattr(_probe, field.name, getattr(saved, field.name))
