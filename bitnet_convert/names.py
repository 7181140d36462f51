"""Every tensor a BitNet checkpoint holds, by name, with its shape and kind; and the GGUF names.

The Hugging Face names of `BitNetForCausalLM` are our canonical names in every format.
"""

from __future__ import annotations

import re

from bitnet_model.config import ModelConfig

from .checkpoint import DENSE, TERNARY

# Projection (HF suffix within a layer) -> (GGUF name within blk.N, (out, in) as a function of the config).
PROJECTIONS: dict[str, tuple[str, object]] = {
    "self_attn.q_proj": ("attn_q", lambda c: (c.q_size, c.hidden_size)),
    "self_attn.k_proj": ("attn_k", lambda c: (c.kv_size, c.hidden_size)),
    "self_attn.v_proj": ("attn_v", lambda c: (c.kv_size, c.hidden_size)),
    "self_attn.o_proj": ("attn_output", lambda c: (c.hidden_size, c.q_size)),
    "mlp.gate_proj": ("ffn_gate", lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.up_proj": ("ffn_up", lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.down_proj": ("ffn_down", lambda c: (c.hidden_size, c.intermediate_size)),
}

# Per-layer norms: HF suffix -> (GGUF name within blk.N, size, only in models with sub-norms).
LAYER_NORMS: dict[str, tuple[str, object, bool]] = {
    "input_layernorm": ("attn_norm", lambda c: c.hidden_size, False),
    "self_attn.attn_sub_norm": ("attn_sub_norm", lambda c: c.hidden_size, True),
    "post_attention_layernorm": ("ffn_norm", lambda c: c.hidden_size, False),
    "mlp.ffn_sub_norm": ("ffn_sub_norm", lambda c: c.intermediate_size, True),
}

# Whole-model tensors: HF name -> GGUF name.
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}.weight"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (logical shape, kind) for every tensor the model must have, in checkpoint order."""
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, cfg.hidden_size), DENSE)
    }
    for layer in range(cfg.num_hidden_layers):
        for suffix, (_, size, sub_only) in LAYER_NORMS.items():
            if sub_only and not cfg.sub_norms:
                continue
            out[layer_name(layer, suffix)] = ((size(cfg),), DENSE)
        for suffix, (_, shape) in PROJECTIONS.items():
            out[layer_name(layer, suffix)] = (tuple(shape(cfg)), TERNARY)
    out["model.norm.weight"] = ((cfg.hidden_size,), DENSE)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((cfg.vocab_size, cfg.hidden_size), DENSE)
    return out


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def is_projection(hf_name: str) -> bool:
    m = _LAYER_RE.match(hf_name)
    return m is not None and m.group(2) in PROJECTIONS


def hf_to_gguf(hf_name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `blk.3.ffn_down.weight`."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m:
        layer, suffix = m.groups()
        if suffix in PROJECTIONS:
            return f"blk.{layer}.{PROJECTIONS[suffix][0]}.weight"
        if suffix in LAYER_NORMS:
            return f"blk.{layer}.{LAYER_NORMS[suffix][0]}.weight"
    raise KeyError(f"no GGUF name for tensor {hf_name!r}")


_GGUF_TO_HF_SUFFIX = {gguf: hf for hf, (gguf, *_rest) in {**PROJECTIONS, **LAYER_NORMS}.items()}
_GGUF_GLOBAL_TO_HF = {g: h for h, g in GLOBAL_TENSORS.items()}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def gguf_to_hf(gguf_name: str) -> str:
    """`blk.3.ffn_down.weight` -> `model.layers.3.mlp.down_proj.weight`."""
    if gguf_name in _GGUF_GLOBAL_TO_HF:
        return _GGUF_GLOBAL_TO_HF[gguf_name]
    m = _BLK_RE.match(gguf_name)
    if m and m.group(2) in _GGUF_TO_HF_SUFFIX:
        return layer_name(int(m.group(1)), _GGUF_TO_HF_SUFFIX[m.group(2)])
    raise KeyError(f"no Hugging Face name for GGUF tensor {gguf_name!r}")
