"""The key/value cache of incremental decoding: a pytree, so it can be donated to a jitted step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import ModelConfig


@dataclasses.dataclass
class KVCache:
    """Post-RoPE keys and values of every layer, for `length` tokens already run (the same for every row).

    Slots at positions >= length hold garbage (e.g. a padded prompt's tail); attention never reads a slot past
    the query's own position, and the next tokens overwrite them.
    """

    keys: tuple[jax.Array, ...]  # per layer [B, S, KV, D]
    values: tuple[jax.Array, ...]  # per layer [B, S, KV, D]
    length: jax.Array  # int32 [] number of positions filled

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in layers),
            values=tuple(jnp.zeros(shape, dtype) for _ in layers),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[1]


jax.tree_util.register_dataclass(KVCache, data_fields=["keys", "values", "length"], meta_fields=[])
