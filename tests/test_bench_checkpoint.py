"""benchmarks/make_2b4t.py writes what the safetensors library would, and the 2B4T header has the real size;
benchmarks/make_tokenizer.py makes a tokenizer of the real Llama-3 one's size that our reader and GGUF writer take."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bitnet_convert.tiny import tiny_config

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "make_2b4t.py"
_spec = importlib.util.spec_from_file_location("make_2b4t", _PATH)
make_2b4t = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_2b4t)
_spec = importlib.util.spec_from_file_location("make_tokenizer", _PATH.with_name("make_tokenizer.py"))
make_tokenizer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tokenizer)


def test_2b4t_file_size_matches_the_real_checkpoint():
    specs = make_2b4t.tensor_specs(make_2b4t.CONFIG_2B4T)
    header = make_2b4t.safetensors_header(specs, {"format": "pt"})
    assert len(header) == 8 + 61_000
    assert len(header) + sum(s.nbytes for s in specs) == make_2b4t.REAL_2B4T_BYTES
    assert len(specs) == 1 + 30 * (4 + 7 * 2) + 1  # embeddings, per layer 4 norms + 7 (weight, weight_scale), norm


def test_streamed_file_is_byte_identical_to_safetensors(tmp_path):
    config = dict(tiny_config(384), quantization_config=make_2b4t.QUANTIZATION_CONFIG)
    path = make_2b4t.make_checkpoint(tmp_path / "ckpt", config, seed=3)
    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == config
    packed = tensors["model.layers.0.mlp.gate_proj.weight"]
    assert packed.dtype == np.uint8 and packed.shape == (512 // 4, 256)
    codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)])
    assert codes.max() <= 2
    assert abs((codes == 1).mean() - 1 / 3) < 0.01  # code 1 = value 0: a third of the weights are zero
    scale = tensors["model.layers.0.mlp.gate_proj.weight_scale"].astype(np.float32)
    assert scale.shape == (1,) and 1.3 <= scale[0] <= 1.7


def test_deterministic(tmp_path):
    config = dict(tiny_config(384), quantization_config=make_2b4t.QUANTIZATION_CONFIG)
    a = make_2b4t.make_checkpoint(tmp_path / "a", config, seed=1).read_bytes()
    b = make_2b4t.make_checkpoint(tmp_path / "b", config, seed=1).read_bytes()
    c = make_2b4t.make_checkpoint(tmp_path / "c", config, seed=2).read_bytes()
    assert a == b != c


@pytest.mark.parametrize("bad", [3])
def test_valid_bytes_only(bad):
    table = make_2b4t._VALID_PACKED
    assert len(set(table.tolist())) == 81
    assert all(((int(b) >> s) & 3) != bad for b in table for s in (0, 2, 4, 6))


@pytest.mark.slow
def test_tokenizer_has_llama3_sizes_and_reads_as_gguf_vocab():
    from tokenizers import Tokenizer

    from bitnet_convert.formats import tokenizer_files
    from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer

    files = make_tokenizer.tokenizer_files(seed=0)
    assert files == make_tokenizer.tokenizer_files(seed=0)  # same seed, same bytes
    document = json.loads(files["tokenizer.json"])
    assert len(document["model"]["vocab"]) == 128_000 and len(document["model"]["merges"]) == 280_147
    assert [t["id"] for t in document["added_tokens"]] == list(range(128_000, 128_256))
    ids = Tokenizer.from_str(files["tokenizer.json"].decode()).encode("User: hi<|eot_id|>Assistant: ").ids
    assert ids[0] == 128_000 and 128_009 in ids  # BOS added, <|eot_id|> one special token
    tokenizer_files.check(files, lambda name: name)
    config = {"vocab_size": 128_256, "bos_token_id": 128_000, "eos_token_id": 128_009}
    vocab = gguf_tokenizer.vocab_from_files(files, config, 128_256, "made")
    assert len(vocab.tokens) == 128_256 and len(vocab.merges) == 280_147
