"""Tiny BitNet-embedding checkpoints (Qwen3 and Gemma3 backbones) in the real layout, written *independently* of
our HF writer: safetensors' torch API, names as bitnet.cpp's embedding converter reads them (no `model.` prefix,
bf16 latent masters, `<proj>.norm.weight` per projection, q/k norms, Gemma's sandwich norms; docs/formats.md §12),
sentence-transformers' `modules.json` + `1_Pooling/config.json` when a pooling mode is given, and a word-level
`tokenizer.json`.

Weights are stable (masters ~ N(0, 1/fan_in), BitLinear norms ~1, Gemma norms ~0 as it stores w of (1 + w)):
implementations then agree to float rounding except at activation rounding ties (docs/formats.md §10).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.torch import save_file

# Two sizes per backbone. head_dim is never hidden / heads (as in both real models); the Gemma ones have
# sliding layers whose window is far shorter than the test sequences.
SIZES = {
    "qwen3": {
        "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=96),
        "medium": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
                       num_key_value_heads=1, head_dim=64, vocab_size=128),
        # rows of 128-value multiples (I2_S blocks), a vocabulary a byte-level BPE fits in
        "i2s": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, vocab_size=320),
    },
    "gemma3": {
        "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=48, vocab_size=96, sliding_window=8,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        "medium": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=128, sliding_window=12,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
        "i2s": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=128, vocab_size=400, sliding_window=8,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    },
}
EOS = {"qwen3": "<|endoftext|>", "gemma3": "<eos>"}


def config_for(backbone: str, size: str) -> dict:
    dims = SIZES[backbone][size]
    if backbone == "qwen3":
        return {"architectures": ["Qwen3Model"], "model_type": "qwen3", **dims, "hidden_act": "silu",
                "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "tie_word_embeddings": True, "use_sliding_window": False, "attention_bias": False,
                "bos_token_id": None, "eos_token_id": 1, "torch_dtype": "bfloat16"}
    return {"architectures": ["Gemma3TextModel"], "model_type": "gemma3_text", **dims,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 24,
            "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0, "torch_dtype": "bfloat16"}


def tensors_for(backbone: str, size: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The checkpoint's tensors (bf16), under the names of the real files."""
    cfg = config_for(backbone, size)
    rng = np.random.default_rng(seed)
    H, F, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    gemma = backbone == "gemma3"

    def bf16(a):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)

    def model_norm(n):  # Gemma stores w of x * (1 + w)
        return bf16((0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(n))

    out = {"embed_tokens.weight": bf16(0.5 * rng.standard_normal((cfg["vocab_size"], H)))}
    projections = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
                   "self_attn.o_proj": (H, q), "mlp.gate_proj": (F, H), "mlp.up_proj": (F, H),
                   "mlp.down_proj": (H, F)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = model_norm(H)
        out[p + "post_attention_layernorm.weight"] = model_norm(H)
        if gemma:
            out[p + "pre_feedforward_layernorm.weight"] = model_norm(H)
            out[p + "post_feedforward_layernorm.weight"] = model_norm(H)
        out[p + "self_attn.q_norm.weight"] = model_norm(D)
        out[p + "self_attn.k_norm.weight"] = model_norm(D)
        for name, (rows, cols) in projections.items():
            out[p + name + ".weight"] = bf16(rng.standard_normal((rows, cols)) / np.sqrt(cols))
            out[p + name + ".norm.weight"] = bf16(1.0 + 0.1 * rng.standard_normal(cols))  # plain w
    out["norm.weight"] = model_norm(H)
    return out


def _torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)


def write_tokenizer(path: Path, backbone: str, vocab_size: int) -> None:
    """A word-level tokenizer.json: special tokens, then lower-case words; unknown words -> <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", EOS[backbone], "<bos>", "<unk>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials) - 8)] + ["hello", "world", "the", "cat", "sat",
                                                                           "on", "a", "mat"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS[backbone], "pad_token": "<pad>"}))


def write_gguf_tokenizer(path: Path, backbone: str, vocab_size: int) -> None:
    """The kind of tokenizer the real model has, which GGUF carries: Qwen3's byte-level BPE (tokenizer.json), a
    SentencePiece tokenizer.model for Gemma (GGUF tokenizer model `llama`)."""
    from tokenizer_fixtures import qwen3_style_files, save, sentencepiece_files

    if backbone == "qwen3":
        save(qwen3_style_files(vocab_size), path)
        return
    # Gemma's special ids (pad 0, eos 1, bos 2, unk 3: config_for's) and no dummy prefix
    save(sentencepiece_files(vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                             eos_piece="<eos>", bos_piece="<bos>", add_dummy_prefix=False), path)


def write_embedding_checkpoint(path, backbone: str = "qwen3", size: str = "small", seed: int = 0, *,
                               pooling: str | None = None, tokenizer: bool | str = True,
                               prefixed: bool = False) -> Path:
    """Write the tiny model to folder `path`; `pooling` ("mean", "lasttoken", "cls") adds sentence-transformers'
    modules.json + 1_Pooling/config.json; `prefixed` names tensors `model.*` (bitnet.cpp accepts both);
    `tokenizer="gguf"` writes the real kind of tokenizer (write_gguf_tokenizer) instead of the word-level one."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = config_for(backbone, size)
    tensors = {("model." if prefixed else "") + k: _torch(v) for k, v in tensors_for(backbone, size, seed).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer == "gguf":
        write_gguf_tokenizer(path, backbone, cfg["vocab_size"])
    elif tokenizer:
        write_tokenizer(path, backbone, cfg["vocab_size"])
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (path / "modules.json").write_text(json.dumps(modules, indent=2))
        (path / "1_Pooling").mkdir(exist_ok=True)
        chosen = {"mean": "mean_tokens", "cls": "cls_token", "lasttoken": "lasttoken"}[pooling]
        modes = {f"pooling_mode_{m}": m == chosen for m in ("cls_token", "mean_tokens", "max_tokens",
                                                          "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": cfg["hidden_size"], **modes, "include_prompt": True}, indent=2))
    return path
