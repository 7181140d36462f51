"""The row order of q_proj / k_proj under a GGUF architecture with interleaved RoPE (`llama`).

Hugging Face's Llama rotates halves: dimension i of a head pairs with i + head_dim/2. llama.cpp's `llama` graph
rotates adjacent pairs (2i, 2i+1), so every converter for that architecture reorders each head's output rows
(llama.cpp's and bitnet.cpp's `permute`): row 2i takes HF row i, row 2i+1 takes HF row i + head_dim/2. The
sub-norm architectures (`bitnet`, `bitnet-b1.58`) use NeoX RoPE, which is HF's order: no reordering there.
Reordering rows moves codes, never changes one: exact both ways.
"""

from __future__ import annotations

import numpy as np

from bitnet_core.errors import ConvertError

# HF suffix of a projection whose rows RoPE rotates -> config field holding its head count
ROTATED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}


def heads_of(hf_name: str, config: dict) -> int | None:
    """The head count to reorder `hf_name`'s rows by, or None for a projection RoPE does not touch."""
    for suffix, field in ROTATED.items():
        if hf_name.endswith(f".{suffix}.weight"):
            return int(config.get(field) or config["num_attention_heads"])
    return None


def _check(rows: np.ndarray, heads: int) -> int:
    if heads <= 0 or rows.shape[0] % (2 * heads):
        raise ConvertError(f"{rows.shape[0]} rows do not split into {heads} heads of an even size, as RoPE needs")
    return rows.shape[0]


def to_interleaved(rows: np.ndarray, heads: int) -> np.ndarray:
    """[out, in] in HF order -> llama.cpp's interleaved order."""
    out = _check(rows, heads)
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def from_interleaved(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of to_interleaved."""
    out = _check(rows, heads)
    return rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
