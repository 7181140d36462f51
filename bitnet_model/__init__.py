"""The JAX/Flax NNX model of BitNet b1.58 (W1.58A8) that validates every conversion and generates text.

    import bitnet_convert
    model = bitnet_convert.load_model("./2b4t-flax")      # any checkpoint bitnet-convert reads
    logits = model(jnp.array([[128000, 1502, 25]]))     # [B, T, V] float32

It stands on bitnet_core alone (no file format): `params.model_from_checkpoint` builds a model from a Checkpoint.
Modules: `bitlinear` (the W1.58A8 product, the one place quantization happens, with the RMSNorm and activations
it fuses), `modeling` (RMSNorm, Attention, MLP, DecoderLayer, BitNetModel, BitNetForCausalLM; rope and
attention functions), `params` (Checkpoint <-> model), `training` (export of trained masters to the inference
form), `packed` (2-bit codes and their exact product), `engine` (the same modules' functions over stacked
packed layers in one scan, with the KV cache: prefill and decode), `generation` (sampling, the Generator,
greedy continuation), `native` (CPU kernels behind the BitLinear product and prefill attention), `sharding`.

Attributes are imported lazily, so importing the package does not import JAX.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "BitLinear": "bitnet_model.bitlinear",
    "INFERENCE": "bitnet_model.bitlinear",
    "TRAINING": "bitnet_model.bitlinear",
    "BitNetForCausalLM": "bitnet_model.modeling",
    "BitNetModel": "bitnet_model.modeling",
    "logits": "bitnet_model.modeling",
    "Generator": "bitnet_model.generation",
    "greedy_generate": "bitnet_model.generation",
    "model_from_checkpoint": "bitnet_model.params",
    "checkpoint_from_model": "bitnet_model.params",
    "export_inference": "bitnet_model.training",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitnet_model' has no attribute {name!r}")
