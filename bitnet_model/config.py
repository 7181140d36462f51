"""Model hyper-parameters, read from a checkpoint's own `config.json`.

transformers' `BitNetConfig` defaults differ from the real checkpoints' (max_position_embeddings, tied
embeddings), so every field is read from the file and nothing is taken from a library default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Architectures we compute exactly. Llama-family BitNets (Falcon3-1.58bit, Llama3-8B-1.58) have no sub-norms.
BITNET_ARCHITECTURES = {"BitNetForCausalLM": True, "LlamaForCausalLM": False}  # name -> has sub-norms
ACTIVATIONS = ("relu2", "silu")


class ConfigError(ValueError):
    """config.json does not describe a BitNet model we can run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    hidden_act: str  # "relu2" or "silu"
    tie_word_embeddings: bool
    sub_norms: bool  # attn_sub_norm / ffn_sub_norm present (BitNetForCausalLM)
    architecture: str = "BitNetForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or ["BitNetForCausalLM" if cfg.get("model_type") == "bitnet" else "?"]
        arch = archs[0]
        if arch not in BITNET_ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {arch!r} (expected one of {sorted(BITNET_ARCHITECTURES)})")
        if arch == "LlamaForCausalLM":
            quant = cfg.get("quantization_config") or {}
            if quant and quant.get("quant_method") != "bitnet":
                raise ConfigError(f"LlamaForCausalLM with quant_method {quant.get('quant_method')!r} is not BitNet")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            if heads <= 0:
                raise ConfigError(f"num_attention_heads is {heads}, must be positive")
            act = cfg.get("hidden_act", "relu2" if arch == "BitNetForCausalLM" else "silu")
            if act not in ACTIVATIONS:
                raise ConfigError(f"unsupported hidden_act {act!r} (expected one of {ACTIVATIONS})")
            rope = cfg.get("rope_parameters") or {}
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            head_dim = cfg.get("head_dim") or hidden // heads
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                hidden_act=act,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sub_norms=BITNET_ARCHITECTURES[arch],
                architecture=arch,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
            )
        except KeyError as missing:
            raise ConfigError(f"config.json lacks {missing.args[0]!r}") from None
        except (TypeError, ValueError) as bad:
            if isinstance(bad, ConfigError):
                raise
            raise ConfigError(f"config.json has a malformed value: {bad}") from None

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict (without quantization_config) describing this model; for models
        that never had a checkpoint (trained from scratch). Loaded models keep their checkpoint's own dict."""
        return {
            "architectures": [self.architecture],
            "model_type": "bitnet" if self.architecture == "BitNetForCausalLM" else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim
