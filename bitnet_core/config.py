"""Model hyper-parameters, read from a checkpoint's own `config.json`.

transformers' `BitNetConfig` defaults differ from the real checkpoints' (max_position_embeddings, tied
embeddings), so every field is read from the file and nothing is taken from a library default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Architectures we compute exactly, name -> has sub-norms. Llama-family BitNets (Falcon3-1.58bit, Falcon-E,
# Llama3-8B-1.58) have none; "BitnetForCausalLM" (lower-case n) is the 1bitLLM models' remote-code class: 2B4T's
# arithmetic with SiLU and fp16 latent weights quantized at run time (docs/formats.md §7).
BITNET_ARCHITECTURES = {"BitNetForCausalLM": True, "LlamaForCausalLM": False, "BitnetForCausalLM": True}
LATENT_ARCHITECTURE = "BitnetForCausalLM"
DEFAULT_ACTIVATION = {"BitNetForCausalLM": "relu2", "LlamaForCausalLM": "silu", "BitnetForCausalLM": "silu"}
MODEL_TYPES = {"BitNetForCausalLM": "bitnet", "LlamaForCausalLM": "llama", "BitnetForCausalLM": "llama"}
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
        """Every field from `cfg` (a parsed config.json), each of the JSON type it must have, or ConfigError
        naming the field; ranges are checked by `bitnet_core.validate.model_config`."""
        if not isinstance(cfg, Mapping):
            raise ConfigError("config is not a JSON object")
        arch = _architecture(cfg)
        hidden = _integer(cfg, "hidden_size")
        heads = _integer(cfg, "num_attention_heads")
        if heads <= 0:
            raise ConfigError(f"num_attention_heads is {heads}, must be positive")
        act = _text(cfg, "hidden_act", DEFAULT_ACTIVATION[arch])
        if act not in ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {act!r:.60} (expected one of {ACTIVATIONS})")
        rope = _object(cfg, "rope_parameters")
        _check_rope_type(_object(cfg, "rope_scaling"), "rope_scaling")
        _check_rope_type(rope, "rope_parameters")
        return cls(
            vocab_size=_integer(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_integer(cfg, "intermediate_size"),
            num_hidden_layers=_integer(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_integer(cfg, "num_key_value_heads", heads),
            head_dim=_integer(cfg, "head_dim", hidden // heads),
            rms_norm_eps=_number(cfg, "rms_norm_eps", 1e-5),
            rope_theta=_number(rope, "rope_theta", _number(cfg, "rope_theta", 10000.0), "rope_parameters.rope_theta"),
            max_position_embeddings=_integer(cfg, "max_position_embeddings", 4096),
            hidden_act=act,
            tie_word_embeddings=_boolean(cfg, "tie_word_embeddings", False),
            sub_norms=BITNET_ARCHITECTURES[arch],
            architecture=arch,
            bos_token_id=_token_ids(cfg, "bos_token_id", allow_list=False),
            eos_token_id=_token_ids(cfg, "eos_token_id", allow_list=True),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict (without quantization_config) describing this model; for models
        that never had a checkpoint (trained from scratch). Loaded models keep their checkpoint's own dict."""
        return {
            "architectures": [self.architecture],
            "model_type": MODEL_TYPES[self.architecture],
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


# ------------------------------------------------------------------------------- fields, each of one JSON type
# A missing key or a JSON null takes the default (as transformers does); any other type is refused, so that
# "12" or true is never silently read as a size and a float is never truncated to one.


def _present(cfg: Mapping, key: str, default):
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"lacks {key!r}")
        return None
    return value


_REQUIRED = object()


def _json_type(value) -> str:
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", int: "an integer",
             float: "a number"}
    return names.get(type(value), type(value).__name__)


def _integer(cfg: Mapping, key: str, default=_REQUIRED) -> int:
    value = _present(cfg, key, default)
    return default if value is None else _as_integer(value, key)


def _as_integer(value, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{label} is {_json_type(value)} ({_preview(value)}), expected an integer")
    return value


def _number(cfg: Mapping, key: str, default=_REQUIRED, label: str | None = None) -> float:
    value = _present(cfg, key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{label or key} is {_json_type(value)} ({_preview(value)}), expected a number")
    try:
        return float(value)
    except OverflowError:  # an integer beyond the float range
        raise ConfigError(f"{label or key} is {_preview(value)}, beyond the float range") from None


def _boolean(cfg: Mapping, key: str, default: bool) -> bool:
    value = _present(cfg, key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{key} is {_json_type(value)} ({_preview(value)}), expected true or false")
    return value


def _text(cfg: Mapping, key: str, default: str) -> str:
    value = _present(cfg, key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(f"{key} is {_json_type(value)} ({_preview(value)}), expected a string")
    return value


def _object(cfg: Mapping, key: str) -> Mapping:
    value = _present(cfg, key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} is {_json_type(value)}, expected an object")
    return value


def _check_rope_type(rope: Mapping, key: str) -> None:
    """Plain RoPE only: a scaled one (Llama-3.1's "llama3", linear, yarn, ...) changes every rotation angle, and
    computing it as plain RoPE would be silently wrong."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ConfigError(f"{key} of type {kind!r:.40} is not supported (only plain RoPE)")


def _architecture(cfg: Mapping) -> str:
    archs = cfg.get("architectures")
    if archs is None or archs == []:
        model_type = _text(cfg, "model_type", "")
        return _supported("BitNetForCausalLM" if model_type == "bitnet" else "?", cfg)
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"architectures is {_json_type(archs)} ({_preview(archs)}), expected a list of "
                          "architecture names")
    return _supported(archs[0], cfg)


def _supported(arch: str, cfg: Mapping) -> str:
    if arch not in BITNET_ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {arch!r:.60} (expected one of {sorted(BITNET_ARCHITECTURES)})")
    if arch == "LlamaForCausalLM":
        quant = _object(cfg, "quantization_config")
        if quant and quant.get("quant_method") != "bitnet":
            raise ConfigError(f"LlamaForCausalLM with quant_method {quant.get('quant_method')!r:.60} is not BitNet")
    return arch


def _token_ids(cfg: Mapping, key: str, *, allow_list: bool) -> int | list[int] | None:
    """A token id (or, for eos, a list of them: generation configs list several), or None."""
    value = cfg.get(key)
    if value is None:
        return None
    if allow_list and isinstance(value, list):
        return [_as_integer(item, f"{key}[{i}]") for i, item in enumerate(value)]
    return _integer(cfg, key)


def _preview(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

