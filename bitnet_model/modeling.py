"""BitNet b1.58 decoder in Flax NNX: RMSNorm, Attention, MLP, DecoderLayer, BitNetModel, BitNetForCausalLM.

Module paths mirror the Hugging Face names (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`), so a
dense tensor's NNX state path *is* its HF name and a projection `X.weight` becomes `X.packed` (uint8 [out/4, in],
2-bit codes) + `X.multiplier` (inference) or `X.weight` (training masters). Covers BitNetForCausalLM (sub-norms, relu2) and Llama-family
BitNets (no sub-norms, SiLU), any GQA ratio, tied or untied embeddings. Everything but the int8 products in
BitLinear is float32; float products ask for HIGHEST precision so a GPU does not quietly use TF32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .bitlinear import INFERENCE, BitLinear
from .cache import KVCache
from .config import ModelConfig

PRECISION = jax.lax.Precision.HIGHEST
_ACTIVATIONS = {"relu2": lambda x: jnp.square(jax.nn.relu(x)), "silu": jax.nn.silu}


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, size: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + self.eps) * self.weight[...]


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

    def __call__(
        self,
        x: jax.Array,  # [B, T, H]
        cos: jax.Array,  # [T, D]
        sin: jax.Array,  # [T, D]
        query_pos: jax.Array,  # int32 [T] absolute positions of the T new tokens
        kv: tuple[jax.Array, jax.Array] | None = None,  # cached keys/values [B, S, KV, D], or None
        start: jax.Array | None = None,  # int32 [] where the new tokens go in `kv`
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if kv is None:  # plain forward: attend among the T new tokens
            keys, values, key_pos = k, v, query_pos
        else:  # write the new tokens into the cache, attend over every slot up to the query's position
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, start, 0, 0))
            key_pos = jnp.arange(keys.shape[1], dtype=jnp.int32)
        mask = key_pos[None, :] <= query_pos[:, None]  # [T, S]

        group = self.num_heads // self.num_kv_heads  # query head h reads kv head h // group, as HF repeat_kv
        q = q.reshape(B, T, self.num_kv_heads, group, self.head_dim)  # [B, T, KV, G, D]
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys, precision=PRECISION) * self.head_dim**-0.5
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)  # [B, KV, G, T, S]
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values, precision=PRECISION)
        out = out.reshape(B, T, self.num_heads * self.head_dim)  # [B, T, Hq*D]
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        return self.o_proj(out), (None if kv is None else (keys, values))


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)); BitNetForCausalLM normalizes the product (`ffn_sub_norm`) before `down_proj`."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.gate_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, mode=mode, rngs=rngs)
        self.up_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, mode=mode, rngs=rngs)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.hidden_size, mode=mode, rngs=rngs)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps) if cfg.sub_norms else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, H]
        h = _ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)  # [B, T, F]
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, mode=mode, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, mode=mode, rngs=rngs)

    def __call__(self, x, cos, sin, query_pos, kv=None, start=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, query_pos, kv, start)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class BitNetModel(nnx.Module):
    """Embedding, decoder layers and final norm: token ids [B, T] -> hidden states [B, T, H]."""

    def __init__(self, cfg: ModelConfig, *, mode: str, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, mode=mode, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, token_ids: jax.Array, cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        T = token_ids.shape[1]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        query_pos = start + jnp.arange(T, dtype=jnp.int32)  # [T]
        cos, sin = rope_tables(query_pos, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(token_ids)  # [B, T, H]
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, cos, sin, query_pos, kv, start)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        if cache is not None:
            cache = KVCache(tuple(keys), tuple(values), cache.length + T)
        return self.norm(x), cache


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
        h, _ = self.model(token_ids)
        return self._logits(h)

    def forward_cached(self, token_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run token ids [B, T] at positions cache.length ..; returns logits [B, T, V] and the extended cache."""
        h, cache = self.model(token_ids, cache)
        return self._logits(h), cache

    def _logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)
