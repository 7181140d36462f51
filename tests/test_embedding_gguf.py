"""The BitNet-embedding models as GGUF for bitnet.cpp's embedding branch (docs/formats.md §12): every key and
tensor name its converter writes (read back with gguf-py, independently of our reader), I2_S projections, F32
norms with Gemma's stored as 1 + w, read back exactly into every format, verified, damage found."""

import reference_extra

reference_extra.require()  # the fixtures are written with torch and transformers

import logging

import numpy as np
import pytest
from click.testing import CliRunner
from damage import gguf_tensor_offsets, patch
from embedding_fixtures import tensors_for, write_embedding_checkpoint
from gguf import GGUFReader

from bitnet_convert import api
from bitnet_convert.cli import main
from bitnet_convert.formats.gguf.types import I2_S
from bitnet_core.codecs import i2s
from bitnet_core.quantize import ternarize_master

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_PROJECTIONS = dict(zip(PROJECTIONS, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))
# shared/formats.md §8 and bitnet.cpp's converter: the norms of each block, by backbone, and their HF names
BLOCK_NORMS = {
    "qwen3": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "gemma3": {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}


def _fields(path) -> dict:
    reader = GGUFReader(str(path))
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def _source(tmp_path, backbone, pooling="lasttoken"):
    return write_embedding_checkpoint(tmp_path / "src", backbone, "i2s", pooling=pooling, tokenizer="gguf")


@pytest.mark.parametrize("backbone", ["qwen3", "gemma3"])
def test_every_key_and_tensor_of_bitnet_cpps_embedding_gguf(tmp_path, backbone):
    src = _source(tmp_path, backbone)
    out = api.convert(src, tmp_path / "m.gguf", quiet=True)
    reader, kv = _fields(out)
    arch = backbone
    sizes = {"qwen3": (128, 2, 256, 4, 2, 64, 320), "gemma3": (128, 3, 256, 2, 1, 128, 400)}[backbone]
    hidden, layers, ffn, heads, kv_heads, head_dim, vocab = sizes
    expected = {
        "general.architecture": arch, "general.file_type": 40,
        f"{arch}.context_length": 512, f"{arch}.embedding_length": hidden, f"{arch}.block_count": layers,
        f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.vocab_size": vocab,
        f"{arch}.rope.dimension_count": head_dim, f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim, f"{arch}.rope.freq_base": 1e6,
        f"{arch}.pooling_type": 3,  # LAST, from 1_Pooling/config.json
        "tokenizer.ggml.add_eos_token": True,
    }
    if backbone == "qwen3":
        expected.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                         "tokenizer.ggml.eos_token_id": 317})  # <|endoftext|>, not tokenizer_config's <|im_end|>
    else:
        expected.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.eos_token_id": 1,
                         "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.add_space_prefix": False,
                         f"{arch}.attention.sliding_window": 8,
                         f"{arch}.attention.sliding_window_pattern": [True, True, False],
                         f"{arch}.rope.freq_base_swa": 1e4, "bitnet_convert.query_pre_attn_scalar": 24.0})
    for key, value in expected.items():
        assert kv.get(key) == value, (key, kv.get(key))
    assert np.float32(kv[f"{arch}.attention.layer_norm_rms_epsilon"]) == np.float32(1e-6)
    assert len(kv["tokenizer.ggml.tokens"]) == vocab

    names = {"token_embd.weight", "output_norm.weight"}
    for i in range(layers):
        names |= {f"blk.{i}.{p}.weight" for p in PROJECTIONS}
        names |= {f"blk.{i}.{p}_norm_in.weight" for p in PROJECTIONS}
        names |= {f"blk.{i}.{n}.weight" for n in BLOCK_NORMS[backbone]}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == names  # no output.weight
    for name, t in tensors.items():
        role = name.split(".")[-2]
        kind = I2_S.name if role in PROJECTIONS else ("F16" if name == "token_embd.weight" else "F32")
        assert t.tensor_type.name == kind, name

    # values, against the source tensors (bf16): norms as stored, Gemma's model norms as 1 + w, projections as
    # the absmean codes with the multiplier in the I2_S tail
    source = tensors_for(backbone, "i2s")
    offsets = gguf_tensor_offsets(out)
    raw = np.fromfile(out, np.uint8)
    for i in (0, layers - 1):
        for gguf, hf in BLOCK_NORMS[backbone].items():
            w = source[f"layers.{i}.{hf}.weight"].astype(np.float32)
            stored = np.asarray(tensors[f"blk.{i}.{gguf}.weight"].data)
            np.testing.assert_array_equal(stored, w + 1 if backbone == "gemma3" else w)
        for p, hf in HF_PROJECTIONS.items():
            np.testing.assert_array_equal(np.asarray(tensors[f"blk.{i}.{p}_norm_in.weight"].data),
                                          source[f"layers.{i}.{hf}.norm.weight"].astype(np.float32))
            master = source[f"layers.{i}.{hf}.weight"]
            expected_t = ternarize_master(master)
            at = offsets[f"blk.{i}.{p}.weight"]
            codes, multiplier = i2s.unpack(raw[at: at + i2s.nbytes(master.size)], master.shape)
            np.testing.assert_array_equal(codes, expected_t.codes)
            assert multiplier == expected_t.multiplier
    embd = np.asarray(tensors["token_embd.weight"].data)
    np.testing.assert_array_equal(embd, source["embed_tokens.weight"].astype(np.float32).astype(np.float16))


@pytest.mark.parametrize("backbone", ["qwen3", "gemma3"])
@pytest.mark.slow
def test_read_back_exactly_into_every_format_and_verified(tmp_path, backbone):
    src = _source(tmp_path, backbone)
    gguf = api.convert(src, tmp_path / "m.gguf", quiet=True)
    flax = api.convert(gguf, tmp_path / "m-flax", quiet=True)
    npz = api.convert(flax, tmp_path / "m.npz", quiet=True)
    again = api.convert(npz, tmp_path / "again.gguf", quiet=True)
    for candidate in (gguf, flax, npz, again):
        report = api.verify(candidate, src)
        assert report.passed, report.as_dict()
        assert [layer.name for layer in report.layers] == ["weights", "function"]
        assert report.as_dict()["max_abs_diff"] == 0.0
    first, second = GGUFReader(str(gguf)), GGUFReader(str(again))
    assert [t.name for t in first.tensors] == [t.name for t in second.tensors]
    for a, b in zip(first.tensors, second.tensors, strict=True):  # bytes as stored (I2_S tails aside: checked above)
        assert a.tensor_type == b.tensor_type and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    for key in ("tokenizer.ggml.tokens", f"{first.fields['general.architecture'].contents()}.pooling_type",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_eos_token"):
        assert first.fields[key].contents() == second.fields[key].contents(), key
    assert {api.embed(p, [], pooling=None).pooling for p in (gguf, flax, npz)} == {"last"}


def test_embeddings_from_the_gguf_are_the_sources_bit_for_bit(tmp_path):
    src = _source(tmp_path, "qwen3", pooling="mean")
    gguf = api.convert(src, tmp_path / "m.gguf", quiet=True)
    texts = ["The quick brown fox", "It's   fine, isn't it? 1234", "数据科学"]
    ours, theirs = api.embed(gguf, texts), api.embed(src, texts)
    assert ours.token_counts == theirs.token_counts  # the rebuilt tokenizer: same ids, <|endoftext|> appended
    assert ours.pooling == "mean"
    np.testing.assert_array_equal(ours.embeddings, theirs.embeddings)


def test_a_gemma_norm_too_small_for_one_plus_w_is_declared_and_verified(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    src = _source(tmp_path, "gemma3")
    tensors = load_file(str(src / "model.safetensors"))
    name = "layers.0.post_feedforward_layernorm.weight"
    tensors[name][5] = 3e-7  # f32(1 + w) - 1 = 2^-22 != w
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        gguf = api.convert(src, tmp_path / "m.gguf", quiet=True)
    assert any("model.layers.0.post_feedforward_layernorm.weight: 1 values" in r.getMessage() for r in caplog.records)
    report = api.verify(gguf, src)
    assert report.passed, report.as_dict()
    weights = report.layers[0]
    assert weights.figures["tensors_cast"] >= 1


@pytest.mark.slow
def test_verify_fails_a_damaged_gguf(tmp_path):
    src = _source(tmp_path, "gemma3")
    gguf = api.convert(src, tmp_path / "m.gguf", quiet=True)
    name = "blk.1.ffn_down_norm_in.weight"
    patch(gguf, gguf_tensor_offsets(gguf)[name] + 4 * 3, np.float32(7.5).tobytes())
    report = api.verify(gguf, src)
    assert not report.passed
    weights, function = report.layers[0], report.layers[1]
    assert not weights.passed and any("model.layers.1.mlp.down_proj.norm.weight" in f for f in weights.failures)
    assert not function.passed


@pytest.mark.parametrize("args, message", [
    (["--target", "llama.cpp"], "the Qwen3Model embedding model runs in bitnet.cpp's embedding branch only"),
    (["--outtype", "tq2_0"], "the Qwen3Model embedding model is written with i2_s projections only"),
])
def test_what_the_runtime_cannot_run_is_refused_in_one_line(tmp_path, args, message):
    src = _source(tmp_path, "qwen3")
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "x.gguf"), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_a_word_level_tokenizer_is_refused_and_hf_needs_masters(tmp_path):
    src = write_embedding_checkpoint(tmp_path / "src", "qwen3", "i2s")  # word-level tokenizer.json
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "x.gguf"), "--quiet"])
    assert result.exit_code == 2 and "is not a byte-level BPE" in result.stderr
    gguf = api.convert(_source(tmp_path / "b", "qwen3"), tmp_path / "m.gguf", quiet=True)
    result = CliRunner().invoke(main, ["convert", str(gguf), str(tmp_path / "back"), "--quiet"])
    assert result.exit_code == 2 and "cannot write the embedding layout from ternary weights" in result.stderr
