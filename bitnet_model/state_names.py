"""HF tensor names <-> NNX state keys of `BitNetForCausalLM` (no JAX import: the Flax format reader uses it).

Module paths mirror the Hugging Face names, so the table is short:
    dense tensor  `model.layers.0.input_layernorm.weight`  -> the same key
    projection    `model.layers.0.self_attn.q_proj.weight` -> `...q_proj.packed` + `...q_proj.multiplier` (inference)
                                                           -> `...q_proj.weight`                          (training)
(`packed`: uint8 [out/4, in], the ternary codes 2-bit packed four consecutive output rows per byte.)
A key is the state path joined with '.'; list indices (layer numbers) are path ints.
"""

from __future__ import annotations

PACKED = "packed"
MULTIPLIER = "multiplier"
WEIGHT = "weight"


def ternary_keys(hf_name: str) -> tuple[str, str]:
    """`X.weight` -> (`X.packed`, `X.multiplier`)."""
    base = hf_name.removesuffix("." + WEIGHT)
    return f"{base}.{PACKED}", f"{base}.{MULTIPLIER}"


def dense_key(hf_name: str) -> str:
    return hf_name


def hf_name_of(key: str) -> tuple[str, str]:
    """State key -> (HF name, role) with role one of PACKED, MULTIPLIER, WEIGHT."""
    base, _, leaf = key.rpartition(".")
    if leaf in (PACKED, MULTIPLIER):
        return f"{base}.{WEIGHT}", leaf
    return key, WEIGHT


def key_path(key: str) -> tuple[str | int, ...]:
    """`model.layers.3.mlp.up_proj.packed` -> ('model', 'layers', 3, 'mlp', 'up_proj', 'packed')."""
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def path_key(path) -> str:
    return ".".join(str(part) for part in path)
