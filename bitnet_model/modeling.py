"""BitNet b1.58 decoder in Flax NNX: RMSNorm, Attention, MLP, DecoderLayer, BitNetModel, BitNetForCausalLM.

Module paths mirror the Hugging Face names (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`), so a
dense tensor's NNX state path *is* its HF name and a projection `X.weight` becomes `X.packed` (uint8 [out/4, in],
2-bit codes) + `X.multiplier` (inference) or `X.weight` (training masters). Covers BitNetForCausalLM (sub-norms, relu2) and Llama-family
BitNets (no sub-norms, SiLU), any GQA ratio, tied or untied embeddings, and the BitNet-embedding encoders
(Qwen3 / Gemma3 backbones: an RMSNorm inside every BitLinear, q/k norms, Gemma's (1 + w) and sandwich norms,
GELU(tanh), scaled embeddings, sliding-window layers; `embed` pools and L2-normalizes). Everything but the int8 products in
BitLinear is float32; float products ask for HIGHEST precision so a GPU does not quietly use TF32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitnet_core.config import SLIDING_ATTENTION, ModelConfig
from bitnet_model import native
from bitnet_model import bitlinear
from bitnet_model.bitlinear import ACTIVATIONS, INFERENCE, BitLinear, rms_norm

PRECISION = jax.lax.Precision.HIGHEST


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32; Gemma's (`unit_offset`) scales by 1 + weight
    (its weights are stored around 0)."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False):
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nnx.Param(jnp.zeros((size,), jnp.float32) if unit_offset else jnp.ones((size,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.weight[...].astype(jnp.float32)
        return rms_norm(x, 1.0 + weight if self.unit_offset else weight, self.eps)


class Embedding(nnx.Module):
    """Token embedding table [V, H]; with tied embeddings it is also the output projection."""

    def __init__(self, vocab_size: int, hidden_size: int, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=0.02)
        self.weight = nnx.Param(init(rngs.params(), (vocab_size, hidden_size), jnp.float32))

    def __call__(self, token_ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, H]
        return jnp.take(self.weight[...], token_ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, V]
        return jnp.einsum("bth,vh->btv", h, self.weight[...], precision=PRECISION)


class LMHead(nnx.Module):
    """Untied output projection, a plain float matrix [V, H] (BitNet keeps the head unquantized)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=0.02)
        self.weight = nnx.Param(init(rngs.params(), (vocab_size, hidden_size), jnp.float32))

    def __call__(self, h: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, V]
        return jnp.einsum("bth,vh->btv", h, self.weight[...], precision=PRECISION)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, D] for integer positions [T], in the rotate-half (NeoX) layout: frequencies repeated twice."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, D] rotated by position: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def attention(q, k, v, cached_k, cached_v, start, head_dim: int, query_block: int, *, scale: float | None = None,
              window: int | None = None, rounding: str | None = None) -> jax.Array:
    """q [B, T, Hq, D], new k/v [B, T, KV, D], cached k/v [B, S, KV, D] or None -> [B, T, Hq*D].

    Scores are scaled by `scale` (default head_dim^-1/2). With a sliding `window` (the prompt form only), the
    query at t sees the keys at t - window < s <= t, as transformers' sliding layers.

    The new tokens attend causally among themselves and to the cache slots before `start`; that is the
    reference's masked attention over the updated cache, split in two so the cache is only read here.
    Query head h reads kv head h // G (G = Hq / KV), as HF's repeat_kv.

    `rounding` (verify's model of a runtime, the prompt form only): q, k and v rounded as
    bitlinear.round_activations does, as a runtime's F16 K/V cache and its F16 score product take them.
    """
    B, T, Hq, D = q.shape
    if rounding is not None:
        if cached_k is not None or 0 < query_block < T:
            raise ValueError("a rounded attention is computed by the one-block prompt attention only")
        q, k, v = (bitlinear.round_activations(a, rounding) for a in (q, k, v))
    KV = k.shape[2]
    G = Hq // KV
    lowest = jnp.finfo(jnp.float32).min
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [T, T]
    if window is not None:
        if cached_k is not None or 0 < query_block < T:
            raise ValueError("a sliding window is computed by the one-block prompt attention only")
        causal = causal & (jnp.arange(T)[:, None] - jnp.arange(T)[None, :] < window)
    scale = head_dim**-0.5 if scale is None else scale
    if cached_k is None and 0 < query_block < T:
        # Prefill: per kv head and block of `query_block` queries, one [G*Tq, D] x [D, Tk] product over the keys
        # up to the block's last query only (causal: keys after it are masked anyway). XLA's CPU backend runs
        # these plain batched products far faster than 5-d einsums that need transposed operands, and skipping
        # the masked keys saves much of a long prompt's attention (BENCHMARKS.md, design measurements).
        qg = q.reshape(B, T, KV, G, D).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
        blocks = []
        for t0 in range(0, T, query_block):
            t1 = min(T, t0 + query_block)
            rows = qg[:, :, :, t0:t1].reshape(B, KV, G * (t1 - t0), D)  # row g*Tq + t: head g, query t0 + t
            scores = jnp.einsum("bkmd,bksd->bkms", rows, kt[:, :, :t1], precision=PRECISION) * scale
            probs = jax.nn.softmax(jnp.where(jnp.tile(causal[t0:t1, :t1], (G, 1)), scores, lowest), axis=-1)
            out = jnp.einsum("bkms,bksd->bkmd", probs, vt[:, :, :t1], precision=PRECISION)
            blocks.append(out.reshape(B, KV, G, t1 - t0, D))
        out = jnp.concatenate(blocks, axis=3)  # [B, KV, G, T, D]
        return out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq * D)
    if cached_k is None:  # all queries at once: the masked [T, T] attention of the reference model
        q = q.reshape(B, T, KV, G, D)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=PRECISION) * scale
        probs = jax.nn.softmax(jnp.where(causal, scores, lowest), axis=-1)  # [B, KV, G, T, T]
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=PRECISION)
        return out.reshape(B, T, Hq * D)
    q = q.reshape(B, T, KV, G, D)
    S = cached_k.shape[1]
    new = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=PRECISION) * scale  # [B, KV, G, T, T]
    new = jnp.where(causal, new, lowest)
    old = jnp.einsum("btkgd,bskd->bkgts", q, cached_k, precision=PRECISION) * scale  # [B,KV,G,T,S]
    old = jnp.where(jnp.arange(S) < start, old, lowest)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :S], cached_v, precision=PRECISION)
    out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], v, precision=PRECISION)
    return out.reshape(B, T, Hq * D)


def rotary_attention(q, k, v, cos, sin, cached_k=None, cached_v=None, start=None, *, query_block: int = 0,
                     native_kernel: bool = False, scale: float | None = None, window: int | None = None,
                     rounding: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RoPE on q [B, T, Hq, D] and k [B, T, KV, D], then `attention`: -> (out [B, T, Hq*D], rotated k, v).

    k and v come back as the cache holds them (cast to its dtype). With `native_kernel` a prompt (no cache) runs
    in the CPU kernel of bitnet_model.native, which rotates q and k itself (float32, summed in another order).
    """
    if native_kernel and cached_k is None and scale is None and window is None and rounding is None:
        attn, k = native.causal_attention(q, k, v, cos, sin)
        return attn, k, v
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cached_k is not None:
        k, v = k.astype(cached_k.dtype), v.astype(cached_v.dtype)  # attend to what the cache will hold
    return attention(q, k, v, cached_k, cached_v, start, q.shape[-1], query_block, scale=scale, window=window,
                     rounding=rounding), k, v


class Attention(nnx.Module):
    """Causal grouped-query attention; BitNetForCausalLM adds `attn_sub_norm` before `o_proj`, the embedding
    encoders per-head `q_norm` / `k_norm` before RoPE (and Gemma3 a sliding window on some layers)."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs, sliding: bool = False):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        eps = cfg.rms_norm_eps if cfg.use_rms_norm else None
        self.q_proj = BitLinear(cfg.hidden_size, cfg.q_size, mode=mode, rngs=rngs, norm_eps=eps)
        self.k_proj = BitLinear(cfg.hidden_size, cfg.kv_size, mode=mode, rngs=rngs, norm_eps=eps)
        self.v_proj = BitLinear(cfg.hidden_size, cfg.kv_size, mode=mode, rngs=rngs, norm_eps=eps)
        self.o_proj = BitLinear(cfg.q_size, cfg.hidden_size, mode=mode, rngs=rngs, norm_eps=eps)
        self.attn_sub_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sub_norms else None
        qk = (lambda: RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.unit_offset_norms)) if cfg.qk_norm else (lambda: None)
        self.q_norm, self.k_norm = qk(), qk()
        self.scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
        self.window = cfg.sliding_window if sliding else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, H]
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        window = self.window if self.window is not None and self.window < T else None  # else: plain causal
        out, _, _ = rotary_attention(q, k, v, cos, sin, scale=self.scale, window=window,
                                     rounding=bitlinear.probed().attention)  # [B, T, Hq*D]
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        return self.o_proj(out)


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)); BitNetForCausalLM normalizes the product (`ffn_sub_norm`) before `down_proj`."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        eps = cfg.rms_norm_eps if cfg.use_rms_norm else None
        self.gate_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, mode=mode, rngs=rngs, norm_eps=eps)
        self.up_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, mode=mode, rngs=rngs, norm_eps=eps)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.hidden_size, mode=mode, rngs=rngs, norm_eps=eps)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps) if cfg.sub_norms else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, H]
        h = ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)  # [B, T, F]
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block. With sandwich norms (Gemma3) `post_attention_layernorm` normalizes the
    attention output, `pre_feedforward_layernorm` is the FFN's input norm and `post_feedforward_layernorm`
    normalizes its output; otherwise `post_attention_layernorm` is the FFN's input norm."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs, layer: int = 0):
        sliding = bool(cfg.layer_types) and cfg.layer_types[layer] == SLIDING_ATTENTION and cfg.sliding_window is not None
        norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, cfg.unit_offset_norms)
        self.sliding = sliding
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, mode=mode, rngs=rngs, sliding=sliding)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm() if cfg.sandwich_norms else None
        self.post_feedforward_layernorm = norm() if cfg.sandwich_norms else None
        self.mlp = MLP(cfg, mode=mode, rngs=rngs)

    def __call__(self, x, cos, sin):
        if self.pre_feedforward_layernorm is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class BitNetModel(nnx.Module):
    """Embedding, decoder layers and final norm: token ids [B, T] -> hidden states [B, T, H]."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, mode=mode, rngs=rngs, layer=i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.unit_offset_norms)

    def __call__(self, token_ids: jax.Array) -> jax.Array:  # int [B, T] -> f32 [B, T, H]
        x = self.embed(token_ids)
        for layer, (cos, sin) in zip(self.layers, self.rope(token_ids.shape[1]), strict=True):
            x = layer(x, cos, sin)
        return self.norm(x)

    def embed(self, token_ids: jax.Array) -> jax.Array:  # int [B, T] -> f32 [B, T, H]: the first layer's input
        x = self.embed_tokens(token_ids)
        if self.config.scale_embeddings:  # Gemma: sqrt(hidden) in float32, as transformers' float32 model
            x = x * np.float32(np.sqrt(self.config.hidden_size))
        return x

    def rope(self, length: int) -> list[tuple[jax.Array, jax.Array]]:
        """(cos, sin) for positions 0..length-1, per layer: Gemma3's sliding layers rotate with their own base."""
        cfg = self.config
        positions = jnp.arange(length, dtype=jnp.int32)
        full = local = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        if cfg.rope_local_theta is not None and cfg.rope_local_theta != cfg.rope_theta:
            local = rope_tables(positions, cfg.head_dim, cfg.rope_local_theta)
        return [local if layer.sliding else full for layer in self.layers]


class BitNetForCausalLM(nnx.Module):
    """The language model: `model(token_ids)` -> float32 logits [B, T, V].

    `mode` is "inference" (2-bit packed ternary codes + multipliers, frozen) or "training" (float32 masters).
    `stored_dtypes` remembers the checkpoint dtype of each dense tensor (norms and embeddings are float32 here
    but bf16 in 2B4T), so exporting writes them back bit-exactly; `hf_config` is the checkpoint's config.json.
    """

    def __init__(self, cfg: ModelConfig, *, mode: str = INFERENCE, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.mode = mode
        self.model = BitNetModel(cfg, mode=mode, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.stored_dtypes: tuple[tuple[str, str], ...] = ()  # (HF name, numpy dtype name), set by params.py
        self.hf_config_json: str | None = None  # the source checkpoint's config.json (static, so a string)

    def __call__(self, token_ids: jax.Array) -> jax.Array:  # int [B, T] -> f32 [B, T, V]
        return self.head(bitlinear.round_activations(self.model(token_ids), bitlinear.probed().head_input))

    def head(self, h: jax.Array) -> jax.Array:  # final hidden states [B, T, H] -> f32 logits [B, T, V]
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef: nnx.GraphDef, state: nnx.State, token_ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(token_ids)


def logits(model: BitNetForCausalLM, token_ids) -> np.ndarray:
    """float32 logits [B, T, V] of int token ids [B, T]: the full causal forward, jitted (no padding, no cache)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(np.asarray(token_ids), jnp.int32)))


# ----------------------------------------------------------------------------- embeddings (encoder models)
# Batches are right-padded: attention is causal, so no real token ever sees a padding token after it, and
# every other operation (norms, the per-token activation quantizer) is per token: a padded row computes
# exactly what the unpadded sequence does. Pooling then reads the real tokens only.

from bitnet_core.pooling import POOLINGS  # noqa: E402  (the one list of modes)
NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize (sentence-transformers' Normalize)


def pool(hidden: jax.Array, lengths: jax.Array, pooling: str) -> jax.Array:
    """hidden [B, T, H], int lengths [B] (real tokens, from position 0) -> [B, H]: the mean over the real tokens,
    the last real token, or the first one ("cls")."""
    if pooling == "mean":
        mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)  # [B, T]
        total = jnp.einsum("bth,bt->bh", hidden, mask, precision=PRECISION)
        return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    if pooling == "last":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORMALIZE_EPS)


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "normalize"))
def _embed(graphdef, state, token_ids, lengths, pooling: str, normalize: bool):
    hidden = nnx.merge(graphdef, state).model(token_ids)
    pooled = pool(hidden, lengths, pooling)
    return l2_normalize(pooled) if normalize else pooled


def embed(model: BitNetForCausalLM, token_ids, lengths, *, pooling: str, normalize: bool = True) -> np.ndarray:
    """Sentence embeddings [B, H] float32 of right-padded int token ids [B, T] with `lengths` [B] real tokens:
    the encoder's last hidden state (after the final norm), pooled, L2-normalized (jitted)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.asarray(token_ids), jnp.int32)
    return np.asarray(_embed(graphdef, state, ids, jnp.asarray(np.asarray(lengths), jnp.int32), pooling, normalize))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hidden(graphdef, state, token_ids):
    return nnx.merge(graphdef, state).model(token_ids)


def hidden_states(model: BitNetForCausalLM, token_ids) -> np.ndarray:
    """The last hidden state [B, T, H] (after the final norm) of int token ids [B, T], jitted."""
    graphdef, state = nnx.split(model)
    return np.asarray(_hidden(graphdef, state, jnp.asarray(np.asarray(token_ids), jnp.int32)))
