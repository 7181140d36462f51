"""Incremental decoding as pure, jitted functions of (graphdef, state): prefill, decode_step, greedy generation.

`graphdef` (hashable, static) and `state` come from `nnx.split(model)`; the cache is donated to every step so
XLA updates it in place. Prompts are padded on the right to a power of two (at least 16) so that prompts of
different lengths share a few compilations; the padded tail writes garbage cache slots past `length`, which
attention never reads and later tokens overwrite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cache import KVCache
from .modeling import BitNetForCausalLM

MIN_PREFILL = 16


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward(graphdef: nnx.GraphDef, state: nnx.State, token_ids: jax.Array) -> jax.Array:
    """Full causal forward without a cache: int [B, T] -> float32 logits [B, T, V]."""
    return nnx.merge(graphdef, state)(token_ids)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(
    graphdef: nnx.GraphDef, state: nnx.State, token_ids: jax.Array, prompt_length: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Run a (right-padded) prompt [B, P] into the cache; only its first `prompt_length` tokens count.

    Returns the logits [B, V] at the last real prompt token and the cache with length += prompt_length.
    """
    model = nnx.merge(graphdef, state)
    start = cache.length
    logits, cache = model.forward_cached(token_ids, cache)  # [B, P, V]
    last = jax.lax.dynamic_index_in_dim(logits, prompt_length - 1, axis=1, keepdims=False)  # [B, V]
    return last, KVCache(cache.keys, cache.values, start + prompt_length)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(
    graphdef: nnx.GraphDef, state: nnx.State, token_ids: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """One new token per row, int [B] -> (logits [B, V], cache with length + 1)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward_cached(token_ids[:, None], cache)
    return logits[:, 0], cache


def prefill_length(prompt_length: int) -> int:
    return max(MIN_PREFILL, 1 << (prompt_length - 1).bit_length())


def greedy_generate(
    model: BitNetForCausalLM, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None
) -> np.ndarray:
    """Greedy continuation of prompts int [B, T] (all the same length). Returns int32 [B, T + n] with n <=
    max_new_tokens: generation stops early once every row has produced `eos_token_id` (later tokens of
    finished rows are eos)."""
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    batch, length = prompt.shape
    padded = prefill_length(length)
    graphdef, state = nnx.split(model)
    cache = KVCache.init(model.config, batch, max(padded, length + max_new_tokens))
    tokens = np.zeros((batch, padded), np.int32)
    tokens[:, :length] = prompt
    logits, cache = prefill(graphdef, state, jnp.asarray(tokens), jnp.int32(length), cache)
    out = [prompt]
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        next_ids = np.asarray(jnp.argmax(logits, axis=-1), np.int32)  # [B]
        if eos_token_id is not None:
            next_ids = np.where(done, eos_token_id, next_ids)
            done |= next_ids == eos_token_id
        out.append(next_ids[:, None])
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = decode_step(graphdef, state, jnp.asarray(next_ids), cache)
    return np.concatenate(out, axis=1)


def logits(model: BitNetForCausalLM, token_ids) -> np.ndarray:
    """float32 logits [B, T, V] of int token ids [B, T] (jitted; no padding, no cache)."""
    graphdef, state = nnx.split(model)
    return np.asarray(forward(graphdef, state, jnp.asarray(np.asarray(token_ids), jnp.int32)))
