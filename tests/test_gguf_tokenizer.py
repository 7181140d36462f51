"""The tokenizer through GGUF: same tokens, merges, special ids, and the same ids for any text."""

import json

import numpy as np
import pytest
from gguf import GGUFReader, TokenType
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from bitnet_convert.formats import gguf
from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
from bitnet_convert.tiny import SPECIAL_TOKENS, tiny_checkpoint
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.errors import ConvertError

TEXTS = [
    "User: How are you?<|eot_id|>Assistant: ",
    "The quick brown fox jumps over the lazy dog 1234567 times!!\n\n  It's   fine, isn't it?",
    "héllo wörld 🙂 <|begin_of_text|> tabs\tand\r\nnewlines",
    "",
]


def ids(tokenizer_json: bytes, text: str) -> list[int]:
    return Tokenizer.from_str(tokenizer_json.decode()).encode(text).ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = tiny_checkpoint(seed=0)
    path = gguf.write(ckpt, tmp_path_factory.mktemp("tok") / "m.gguf")
    return ckpt, path, gguf.read(path)


def test_metadata_in_the_file(tiny):
    ckpt, path, _ = tiny
    reader = GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    source = json.loads(ckpt.tokenizer_files["tokenizer.json"])
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == ckpt.config["vocab_size"]
    assert all(tokens[i] == text for text, i in source["model"]["vocab"].items())
    types = field("tokenizer.ggml.token_type")
    specials = {t["id"] for t in source["added_tokens"]}
    assert {i for i, t in enumerate(types) if t == TokenType.CONTROL} == specials
    assert all(t == TokenType.NORMAL for i, t in enumerate(types) if i not in specials)
    assert field("tokenizer.ggml.merges") == [" ".join(m) for m in source["model"]["merges"]]
    assert field("tokenizer.ggml.bos_token_id") == tokens.index("<|begin_of_text|>") == ckpt.config["bos_token_id"]
    assert field("tokenizer.ggml.eos_token_id") == tokens.index("<|eot_id|>") == ckpt.config["eos_token_id"]
    assert field("tokenizer.ggml.eot_token_id") == tokens.index("<|eot_id|>")
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    assert field("tokenizer.chat_template") == json.loads(ckpt.tokenizer_files["tokenizer_config.json"])["chat_template"]


def test_rebuilt_tokenizer_gives_the_same_ids(tiny):
    ckpt, _, back = tiny
    for text in TEXTS:
        assert ids(back.tokenizer_files["tokenizer.json"], text) == ids(ckpt.tokenizer_files["tokenizer.json"], text)
    rebuilt = json.loads(back.tokenizer_files["tokenizer.json"])
    assert [(t["id"], t["content"], t["special"]) for t in rebuilt["added_tokens"]] == [
        (381 + k, text, True) for k, text in enumerate(SPECIAL_TOKENS)
    ]
    config = json.loads(back.tokenizer_files["tokenizer_config.json"])
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|eot_id|>"
    assert config["add_bos_token"] is True


def test_transformers_loads_the_rebuilt_tokenizer(tiny, tmp_path):
    from transformers import AutoTokenizer

    ckpt, _, back = tiny
    for name, files in (("orig", ckpt.tokenizer_files), ("back", back.tokenizer_files)):
        (tmp_path / name).mkdir()
        for fname, data in files.items():
            (tmp_path / name / fname).write_bytes(data)
    orig, rebuilt = (AutoTokenizer.from_pretrained(tmp_path / n) for n in ("orig", "back"))
    for text in TEXTS:
        assert rebuilt(text)["input_ids"] == orig(text)["input_ids"]
    chat = [{"role": "user", "content": "How are you?"}]
    assert rebuilt.apply_chat_template(chat, add_generation_prompt=True) == orig.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert rebuilt.decode(rebuilt("héllo wörld")["input_ids"], skip_special_tokens=True) == "héllo wörld"


def llama3_style_files(vocab_size: int = 400) -> dict[str, bytes]:
    """A small tokenizer laid out like Llama 3's: regex Split + ByteLevel without regex, ignore_merges."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_tokenizer.LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(TEXTS) * 3, "12345 67890 don't WON'T\n\n\n"], trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def test_llama3_pre_tokenizer_is_llama_bpe():
    files = llama3_style_files()
    # older tokenizer_config.json files give special tokens as AddedToken dicts
    files["tokenizer_config.json"] = json.dumps({"eos_token": {"content": "<|eot_id|>", "special": True}}).encode()
    n = Tokenizer.from_str(files["tokenizer.json"].decode()).get_vocab_size()
    vocab = gguf_tokenizer.vocab_from_files(files, {}, n + 5, "t")
    assert vocab.pre == "llama-bpe" and vocab.add_bos and not vocab.add_eos
    assert vocab.tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)]
    assert vocab.token_types[n:] == [TokenType.UNUSED] * 5
    assert vocab.eos_id == vocab.tokens.index("<|eot_id|>") == vocab.eot_id
    assert vocab.bos_id == vocab.tokens.index("<|begin_of_text|>")  # not in the config: found via the template
    rebuilt = gguf_tokenizer.tokenizer_files(vocab, 4096, "t")
    assert json.loads(rebuilt["tokenizer.json"])["model"]["ignore_merges"] is True
    assert "[PAD" not in rebuilt["tokenizer.json"].decode()
    for text in TEXTS + ["1234567 won't\n\n\nx"]:
        assert ids(rebuilt["tokenizer.json"], text) == ids(files["tokenizer.json"], text)


def test_unknown_pre_tokenizer_refused():
    files = tiny_checkpoint().tokenizer_files
    tok = json.loads(files["tokenizer.json"])
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+|\D+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    bad = dict(files, **{"tokenizer.json": json.dumps(tok).encode()})
    with pytest.raises(ConvertError, match="matches no llama.cpp pre-tokenizer"):
        gguf_tokenizer.vocab_from_files(bad, {}, 384, "src")
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    with pytest.raises(ConvertError, match="'Metaspace' has no llama.cpp equivalent"):
        gguf_tokenizer.vocab_from_files(dict(files, **{"tokenizer.json": json.dumps(tok).encode()}), {}, 384, "src")


def test_tokenizer_larger_than_embedding_refused():
    with pytest.raises(ConvertError, match="only 300 rows"):
        gguf_tokenizer.vocab_from_files(tiny_checkpoint().tokenizer_files, {}, 300, "src")


def test_no_tokenizer_no_metadata(tmp_path):
    ckpt = tiny_checkpoint(seed=0)
    bare = Checkpoint(ckpt.config, ckpt.tensors, {}, ckpt.provenance)
    out = gguf.write(bare, tmp_path / "m.gguf", target="bitnet.cpp")
    assert GGUFReader(out).get_field("tokenizer.ggml.tokens") is None
    back = gguf.read(out)
    assert back.tokenizer_files == {}
    assert np.array_equal(back.load("model.layers.0.mlp.gate_proj.weight").codes,
                          ckpt.load("model.layers.0.mlp.gate_proj.weight").codes)


@pytest.mark.parametrize("name", ["falcon3", "falcon-h1", "falcon_e", "llama3", "llama-v3"])
def test_runtime_names_of_the_llama3_splitter_read_as_llama_bpe(name):
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    vocab = gguf_tokenizer.vocab_from_fields(keys.get, "f.gguf")
    assert vocab.pre == "llama-bpe"
    rebuilt = json.loads(gguf_tokenizer.tokenizer_files(vocab, 64, "f.gguf")["tokenizer.json"])
    assert rebuilt["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == gguf_tokenizer.LLAMA3_REGEX


def with_merges(merges) -> dict[str, bytes]:
    files = tiny_checkpoint().tokenizer_files
    tok = json.loads(files["tokenizer.json"])
    tok["model"]["merges"] = merges
    return dict(files, **{"tokenizer.json": json.dumps(tok).encode()})


def test_merge_of_an_unknown_token_refused():
    with pytest.raises(ConvertError, match=r"merge 'Ġ nowhere' names a token that is not in the vocabulary"):
        gguf_tokenizer.vocab_from_files(with_merges([["Ġ", "t"], ["Ġ", "nowhere"]]), {}, 384, "src")


def test_merge_of_a_token_holding_a_space_refused():
    files = with_merges([["a b", "c"]])
    tok = json.loads(files["tokenizer.json"])
    tok["model"]["vocab"].update({"a b": 999, "c": 998})
    files["tokenizer.json"] = json.dumps(tok).encode()
    with pytest.raises(ConvertError, match="joins a token holding a space"):
        gguf_tokenizer.vocab_from_files(files, {}, 1000, "src")


def test_merges_of_both_spellings_become_left_right_strings():
    vocab = gguf_tokenizer.vocab_from_files(with_merges(["Ġ t", ["Ġ", "a"]]), {}, 384, "src")
    assert vocab.merges == ["Ġ t", "Ġ a"]


def test_tokenizer_json_is_parsed_once_from_check_to_gguf(monkeypatch):
    from bitnet_convert.formats import tokenizer_files

    files = tiny_checkpoint().tokenizer_files
    calls = []
    original = tokenizer_files.parse_json
    monkeypatch.setattr(tokenizer_files, "parse_json", lambda data, label: calls.append(label) or original(data, label))
    tokenizer_files.clear_cache()
    tokenizer_files.check(files, lambda name: name)
    gguf_tokenizer.vocab_from_files(files, {}, 384, "src")
    assert sorted(calls) == sorted(name for name in files if name.endswith(".json"))


@pytest.mark.parametrize("pair,add_sep", [
    (None, None),  # no pair template: not said
    ([["bos", "A"], ["bos", "B"]], False),  # Llama 3: BOS between the texts
    ([["bos", "A", "eos"], ["eos", "B", "eos"]], True),  # a separator (EOS) between them, RoBERTa-style
])
def test_add_sep_token_as_llama_cpp_converter_decides(pair, add_sep):
    ckpt = tiny_checkpoint(seed=0)
    files = dict(ckpt.tokenizer_files)
    tok = json.loads(files["tokenizer.json"])
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    name = {"bos": bos, "eos": eos}
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    if pair is None:
        tok["post_processor"] = None
    else:
        def template(parts):
            return [{"Sequence": {"id": p, "type_id": 0}} if p in "AB" else
                    {"SpecialToken": {"id": name[p], "type_id": 0}} for group in parts for p in group]

        tok["post_processor"] = {
            "type": "TemplateProcessing", "single": template(pair[:1]), "pair": template(pair),
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in (bos, eos)}}
    files["tokenizer.json"] = json.dumps(tok).encode()
    config = dict(ckpt.config, eos_token_id=ids[eos])
    files["tokenizer_config.json"] = json.dumps({"bos_token": bos, "eos_token": eos}).encode()
    vocab = gguf_tokenizer.vocab_from_files(files, config, ckpt.config["vocab_size"], "t")
    assert vocab.add_sep is add_sep
