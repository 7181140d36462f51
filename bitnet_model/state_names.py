"""HF tensor names <-> NNX state keys of `BitNetForCausalLM` (no JAX import: the Flax format reader uses it).

Module paths mirror the Hugging Face names, so the table is short:
    dense tensor  `model.layers.0.input_layernorm.weight`  -> the same key
    projection    `model.layers.0.self_attn.q_proj.weight` -> `...q_proj.codes` + `...q_proj.multiplier`  (inference)
                                                           -> `...q_proj.weight`                          (training)
A key is the state path joined with '.'; list indices (layer numbers) are path ints.
"""

from __future__ import annotations

CODES = "codes"
MULTIPLIER = "multiplier"
WEIGHT = "weight"


def ternary_keys(hf_name: str) -> tuple[str, str]:
    """`X.weight` -> (`X.codes`, `X.multiplier`)."""
    base = hf_name.removesuffix("." + WEIGHT)
    return f"{base}.{CODES}", f"{base}.{MULTIPLIER}"


def dense_key(hf_name: str) -> str:
    return hf_name


def hf_name_of(key: str) -> tuple[str, str]:
    """State key -> (HF name, role) with role one of CODES, MULTIPLIER, WEIGHT."""
    base, _, leaf = key.rpartition(".")
    if leaf in (CODES, MULTIPLIER):
        return f"{base}.{WEIGHT}", leaf
    return key, WEIGHT


def key_path(key: str) -> tuple[str | int, ...]:
    """`model.layers.3.mlp.up_proj.codes` -> ('model', 'layers', 3, 'mlp', 'up_proj', 'codes')."""
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def path_key(path) -> str:
    return ".".join(str(part) for part in path)
