"""llama.cpp, reading the tokenizer metadata we write, gives the token ids transformers gives from the source
files: for the real Llama-3 tokenizer (2B4T, HF1BitLLM), a Falcon3-style BPE and a Llama-2-style SentencePiece
(1bitLLM), on texts that break tokenizers (spaces, newlines, tabs, accents, CJK, emoji, digit runs, special
tokens inside text, the empty string).

The GGUF holds only the tokenizer and the few architecture keys llama.cpp reads before it (vocab_only=True loads
no tensors). Needs llama-cpp-python (optional extra `llama`); skipped without it.

A known difference of llama.cpp's SentencePiece tokenizer, not tested for: it cuts user-defined pieces out of
the text before tokenizing and puts its dummy-prefix space in front of the text after them, where sentencepiece
keeps them inline ("a <|user|> x": llama.cpp "▁▁x" after it, sentencepiece "▁x"; at the start of a text
sentencepiece puts "▁" in front of the piece, llama.cpp after it).
"""

import re

import pytest

from bitnet_convert.formats import tokenizer_files
from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf.bulk import BulkGGUFWriter
from tokenizer_fixtures import HARD_TEXTS, falcon3_style_files, real_llama3_files, save, sentencepiece_files

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp

# llama.cpp's "llama" architecture keys it reads with the vocabulary (any small model will do)
ARCH_KEYS = {"context_length": 256, "embedding_length": 64, "block_count": 1, "feed_forward_length": 128,
             "attention.head_count": 4}


def vocab_only_gguf(files: dict[str, bytes], n_vocab: int, path) -> str:
    tokenizer_files.check(files, lambda name: name)
    vocab = gguf_tokenizer.vocab_from_files(files, {}, n_vocab, "src")
    writer = BulkGGUFWriter(str(path), "llama")
    for key, value in ARCH_KEYS.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    vocab.add_to(writer)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.close()
    return str(path)


def assert_same_ids(files: dict[str, bytes], n_vocab: int, texts: list[str], tmp_path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(save(files, tmp_path / "hf"))
    llm = llama_cpp.Llama(model_path=vocab_only_gguf(files, n_vocab, tmp_path / "v.gguf"), vocab_only=True,
                          verbose=False)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=add_bos, special=True) == hf(text)["input_ids"], repr(text)


def test_real_llama3_tokenizer(tmp_path):
    files = real_llama3_files()
    texts = HARD_TEXTS + ["<|begin_of_text|>User: How are you?<|eot_id|>Assistant: ", "a<|eot_id|>\n\nb"]
    assert_same_ids(files, 128256, texts, tmp_path)


def test_falcon3_style_tokenizer(tmp_path):
    files = falcon3_style_files()
    vocab = gguf_tokenizer.vocab_from_files(files, {}, 512, "src")
    assert vocab.pre == "llama-bpe" and not vocab.add_bos  # llama.cpp's LLAMA3 default adds BOS: the key must win
    texts = HARD_TEXTS + [">>TITLE<<Falcon\n>>ABSTRACT<< text<|endoftext|>", "x<|im_end|>  y"]
    assert_same_ids(files, 512, texts, tmp_path)


def legacy_sentencepiece_ids(sp, text: str, controls: list[str]) -> list[int]:
    """What the model was trained with: sentencepiece on each stretch of text between control tokens (each
    stretch gets SentencePiece's dummy-prefix space, as transformers' legacy Llama tokenizer did)."""
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, controls)) + ")", text):
        ids += [sp.piece_to_id(part)] if part in controls else sp.encode(part) if part else []
    return ids


def test_sentencepiece_tokenizer(tmp_path):
    """The reference is sentencepiece itself. transformers 5 turns tokenizer.model into a tokenizers pipeline
    (Metaspace) that cuts at every U+2581, so it splits leading runs of spaces differently from sentencepiece
    (' ': ['▁'] where sentencepiece and llama.cpp give ['▁▁']); it is compared on the other texts."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    files = sentencepiece_files()
    sp = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"])
    llm = llama_cpp.Llama(model_path=vocab_only_gguf(files, 400, tmp_path / "v.gguf"), vocab_only=True,
                          verbose=False)
    controls = ["<s>", "</s>", "<unk>"]
    with_specials = ["<s>special</s> tokens</s>\n<s>  x", "</s>x\n\n</s> <unk>"]
    for text in HARD_TEXTS + with_specials:
        expected = [sp.bos_id()] + legacy_sentencepiece_ids(sp, text, controls)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, repr(text)
    hf = AutoTokenizer.from_pretrained(save(files, tmp_path / "hf"))
    for text in HARD_TEXTS:
        if not text.startswith(" "):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], repr(text)
