"""The JAX/Flax NNX reference implementation of BitNet b1.58 (W1.58A8), used to validate every conversion.

    import bitnet_model
    model = bitnet_model.load("microsoft/bitnet-b1.58-2B-4T")   # or any folder/file bitnet-convert reads
    logits = model(jnp.array([[128000, 1502, 25]]))              # [B, T, V] float32
    ids = bitnet_model.greedy_generate(model, prompt_ids, max_new_tokens=32)

Modules: `bitlinear` (the only place quantization happens), `modeling` (RMSNorm, Attention, MLP, DecoderLayer,
BitNetModel, BitNetForCausalLM), `cache` (KV cache pytree), `decoding` (prefill / decode_step / greedy
generation as pure functions of (graphdef, state)), `params` (Checkpoint <-> model), `training` (export of
trained master weights to the inference form). For generation: `packed` (2-bit ternary weights and their exact
product), `engine` (the same forward over stacked packed layers in one scan: what `bitnet-convert generate`
runs), `sharding` (a ("data", "model") mesh: tensor parallel over heads / FFN columns, data parallel over rows).

Attributes are imported lazily: `bitnet_convert` imports `bitnet_model.config` for the config alone and must
not pay for importing JAX.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ModelConfig": "bitnet_model.config",
    "BitLinear": "bitnet_model.bitlinear",
    "INFERENCE": "bitnet_model.bitlinear",
    "TRAINING": "bitnet_model.bitlinear",
    "BitNetForCausalLM": "bitnet_model.modeling",
    "BitNetModel": "bitnet_model.modeling",
    "KVCache": "bitnet_model.cache",
    "prefill": "bitnet_model.decoding",
    "decode_step": "bitnet_model.decoding",
    "greedy_generate": "bitnet_model.decoding",
    "logits": "bitnet_model.decoding",
    "model_from_checkpoint": "bitnet_model.params",
    "checkpoint_from_model": "bitnet_model.params",
    "load": "bitnet_model.params",
    "export_inference": "bitnet_model.training",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitnet_model' has no attribute {name!r}")
