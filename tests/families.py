"""Every BitNet family's Hugging Face folder, written *independently* of our HF writer, in the family's own
layout and config (docs/formats.md §7):

| family    | class (config.json)                  | projections                                 | sub-norm names           |
|-----------|--------------------------------------|---------------------------------------------|--------------------------|
| 2b4t      | BitNetForCausalLM, relu2, tied       | packed uint8 + bf16 weight_scale = w        | attn_sub_norm/ffn_sub_norm |
| falcon3   | LlamaForCausalLM + quant_method bitnet, modules_to_not_convert [lm_head], SiLU, untied | packed uint8 + bf16 weight_scale = 1/w | none |
| llama3-8b | as falcon3, Llama-3 rope base (HF1BitLLM/Llama3-8B-1.58)  | same                 | none                     |
| 1bitllm   | BitnetForCausalLM (remote code), model_type llama, no quantization_config, SiLU, tied; SentencePiece tokenizer.model | fp16 latent weights | inner_attn_ln/ffn_layernorm |

Values come from tiny_checkpoint (random, stable: multipliers ~1/sqrt(fan-in)) or, with `is_chaotic`, carry
2B4T-sized multipliers. Packing uses transformers' `pack_weights`; files are saved with safetensors' torch API.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.torch import save_file
from transformers.integrations.bitnet import pack_weights

from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Ternary
from fixtures import _torch, chaotic
from tokenizer_fixtures import sentencepiece_files

SIZES = {
    "parity": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "small": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4},
    # ik_llama.cpp's IQ2_BN asserts rows of >= 512 values; TQ blocks need multiples of 256
    "runtime": {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8},
}
FAMILY_CONFIG = {
    "2b4t": {"architecture": "BitNetForCausalLM", "hidden_act": "relu2", "tie_word_embeddings": True},
    "falcon3": {"architecture": "LlamaForCausalLM", "hidden_act": "silu", "tie_word_embeddings": False},
    "llama3-8b": {"architecture": "LlamaForCausalLM", "hidden_act": "silu", "tie_word_embeddings": False},
    "1bitllm": {"architecture": "BitnetForCausalLM", "hidden_act": "silu", "tie_word_embeddings": True},
}
FAMILIES = tuple(FAMILY_CONFIG)
# config.json fields each family ships beyond the model shape
EXTRA_CONFIG = {
    "2b4t": {"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                     "quantization_mode": "offline"}},
    "falcon3": {"model_type": "llama", "rope_theta": 1000042.0, "rope_scaling": None, "torch_dtype": "bfloat16",
                "quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]}},
    "llama3-8b": {"model_type": "llama", "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                  "quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": None}},
    "1bitllm": {"model_type": "llama", "torch_dtype": "float16", "input_bits": 8, "weight_bits": 1,
                "pad_token_id": 0, "rope_theta": 10000.0,
                "auto_map": {"AutoConfig": "configuration_bitnet.BitnetConfig",
                             "AutoModelForCausalLM": "modeling_bitnet.BitnetForCausalLM"}},
}
LATENT_NAMES = {".self_attn.attn_sub_norm.": ".self_attn.inner_attn_ln.", ".mlp.ffn_sub_norm.": ".mlp.ffn_layernorm."}


def write_family(path, family: str, *, size: str = "small", seed: int = 0, is_chaotic: bool = False) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    latent = family == "1bitllm"
    ckpt = tiny_checkpoint(seed=seed, masters=latent, **FAMILY_CONFIG[family], **SIZES[size])
    values = ckpt.materialize()
    if is_chaotic:
        values = chaotic(values, seed)
    inverse = family in ("falcon3", "llama3-8b")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        if isinstance(value, Ternary):
            tensors[name] = pack_weights(torch.from_numpy(value.codes.astype(np.float32)))
            scale = np.float32(1.0) / value.multiplier if inverse else value.multiplier
            tensors[name.replace(".weight", ".weight_scale")] = torch.tensor([float(scale)], dtype=torch.bfloat16)
        elif latent:  # 1bitLLM ships every tensor in float16
            stored = name
            for ours, theirs in LATENT_NAMES.items():
                stored = stored.replace(ours, theirs)
            tensors[stored] = _torch(np.asarray(value, np.float32).astype(np.float16))
        else:
            tensors[name] = _torch(value)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config.update(EXTRA_CONFIG[family])
    tokenizer = ckpt.tokenizer_files
    if latent:  # a Llama-2 style SentencePiece tokenizer.model (<unk> 0, <s> 1, </s> 2), as 1bitLLM ships
        tokenizer = sentencepiece_files(vocab_size=config["vocab_size"])
        config.update(bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for fname, data in tokenizer.items():
        (path / fname).write_bytes(data)
    return path


def as_bf16(value: np.ndarray) -> np.ndarray:
    return np.asarray(value, np.float32).astype(ml_dtypes.bfloat16)
