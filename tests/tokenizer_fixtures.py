"""Tokenizers of each BitNet family, built here (no network): Llama-2-style SentencePiece (1bitLLM), a
Falcon3-style byte-level BPE, and the real-size Llama-3 tokenizer from shared/data when it is beside the checkout."""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

import pytest

# beside the checkout, or where LLAMA3_TOKENIZER_DIR points (a checkout in a worktree folder)
REAL_LLAMA3 = Path(os.environ.get("LLAMA3_TOKENIZER_DIR") or
                   Path(__file__).resolve().parents[2] / "shared" / "data" / "llama3-tokenizer")

CORPUS = [
    "The quick brown fox jumps over the lazy dog 1234567 times!! It's   fine, isn't it?",
    "héllo wörld, naïve café; Ünïcödé accents everywhere.",
    "数据科学和机器学习 日本語のテキスト 한국어 텍스트",
    "tabs\tand\r\nnewlines\n\n  indented code:\n    def f(x):\n        return x * 2\n",
    "numbers 0 1 2 3 42 3.14159 2026-12-02 100,000,000",
] * 20

# Hard cases for any tokenizer: leading and repeated spaces, newlines and tabs, accents, CJK, emoji, digit runs,
# special tokens inside text, the empty string.
HARD_TEXTS = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "multiple     inner   spaces",
    "\n\nnewlines\n\n\nand\ttabs\t\tmixed \t \n",
    "héllo wörld naïve café Ünïcödé",
    "数据科学 日本語 한국어",
    "emoji 🙂🚀 and 👩‍👩‍👧 family ✅",
    "digits 1 12 123 1234 12345 1234567890 3.14",
    "It's   fine, isn't it? WON'T don't",
]


def _sentencepiece_model(**overrides) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    settings = dict(  # Llama 2's trainer settings, at toy size
        model_type="bpe", vocab_size=400, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, character_coverage=1.0,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        user_defined_symbols=["<|user|>"],
    )
    settings.update(overrides)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, minloglevel=2, **settings)
    return out.getvalue()


@functools.cache
def sentencepiece_model_bytes(**overrides) -> bytes:
    return _sentencepiece_model(**overrides)


def sentencepiece_files(**overrides) -> dict[str, bytes]:
    """tokenizer.model + tokenizer_config.json as 1bitLLM's bitnet_b1_58 ship them (Llama 2 style)."""
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False}
    return {"tokenizer.model": sentencepiece_model_bytes(**overrides),
            "tokenizer_config.json": json.dumps(config).encode()}


def falcon3_style_files(vocab_size: int = 500) -> dict[str, bytes]:
    """A byte-level BPE laid out like Falcon3's: Llama 3's split regex, special tokens at the lowest ids
    (>>TITLE<< ...), ids of the end-of-text token as EOS, and no BOS added by the post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from bitnet_convert.formats.gguf.tokenizer import LLAMA3_REGEX

    specials = [">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", "<|pad|>", "<|endoftext|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
              "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def qwen3_style_files(vocab_size: int) -> dict[str, bytes]:
    """A byte-level BPE laid out like Qwen3's: its split regex (GGUF pre-tokenizer `qwen2`), merges applied to
    whole words too, `<|endoftext|>` / `<|im_start|>` / `<|im_end|>` after the trained tokens, no BOS, and
    `<|im_end|>` as tokenizer_config's EOS (bitnet.cpp's converter overrides it with `<|endoftext|>`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from bitnet_convert.formats.gguf.tokenizer import QWEN2_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def real_llama3_files() -> dict[str, bytes]:
    if not (REAL_LLAMA3 / "tokenizer.json").is_file():
        pytest.skip(f"the real-size Llama-3 tokenizer is not beside the checkout ({REAL_LLAMA3})")
    return {name: (REAL_LLAMA3 / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}


def save(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder
