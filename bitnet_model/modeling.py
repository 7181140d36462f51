"""BitNet b1.58 decoder in Flax NNX: RMSNorm, Attention, MLP, DecoderLayer, BitNetModel, BitNetForCausalLM.

Module paths mirror the Hugging Face names (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`), so a
dense tensor's NNX state path *is* its HF name and a projection `X.weight` becomes `X.packed` (uint8 [out/4, in],
2-bit codes) + `X.multiplier` (inference) or `X.weight` (training masters). Covers BitNetForCausalLM (sub-norms, relu2) and Llama-family
BitNets (no sub-norms, SiLU), any GQA ratio, tied or untied embeddings. Everything but the int8 products in
BitLinear is float32; float products ask for HIGHEST precision so a GPU does not quietly use TF32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitnet_core.config import ModelConfig
from bitnet_model import native
from bitnet_model.bitlinear import ACTIVATIONS, INFERENCE, BitLinear, rms_norm

PRECISION = jax.lax.Precision.HIGHEST


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, size: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


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


def attention(q, k, v, cached_k, cached_v, start, head_dim: int, query_block: int) -> jax.Array:
    """q [B, T, Hq, D], new k/v [B, T, KV, D], cached k/v [B, S, KV, D] or None -> [B, T, Hq*D].

    The new tokens attend causally among themselves and to the cache slots before `start`; that is the
    reference's masked attention over the updated cache, split in two so the cache is only read here.
    Query head h reads kv head h // G (G = Hq / KV), as HF's repeat_kv.
    """
    B, T, Hq, D = q.shape
    KV = k.shape[2]
    G = Hq // KV
    lowest = jnp.finfo(jnp.float32).min
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [T, T]
    if cached_k is None and 0 < query_block < T:
        # Prefill: per kv head and block of `query_block` queries, one [G*Tq, D] x [D, Tk] product over the keys
        # up to the block's last query only (causal: keys after it are masked anyway). XLA's CPU backend runs
        # these plain batched products far faster than 5-d einsums that need transposed operands, and skipping
        # the masked keys saves ~40% at 512 tokens (BENCHMARKS.md, design measurements).
        qg = q.reshape(B, T, KV, G, D).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
        blocks = []
        for t0 in range(0, T, query_block):
            t1 = min(T, t0 + query_block)
            rows = qg[:, :, :, t0:t1].reshape(B, KV, G * (t1 - t0), D)  # row g*Tq + t: head g, query t0 + t
            scores = jnp.einsum("bkmd,bksd->bkms", rows, kt[:, :, :t1], precision=PRECISION) * head_dim**-0.5
            probs = jax.nn.softmax(jnp.where(jnp.tile(causal[t0:t1, :t1], (G, 1)), scores, lowest), axis=-1)
            out = jnp.einsum("bkms,bksd->bkmd", probs, vt[:, :, :t1], precision=PRECISION)
            blocks.append(out.reshape(B, KV, G, t1 - t0, D))
        out = jnp.concatenate(blocks, axis=3)  # [B, KV, G, T, D]
        return out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq * D)
    if cached_k is None:  # all queries at once: the masked [T, T] attention of the reference model
        q = q.reshape(B, T, KV, G, D)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=PRECISION) * head_dim**-0.5
        probs = jax.nn.softmax(jnp.where(causal, scores, lowest), axis=-1)  # [B, KV, G, T, T]
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=PRECISION)
        return out.reshape(B, T, Hq * D)
    q = q.reshape(B, T, KV, G, D)
    S = cached_k.shape[1]
    new = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=PRECISION) * head_dim**-0.5  # [B, KV, G, T, T]
    new = jnp.where(causal, new, lowest)
    old = jnp.einsum("btkgd,bskd->bkgts", q, cached_k, precision=PRECISION) * head_dim**-0.5  # [B,KV,G,T,S]
    old = jnp.where(jnp.arange(S) < start, old, lowest)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :S], cached_v, precision=PRECISION)
    out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], v, precision=PRECISION)
    return out.reshape(B, T, Hq * D)


def rotary_attention(q, k, v, cos, sin, cached_k=None, cached_v=None, start=None, *, query_block: int = 0,
                     native_kernel: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RoPE on q [B, T, Hq, D] and k [B, T, KV, D], then `attention`: -> (out [B, T, Hq*D], rotated k, v).

    k and v come back as the cache holds them (cast to its dtype). With `native_kernel` a prompt (no cache) runs
    in the CPU kernel of bitnet_model.native, which rotates q and k itself (float32, summed in another order).
    """
    if native_kernel and cached_k is None:
        attn, k = native.causal_attention(q, k, v, cos, sin)
        return attn, k, v
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cached_k is not None:
        k, v = k.astype(cached_k.dtype), v.astype(cached_v.dtype)  # attend to what the cache will hold
    return attention(q, k, v, cached_k, cached_v, start, q.shape[-1], query_block), k, v


class Attention(nnx.Module):
    """Causal grouped-query attention; BitNetForCausalLM adds `attn_sub_norm` before `o_proj`."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = BitLinear(cfg.hidden_size, cfg.q_size, mode=mode, rngs=rngs)
        self.k_proj = BitLinear(cfg.hidden_size, cfg.kv_size, mode=mode, rngs=rngs)
        self.v_proj = BitLinear(cfg.hidden_size, cfg.kv_size, mode=mode, rngs=rngs)
        self.o_proj = BitLinear(cfg.q_size, cfg.hidden_size, mode=mode, rngs=rngs)
        self.attn_sub_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sub_norms else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, H]
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        out, _, _ = rotary_attention(q, k, v, cos, sin)  # [B, T, Hq*D]
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        return self.o_proj(out)


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)); BitNetForCausalLM normalizes the product (`ffn_sub_norm`) before `down_proj`."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.gate_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, mode=mode, rngs=rngs)
        self.up_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, mode=mode, rngs=rngs)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.hidden_size, mode=mode, rngs=rngs)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps) if cfg.sub_norms else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, H]
        h = ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)  # [B, T, F]
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, mode=mode, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, mode=mode, rngs=rngs)

    def __call__(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNetModel(nnx.Module):
    """Embedding, decoder layers and final norm: token ids [B, T] -> hidden states [B, T, H]."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, mode=mode, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, token_ids: jax.Array) -> jax.Array:  # int [B, T] -> f32 [B, T, H]
        T = token_ids.shape[1]
        cos, sin = rope_tables(jnp.arange(T, dtype=jnp.int32), self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(token_ids)  # [B, T, H]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


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
        return self.head(self.model(token_ids))

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
