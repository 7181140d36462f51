"""A deterministic tiny BitNet b1.58 model, built offline: for `make demo`, tests and benchmarks.

Sizes are the smallest that every format accepts: TQ1_0/TQ2_0 blocks need rows of a multiple of 256 values,
I2_S blocks 128, the HF 2-bit packing a multiple of 4 outputs.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np

from bitnet_core.checkpoint import Checkpoint, Ternary
from bitnet_core.config import ModelConfig
from bitnet_core.names import expected_tensors

BF16 = np.dtype(ml_dtypes.bfloat16)

# A byte-level BPE trained on this text; special tokens as in Llama 3 (2B4T's tokenizer).
_CORPUS = (
    "BitNet b1.58 is a large language model whose linear layers hold ternary weights: minus one, zero or one. "
    "Every activation is quantized to eight bits per token. The quick brown fox jumps over the lazy dog. "
    "User: How are you? Assistant: I am fine, thank you. Converting a model between formats must lose nothing."
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def tiny_tokenizer_files(vocab_size: int = 384) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json of a Llama-3-style byte-level BPE (BOS added, no EOS)."""
    return bpe_tokenizer_files([_CORPUS] * 4, vocab_size)


def bpe_tokenizer_files(texts: list[str], vocab_size: int) -> dict[str, bytes]:
    """A byte-level BPE trained on `texts` with Llama 3's special tokens, as tokenizer.json +
    tokenizer_config.json (BOS added, no EOS)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": "<|eot_id|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2).encode(),
    }


def tiny_config(
    vocab_size: int,
    *,
    hidden_act: str = "relu2",
    num_key_value_heads: int = 2,
    architecture: str = "BitNetForCausalLM",
    tie_word_embeddings: bool = True,
    num_hidden_layers: int = 2,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_attention_heads: int = 4,
) -> dict:
    """config.json (without quantization_config) of a tiny model shaped like 2B4T."""
    return {
        "architectures": [architecture],
        "model_type": "bitnet" if architecture == "BitNetForCausalLM" else "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "hidden_act": hidden_act,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 381,
        "eos_token_id": 383,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
    }


def tiny_checkpoint(seed: int = 0, masters: bool = False, **config_overrides) -> Checkpoint:
    """A random tiny model: ternary projections (density ~2/3) with bf16-exact multipliers ~1/sqrt(in),
    bf16 norms near 1 and bf16 embeddings. With `masters`, projections are bf16 master weights instead."""
    tokenizer = tiny_tokenizer_files()
    vocab = json.loads(tokenizer["tokenizer.json"])
    vocab_size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    config = tiny_config(vocab_size, **config_overrides)
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    config["bos_token_id"], config["eos_token_id"] = ids["<|begin_of_text|>"], ids["<|eot_id|>"]
    rng = np.random.default_rng(seed)
    arrays: dict[str, Ternary | np.ndarray] = {}
    for name, (shape, kind) in expected_tensors(ModelConfig.from_hf(config)).items():
        if kind == "ternary" and masters:
            arrays[name] = (rng.standard_normal(shape) * 0.05).astype(BF16)
        elif kind == "ternary":
            codes = rng.choice(np.array([-1, 0, 1], np.int8), size=shape, p=[1 / 3, 1 / 3, 1 / 3])
            # ~1/sqrt(fan-in) keeps every layer's output O(1), as in a trained model; with 2B4T's ~1.5 a
            # random tiny model is chaotic and one int8 rounding tie moves its logits by percents.
            multiplier = np.float32(np.float32(rng.uniform(0.5, 1.0) / np.sqrt(shape[1])).astype(BF16))
            arrays[name] = Ternary(codes, multiplier)
        elif len(shape) == 1:
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(BF16)
        else:
            arrays[name] = (rng.standard_normal(shape) * 0.5).astype(BF16)
    provenance = {"format": "tiny", "source": f"bitnet_convert.tiny seed={seed}"}
    return Checkpoint.from_arrays(config, arrays, tokenizer_files=tokenizer, provenance=provenance)
