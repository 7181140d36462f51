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
# The BitNet-embedding encoders (docs/formats.md §12) are named by transformers' backbone classes that compute
# them ("Qwen3Model", "Gemma3TextModel"); their folders are recognized by `model_type`, as bitnet.cpp's embedding
# converter does, whatever `architectures` lists.
QWEN3, GEMMA3 = "Qwen3Model", "Gemma3TextModel"
EMBEDDING_MODEL_TYPES = {"qwen3": QWEN3, "gemma3_text": GEMMA3}
BITNET_ARCHITECTURES = {"BitNetForCausalLM": True, "LlamaForCausalLM": False, "BitnetForCausalLM": True,
                        QWEN3: False, GEMMA3: False}
LATENT_ARCHITECTURE = "BitnetForCausalLM"
DEFAULT_ACTIVATION = {"BitNetForCausalLM": "relu2", "LlamaForCausalLM": "silu", "BitnetForCausalLM": "silu",
                      QWEN3: "silu", GEMMA3: "gelu_pytorch_tanh"}
MODEL_TYPES = {"BitNetForCausalLM": "bitnet", "LlamaForCausalLM": "llama", "BitnetForCausalLM": "llama",
               QWEN3: "qwen3", GEMMA3: "gemma3_text"}
ACTIVATIONS = ("relu2", "silu", "gelu_pytorch_tanh")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
# transformers' Gemma3TextConfig values for keys a config leaves out (its rope thetas: global, local)
GEMMA3_DEFAULTS = {"sliding_window": 4096, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                   "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}


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
    eos_token_id: int | tuple[int, ...] | None = None  # a tuple, not a list: the config is a jit static argument
    # --- the BitNet-embedding encoders (docs/formats.md §12); the defaults are the causal LMs' arithmetic
    encoder: bool = False  # an embedding model: last hidden state, pooled and L2-normalized; no LM head
    use_rms_norm: bool = False  # an RMSNorm (plain w, eps rms_norm_eps) inside every BitLinear, on its input
    qk_norm: bool = False  # per-head RMSNorm of q and k (size head_dim) before RoPE
    unit_offset_norms: bool = False  # Gemma: the model's own RMSNorms scale by (1 + w), not w
    sandwich_norms: bool = False  # Gemma: post-attention and pre/post-feed-forward norms
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power (else head_dim's)
    layer_types: tuple[str, ...] = ()  # per layer FULL_ATTENTION or SLIDING_ATTENTION; () = all full
    sliding_window: int | None = None  # a sliding layer's query at t sees keys t - window < s <= t
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma3), else rope_theta

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Every field from `cfg` (a parsed config.json), each of the JSON type it must have, or ConfigError
        naming the field; ranges are checked by `bitnet_core.validate.model_config`."""
        if not isinstance(cfg, Mapping):
            raise ConfigError("config is not a JSON object")
        arch = _architecture(cfg)
        if arch in (QWEN3, GEMMA3):
            return _embedding_config(cfg, arch)
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
        if self.encoder:
            return _embedding_to_hf(self)
        return {
            **_shape_to_hf(self),
            "hidden_act": self.hidden_act,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
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
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in EMBEDDING_MODEL_TYPES:
        return EMBEDDING_MODEL_TYPES[model_type]
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


def _token_ids(cfg: Mapping, key: str, *, allow_list: bool) -> int | tuple[int, ...] | None:
    """A token id (or, for eos, a list of them: generation configs list several), or None."""
    value = cfg.get(key)
    if value is None:
        return None
    if allow_list and isinstance(value, list):
        return tuple(_as_integer(item, f"{key}[{i}]") for i, item in enumerate(value))
    return _integer(cfg, key)


def _preview(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."



# ------------------------------------------------------------------------- the BitNet-embedding encoders


def _embedding_config(cfg: Mapping, arch: str) -> ModelConfig:
    """Qwen3 (0.6B) or Gemma3 (270M) backbone with a BitLinear RMSNorm per projection (docs/formats.md §12).

    Keys and defaults are those of transformers' Qwen3Config / Gemma3TextConfig, which compute these models:
    Gemma's activation is `hidden_activation`; its rope bases are `rope_parameters` per layer type (transformers
    5) or `rope_theta` + `rope_local_base_freq` (4.x). Anything these models do not compute (logit softcapping,
    bidirectional attention, scaled RoPE) is refused rather than ignored.
    """
    gemma = arch == GEMMA3
    hidden = _integer(cfg, "hidden_size")
    heads = _integer(cfg, "num_attention_heads")
    if heads <= 0:
        raise ConfigError(f"num_attention_heads is {heads}, must be positive")
    act_key = "hidden_activation" if gemma and cfg.get("hidden_activation") is not None else "hidden_act"
    act = _text(cfg, act_key, DEFAULT_ACTIVATION[arch])
    if act == "gelu_tanh":  # the same function under its other name
        act = "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ConfigError(f"unsupported {act_key} {act!r:.60} (expected one of {ACTIVATIONS})")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ConfigError(f"{key} is set; logit soft-capping is not supported")
    if _boolean(cfg, "use_bidirectional_attention", False):
        raise ConfigError("use_bidirectional_attention is true; only causal attention is supported")
    for key in ("attention_bias", "mlp_bias"):
        if _boolean(cfg, key, False):
            raise ConfigError(f"{key} is true; BitNet projections have no bias")
    _check_rope_type(_object(cfg, "rope_scaling"), "rope_scaling")
    rope = _object(cfg, "rope_parameters")
    layers = _integer(cfg, "num_hidden_layers")
    if gemma:
        full = _object(rope, FULL_ATTENTION) if FULL_ATTENTION in rope else rope
        local = _object(rope, SLIDING_ATTENTION) if SLIDING_ATTENTION in rope else {}
        _check_rope_type(full, "rope_parameters")
        _check_rope_type(local, "rope_parameters")
        theta = _number(full, "rope_theta", _number(cfg, "rope_theta", GEMMA3_DEFAULTS["rope_theta"]),
                        "rope_parameters.rope_theta")
        local_theta = _number(local, "rope_theta", _number(cfg, "rope_local_base_freq",
                                                           GEMMA3_DEFAULTS["rope_local_base_freq"]),
                              "rope_parameters.sliding_attention.rope_theta")
        window = _integer(cfg, "sliding_window", GEMMA3_DEFAULTS["sliding_window"])
        pattern = _integer(cfg, "sliding_window_pattern", GEMMA3_DEFAULTS["sliding_window_pattern"])
        default_types = [SLIDING_ATTENTION if (i + 1) % max(pattern, 1) else FULL_ATTENTION for i in range(layers)]
    else:
        _check_rope_type(rope, "rope_parameters")
        theta = _number(rope, "rope_theta", _number(cfg, "rope_theta", 10000.0), "rope_parameters.rope_theta")
        local_theta = None
        window = _integer(cfg, "sliding_window", 4096) if _boolean(cfg, "use_sliding_window", False) else None
        first = _integer(cfg, "max_window_layers", 28)
        default_types = [SLIDING_ATTENTION if window is not None and i >= first else FULL_ATTENTION
                         for i in range(layers)]
    types = _layer_types(cfg, default_types, layers)
    if window is None or SLIDING_ATTENTION not in types:  # Qwen3 without use_sliding_window: all layers full
        types, window, local_theta = (FULL_ATTENTION,) * layers, None, None
    return ModelConfig(
        vocab_size=_integer(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_integer(cfg, "intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=_integer(cfg, "num_key_value_heads", heads),
        head_dim=_integer(cfg, "head_dim", 256 if gemma else hidden // heads),
        rms_norm_eps=_number(cfg, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        max_position_embeddings=_integer(cfg, "max_position_embeddings", 131_072 if gemma else 32_768),
        hidden_act=act,
        tie_word_embeddings=True,  # an encoder has no head; the tied table is the only one in the files
        sub_norms=False,
        architecture=arch,
        bos_token_id=_token_ids(cfg, "bos_token_id", allow_list=False),
        eos_token_id=_token_ids(cfg, "eos_token_id", allow_list=True),
        encoder=True,
        use_rms_norm=True,
        qk_norm=True,
        unit_offset_norms=gemma,
        sandwich_norms=gemma,
        scale_embeddings=gemma,
        query_pre_attn_scalar=(_number(cfg, "query_pre_attn_scalar", GEMMA3_DEFAULTS["query_pre_attn_scalar"])
                               if gemma else None),
        layer_types=types,
        sliding_window=window,
        rope_local_theta=local_theta,
    )


def _layer_types(cfg: Mapping, default: list[str], layers: int) -> tuple[str, ...]:
    value = cfg.get("layer_types")
    if value is None:
        return tuple(default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"layer_types is {_json_type(value)} ({_preview(value)}), expected a list of strings")
    if len(value) != layers:
        raise ConfigError(f"layer_types lists {len(value)} layers, num_hidden_layers is {layers}")
    odd = [v for v in value if v not in (FULL_ATTENTION, SLIDING_ATTENTION)]
    if odd:
        raise ConfigError(f"layer_types holds {odd[0]!r:.40} (expected {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r})")
    return tuple(value)


def _shape_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields every architecture writes alike: class, sizes, eps, context and token ids."""
    return {
        "architectures": [cfg.architecture],
        "model_type": MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    }


def _embedding_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    gemma = cfg.architecture == GEMMA3
    out: dict[str, Any] = {
        **_shape_to_hf(cfg),
        "hidden_activation" if gemma else "hidden_act": cfg.hidden_act,
        "tie_word_embeddings": True,
        "layer_types": list(cfg.layer_types),
    }
    if gemma:
        out.update(rope_theta=cfg.rope_theta, rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta,
                   sliding_window=cfg.sliding_window, query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    else:
        out.update(rope_theta=cfg.rope_theta, use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window)
    return out
