"""SentencePiece tokenizer.model <-> GGUF "llama" vocabulary: our protobuf reader and writer agree with the
sentencepiece library, the GGUF keys are what llama.cpp expects, and the rebuilt tokenizer.model tokenizes as the
original does (in sentencepiece and in transformers)."""

import json

import pytest
from gguf import GGUFReader, TokenType

from bitnet_convert.formats import sentencepiece_model, tokenizer_files
from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf.bulk import BulkGGUFWriter
from bitnet_core.errors import ConvertError
from tokenizer_fixtures import HARD_TEXTS, save, sentencepiece_files, sentencepiece_model_bytes

spm_lib = pytest.importorskip("sentencepiece")

N_VOCAB = 403  # 400 pieces, the added "<pad>" at 400, two rows of padding


def processor(data: bytes):
    return spm_lib.SentencePieceProcessor(model_proto=data)


def files_with_pad() -> dict[str, bytes]:
    files = sentencepiece_files()
    config = json.loads(files["tokenizer_config.json"])
    config.update(pad_token="<pad>", added_tokens_decoder={"400": {"content": "<pad>", "special": True}})
    return dict(files, **{"tokenizer_config.json": json.dumps(config).encode()})


def test_reader_agrees_with_sentencepiece():
    data = sentencepiece_model_bytes()
    model, sp = sentencepiece_model.parse(data, "t"), processor(data)
    assert len(model.pieces) == sp.get_piece_size() == 400
    assert model.pieces == [sp.id_to_piece(i) for i in range(400)]
    assert model.scores == [sp.get_score(i) for i in range(400)]
    kinds = {"is_unknown": 2, "is_control": 3, "is_unused": 5, "is_byte": 6}
    expected = [next((k for name, k in kinds.items() if getattr(sp, name)(i)), None) for i in range(400)]
    assert [None if t in (1, 4) else t for t in model.types] == expected
    assert model.types[model.pieces.index("<|user|>")] == sentencepiece_model.PieceType.USER_DEFINED
    assert model.types.count(sentencepiece_model.PieceType.BYTE) == 256
    assert (model.model_type, model.byte_fallback, model.add_dummy_prefix, model.remove_extra_whitespaces) == (
        sentencepiece_model.ModelType.BPE, True, True, False)
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (0, 1, 2, -1)


def test_writer_output_loads_in_sentencepiece_and_tokenizes_the_same():
    data = sentencepiece_model_bytes()
    model = sentencepiece_model.parse(data, "t")
    rewritten = sentencepiece_model.serialize(model)
    assert sentencepiece_model.parse(rewritten, "t") == model
    original, again = processor(data), processor(rewritten)
    for text in HARD_TEXTS:
        assert again.encode(text) == original.encode(text), text
    assert again.bos_id() == 1 and again.eos_id() == 2 and again.unk_id() == 0 and again.pad_id() == -1


def test_gguf_metadata(tmp_path):
    vocab = gguf_tokenizer.vocab_from_files(files_with_pad(), {}, N_VOCAB, "src")
    path = tmp_path / "v.gguf"
    writer = BulkGGUFWriter(str(path), "llama")
    vocab.add_to(writer)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.close()
    reader = GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    model = sentencepiece_model.parse(sentencepiece_model_bytes(), "t")
    assert field("tokenizer.ggml.model") == "llama"
    tokens, types, scores = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
    assert tokens == model.pieces + ["<pad>", "[PAD401]", "[PAD402]"]
    assert types == model.types + [TokenType.CONTROL, TokenType.UNUSED, TokenType.UNUSED]
    assert scores[:400] == pytest.approx(model.scores, abs=0) and scores[400:] == [-1000.0] * 3
    assert (types[0], types[1], types[2]) == (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL)
    assert tokens[3] == "<|user|>" and types[3] == TokenType.USER_DEFINED
    assert tokens[4:260] == [f"<0x{b:02X}>" for b in range(256)] and set(types[4:260]) == {TokenType.BYTE}
    ids = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 400}
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    assert field("tokenizer.ggml.add_space_prefix") is True
    assert reader.get_field("tokenizer.ggml.merges") is None


def gguf_round_trip(files: dict[str, bytes], tmp_path) -> dict[str, bytes]:
    vocab = gguf_tokenizer.vocab_from_files(files, {}, N_VOCAB, "src")
    path = tmp_path / "v.gguf"
    writer = BulkGGUFWriter(str(path), "llama")
    vocab.add_to(writer)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.close()
    reader = GGUFReader(path)
    back = gguf_tokenizer.vocab_from_fields(
        lambda key: None if reader.get_field(key) is None else reader.get_field(key).contents(), "v.gguf", N_VOCAB)
    assert back == vocab
    return gguf_tokenizer.tokenizer_files(back, 2048, "v.gguf")


def test_gguf_round_trip_tokenizes_the_same_in_sentencepiece(tmp_path):
    rebuilt = gguf_round_trip(files_with_pad(), tmp_path)
    assert set(rebuilt) == {"tokenizer.model", "tokenizer_config.json"}
    original, again = processor(sentencepiece_model_bytes()), processor(rebuilt["tokenizer.model"])
    assert again.get_piece_size() == 401  # the pieces, then <pad>; the padding rows are left out
    for text in HARD_TEXTS:
        assert again.encode(text) == original.encode(text), text
    tokenizer_files.check(rebuilt, lambda name: name)  # what a reader of the rebuilt folder checks
    assert gguf_tokenizer.vocab_from_files(rebuilt, {}, N_VOCAB, "again") == gguf_tokenizer.vocab_from_files(
        files_with_pad(), {}, N_VOCAB, "src")


def test_gguf_round_trip_tokenizes_the_same_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    rebuilt = gguf_round_trip(files_with_pad(), tmp_path)
    orig = AutoTokenizer.from_pretrained(save(files_with_pad(), tmp_path / "orig"))
    back = AutoTokenizer.from_pretrained(save(rebuilt, tmp_path / "back"))
    for text in HARD_TEXTS + ["<s>special</s> in <pad> text <|user|>x"]:
        assert back(text)["input_ids"] == orig(text)["input_ids"], text
    assert back.pad_token_id == 400 and back.bos_token_id == 1 and back.eos_token_id == 2


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "unigram", "vocab_size": 350}, "a SentencePiece UNIGRAM model"),
    ({"remove_extra_whitespaces": True}, "remove_extra_whitespaces is true"),
    ({"byte_fallback": False, "vocab_size": 100}, "byte_fallback is false"),
    ({"normalization_rule_name": "nmt_nfkc"}, "normalizer 'nmt_nfkc' rewrites text"),
])
def test_settings_llama_cpp_cannot_follow_are_refused(overrides, message):
    files = dict(sentencepiece_files(), **{"tokenizer.model": sentencepiece_model_bytes(**overrides)})
    with pytest.raises(ConvertError, match=message):
        gguf_tokenizer.vocab_from_files(files, {}, N_VOCAB, "src")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-3], "runs past the end"),
    (lambda b: b"\x0f" + b, "wire type 7"),
    (lambda b: b"", "it holds no pieces"),
    (lambda b: b"\x0a\x03\x0a\x01\xff" + b, "a piece at byte 4 is not UTF-8"),
    (lambda b: b"\x80" * 11, "longer than 10 bytes"),
])
def test_a_damaged_model_is_one_clear_error(damage, message):
    data = damage(sentencepiece_model_bytes())
    with pytest.raises(ConvertError, match=f"^src/tokenizer.model: not a SentencePiece model .*{message}") as info:
        tokenizer_files.check({"tokenizer.model": data}, lambda name: f"src/{name}")
    assert "\n" not in str(info.value)


def test_too_many_pieces_for_the_embedding_refused():
    with pytest.raises(ConvertError, match="400 pieces but the embedding has only 300 rows"):
        gguf_tokenizer.vocab_from_files(sentencepiece_files(), {}, 300, "src")


def test_byte_level_tokenizer_json_wins_over_tokenizer_model():
    from bitnet_convert.tiny import tiny_tokenizer_files

    files = dict(tiny_tokenizer_files(), **{"tokenizer.model": sentencepiece_model_bytes()})
    assert gguf_tokenizer.vocab_from_files(files, {}, 384, "src").model == "gpt2"
