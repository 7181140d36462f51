"""The bulk GGUF metadata writer writes the very bytes gguf-py's element-by-element writer does."""

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter

from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf.bulk import BulkGGUFWriter, string_array_body
from bitnet_convert.tiny import tiny_tokenizer_files

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama3-tokenizer"


def kv_bytes(writer_class, path, fill) -> bytes:
    writer = writer_class(str(path), "bitnet")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return Path(path).read_bytes()


def tokenizer_fill(files: dict[str, bytes]):
    tokenizer = json.loads(files["tokenizer.json"])
    n_vocab = len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])
    vocab = gguf_tokenizer.vocab_from_files(files, {"vocab_size": n_vocab}, n_vocab, "test")
    return vocab.add_to


def test_the_tiny_tokenizer_is_written_byte_for_byte_as_gguf_py_does(tmp_path):
    fill = tokenizer_fill(tiny_tokenizer_files())
    assert kv_bytes(BulkGGUFWriter, tmp_path / "a.gguf", fill) == kv_bytes(GGUFWriter, tmp_path / "b.gguf", fill)


@pytest.mark.skipif(not REAL.is_dir(), reason="the shared real-size Llama-3 tokenizer is not beside the checkout")
def test_the_real_llama3_tokenizer_is_written_byte_for_byte_as_gguf_py_does(tmp_path):
    files = {name: (REAL / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    fill = tokenizer_fill(files)
    assert kv_bytes(BulkGGUFWriter, tmp_path / "a.gguf", fill) == kv_bytes(GGUFWriter, tmp_path / "b.gguf", fill)


@pytest.mark.parametrize("values, vtype", [
    ([1, -2, 3], GGUFValueType.INT32), ([0.5, 2.25], GGUFValueType.FLOAT32), ([7, 8], GGUFValueType.UINT64),
    (["a", "héllo", "", "🙂"], GGUFValueType.STRING), ([True, False], GGUFValueType.BOOL),
])
def test_every_array_type_packs_as_gguf_py_does(tmp_path, values, vtype):
    def fill(writer):
        writer.add_array("test.values", values)
        writer.add_key_value("test.typed", values, GGUFValueType.ARRAY, sub_type=vtype)

    assert kv_bytes(BulkGGUFWriter, tmp_path / "a.gguf", fill) == kv_bytes(GGUFWriter, tmp_path / "b.gguf", fill)


def test_string_array_body_layout():
    body = string_array_body(["ab", "é"])
    assert body == np.uint64(2).tobytes() + b"ab" + np.uint64(2).tobytes() + "é".encode()


def test_a_sentencepiece_vocabulary_is_written_byte_for_byte_as_gguf_py_does(tmp_path):
    from tokenizer_fixtures import sentencepiece_files

    pytest.importorskip("sentencepiece")
    vocab = gguf_tokenizer.vocab_from_files(sentencepiece_files(), {}, 402, "test")
    assert vocab.scores is not None and vocab.model == "llama"
    assert kv_bytes(BulkGGUFWriter, tmp_path / "a.gguf", vocab.add_to) == kv_bytes(GGUFWriter, tmp_path / "b.gguf",
                                                                                     vocab.add_to)


def test_string_array_body_of_bytes_and_text():
    assert string_array_body([b"\xff", "", "ab"]) == (np.uint64(1).tobytes() + b"\xff" + np.uint64(0).tobytes()
                                                      + np.uint64(2).tobytes() + b"ab")
