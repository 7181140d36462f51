"""Every BitNet family (tests/families.py: 2B4T, Falcon3 / Falcon-E, Llama3-8B-1.58, 1bitLLM) in its own Hugging
Face layout, to every format and back, proven by verify; each GGUF under the architecture its runtime runs the
family as; the families transformers has a class for, in parity with it; and the runtimes we can run, running
our files (docs/formats.md §6-§7; the README's family table cites these tests)."""

import reference_extra

reference_extra.require()  # the fixtures are written with torch and transformers

import json
import logging

import ml_dtypes
import numpy as np
import pytest
from families import FAMILIES, write_family
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from safetensors.numpy import load_file

from bitnet_convert import api
from bitnet_core.quantize import as_ternary
from bitnet_convert.formats.gguf.types import I2_S

# GGUF outputs: name -> writer options
GGUF_OUTPUTS = {
    "tq2_0": {"outtype": "tq2_0"}, "tq1_0": {"outtype": "tq1_0"}, "llama.cpp-f16": {"outtype": "f16"},
    "i2_s": {"target": "bitnet.cpp"}, "bitnet.cpp-f32": {"target": "bitnet.cpp", "outtype": "f32"},
    "bitnet.cpp-f16": {"target": "bitnet.cpp", "outtype": "f16"},
    "bitnet.cpp-bf16": {"target": "bitnet.cpp", "outtype": "bf16"},
}
OUTPUTS = {"flax": ("flax", {}), "npz": ("m.npz", {}), "hf": ("hf", {})} | {
    key: (f"{key}.gguf", options) for key, options in GGUF_OUTPUTS.items()
}
# (family, target) -> general.architecture the runtime runs the family under
ARCHITECTURE = {
    ("2b4t", "llama.cpp"): "bitnet", ("2b4t", "bitnet.cpp"): "bitnet-b1.58",
    ("falcon3", "llama.cpp"): "llama", ("falcon3", "bitnet.cpp"): "llama",
    ("llama3-8b", "llama.cpp"): "llama", ("llama3-8b", "bitnet.cpp"): "llama",
    ("1bitllm", "llama.cpp"): "bitnet", ("1bitllm", "bitnet.cpp"): "bitnet",
}


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    cache = {}

    def make(family, size="small", seed=0, is_chaotic=False):
        key = (family, size, seed, is_chaotic)
        if key not in cache:
            cache[key] = write_family(tmp_path_factory.mktemp(family) / "src", family, size=size, seed=seed,
                                      is_chaotic=is_chaotic)
        return cache[key]

    return make


@pytest.mark.parametrize("is_chaotic", [False, True], ids=["stable", "chaotic"])
@pytest.mark.parametrize("output", list(OUTPUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_format_and_back_passes_verify_weights(family_folder, tmp_path, family, output, is_chaotic):
    src = family_folder(family, is_chaotic=is_chaotic)
    name, options = OUTPUTS[output]
    out = api.convert(src, tmp_path / name, **options)
    back = api.convert(out, tmp_path / "back")
    for candidate in (out, back):
        report = api.verify(candidate, src, levels="weights")
        assert report.passed, report.layer("weights").failures


def test_hf_round_trip_keeps_each_family_layout_byte_for_byte(family_folder, tmp_path):
    """Read, write with the default layout: the same tensors under the same names, bit for bit, and the same
    quantization_config (none for 1bitLLM)."""
    for family in FAMILIES:
        src = family_folder(family)
        out = api.convert(src, tmp_path / family)
        before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
        assert sorted(before) == sorted(after), family
        for name, value in before.items():
            assert value.dtype == after[name].dtype and value.tobytes() == after[name].tobytes(), (family, name)
        config_in = json.loads((src / "config.json").read_text())
        config_out = json.loads((out / "config.json").read_text())
        assert config_out["architectures"] == config_in["architectures"], family
        if family == "1bitllm":
            assert "quantization_config" not in config_out
        else:
            assert config_out["quantization_config"]["quant_method"] == "bitnet"


def test_1bitllm_is_read_as_latent_weights_under_our_names(family_folder):
    ckpt = api.read(family_folder("1bitllm"))
    assert ckpt.config["architectures"] == ["BitnetForCausalLM"] and ckpt.provenance["layout"] == "latent"
    q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.kind == "dense" and q.dtype == np.float16  # quantized by the model, at run time
    assert "model.layers.1.self_attn.attn_sub_norm.weight" in ckpt.tensors
    assert "model.layers.1.mlp.ffn_sub_norm.weight" in ckpt.tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_architecture_and_tensors_per_runtime(family_folder, tmp_path, family):
    src = family_folder(family)
    untied = family in ("falcon3", "llama3-8b")
    for target in ("llama.cpp", "bitnet.cpp"):
        out = api.convert(src, tmp_path / f"{target}.gguf", target=target)
        reader = GGUFReader(out)
        arch = reader.get_field("general.architecture").contents()
        assert arch == ARCHITECTURE[family, target]
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert ("output.weight" in types) == untied  # the dense head, as token_embd's type
        if untied:
            assert types["output.weight"] == T.F16 and "blk.0.attn_sub_norm.weight" not in types
            assert reader.get_field(f"{arch}.vocab_size").contents() == api.read(src).config["vocab_size"]
        assert types["blk.0.ffn_down.weight"] == (T.TQ2_0 if target == "llama.cpp" else I2_S)
        # TQ2_0 blocks hold the multiplier where f16 can (2B4T's bf16 ones), else a `.scale` ratio corrects it;
        # bitnet.cpp loads no .scale tensors
        m = as_ternary(api.read(src).tensors["model.layers.0.mlp.down_proj.weight"].load()).multiplier
        assert ("blk.0.ffn_down.scale" in types) == (target == "llama.cpp" and np.float32(np.float16(m)) != m)
        if family == "2b4t":
            assert np.float32(np.float16(m)) == m


def test_bitnet_cpp_float_projections_hold_codes_times_multiplier(family_folder, tmp_path):
    """bitnet.cpp's graphs apply no `.scale` tensor: the values are 0 / +-m, m rounded once to the stored type."""
    src = family_folder("falcon3")
    ckpt = api.read(src)
    down = ckpt.tensors["model.layers.0.mlp.down_proj.weight"].load()
    for outtype, dtype in (("f32", np.float32), ("f16", np.float16), ("bf16", ml_dtypes.bfloat16)):
        out = api.convert(src, tmp_path / f"{outtype}.gguf", target="bitnet.cpp", outtype=outtype)
        tensors = {t.name: t for t in GGUFReader(out).tensors}
        assert "blk.0.ffn_down.scale" not in tensors
        stored = np.asarray(tensors["blk.0.ffn_down.weight"].data).view(dtype).astype(np.float32)
        m = np.float32(np.asarray(down.multiplier).astype(dtype))
        assert np.array_equal(stored.reshape(down.codes.shape), down.codes * m), outtype


def test_rows_that_do_not_fit_tq_blocks_are_written_in_a_float_type_with_a_warning(tmp_path, caplog):
    """TQ blocks hold 256 values: a model of width 384 gets exact float projections, each one named."""
    src = write_family(tmp_path / "src", "falcon3", size="small")
    config = json.loads((src / "config.json").read_text())
    assert config["hidden_size"] == 256  # fits; the FFN down projection's rows (intermediate 512) fit too
    odd = write_family(tmp_path / "odd", "1bitllm", size="parity")  # rows of 64 and 128 values
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        out = api.convert(odd, tmp_path / "odd.gguf", outtype="tq2_0")
    warned = [r.getMessage() for r in caplog.records if "do not fit" in r.getMessage()]
    assert len(warned) == 2 * 7 and all("written as F16, exactly" in w for w in warned)
    assert "blk.1.ffn_down.weight" in " ".join(warned)
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == T.F16 and "blk.0.attn_q.scale" in types
    assert api.verify(out, odd, levels="weights").passed
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        i2s_out = api.convert(odd, tmp_path / "odd-i2s.gguf", target="bitnet.cpp")
    types = {t.name: t.tensor_type for t in GGUFReader(i2s_out).tensors}
    assert types["blk.0.attn_q.weight"] == T.F32 and "blk.0.attn_q.scale" not in types  # codes x m: exact in F32
    assert api.verify(i2s_out, odd, levels="weights").passed


@pytest.mark.parametrize("family", ["falcon3", "1bitllm"])
@pytest.mark.slow
def test_transformers_parity(family_folder, family):
    """transformers' LlamaForCausalLM with the BitNet quantizer (Falcon3 layout); for 1bitLLM, transformers'
    BitNetForCausalLM with online quantization (bitnet_convert/reference.py says why that is its arithmetic)."""
    src = family_folder(family, size="parity")
    report = api.verify(src, src, levels="parity")
    assert report.passed, report.layer("parity").failures


# ------------------------------------------------------------------------------------- the real runtimes
# Stable models of rows >= 512 (IQ2_BN's activation quantizer); bounds: bitnet_convert/verification/runtime.py.


# (family, writer options, runtime): every family's I2_S file in ik_llama.cpp (requantized to IQ2_BN); the SiLU
# families' TQ2_0 files in llama.cpp (Falcon3 under `llama`, which applies `.scale` tensors too; 1bitLLM under
# `bitnet`). 2B4T in llama.cpp is tests/test_verify_runtime.py's: its bitnet graph computes SiLU, not relu2.
RUNTIME_CASES = [(family, {"target": "bitnet.cpp"}, "ik_llama.cpp") for family in FAMILIES] + [
    (family, {"outtype": "tq2_0"}, "llama.cpp") for family in ("falcon3", "llama3-8b", "1bitllm")
]


@pytest.mark.parametrize("family,options,runtime", RUNTIME_CASES,
                         ids=[f"{f}-{r}" for f, _, r in RUNTIME_CASES])
@pytest.mark.slow
def test_the_runtime_runs_our_file_as_the_jax_model_does(family_folder, tmp_path, family, options, runtime):
    pytest.importorskip(runtime.replace(".cpp", "_cpp"))
    src = family_folder(family, size="runtime", seed=3)
    out = api.convert(src, tmp_path / "m.gguf", **options)
    report = api.verify(out, src, levels="weights", runtime=runtime)
    layer = report.layer("runtime")
    assert report.passed and layer.passed, layer.failures
    assert layer.figures["top1_agreement_with_w158a8"] == 1.0


# ------------------------------------------------------------------- the runtimes' own files, read back


def _i2s_bytes(codes: np.ndarray, multiplier: np.float32) -> np.ndarray:
    """bitnet.cpp's x86 I2_S packing, from its description (docs/formats.md §4), not from our codec: the flat
    matrix in 128-value blocks; value 32g + p of a block in byte p at shift 6 - 2g, stored as code + 1; a
    32-byte tail starting with the float32 multiplier."""
    q = (codes.reshape(-1, 4, 32).astype(np.uint8) + 1)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(multiplier).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def _interleave(rows: np.ndarray, heads: int) -> np.ndarray:  # the converters' q/k permute, for `llama`
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, rows.shape[1]).swapaxes(1, 2).reshape(rows.shape)


def test_bitnet_cpp_falcon3_i2_s_file_is_read_back_exactly(family_folder, tmp_path):
    """A Falcon3 file the way bitnet.cpp's converter writes it (tiiuae's *-1.58bit-GGUF): arch `llama`, q/k
    rows permuted for interleaved RoPE, I2_S projections, a dense output.weight, no keys of ours."""
    from gguf import GGUFWriter

    from bitnet_core.checkpoint import Ternary
    from bitnet_core.names import hf_to_gguf

    src = family_folder("falcon3")
    ckpt = api.read(src)
    cfg = ckpt.config
    path = tmp_path / "ggml-model-i2_s.gguf"
    writer = GGUFWriter(path, "llama")
    for key, field in (("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                       ("block_count", "num_hidden_layers"), ("feed_forward_length", "intermediate_size"),
                       ("attention.head_count", "num_attention_heads"),
                       ("attention.head_count_kv", "num_key_value_heads"), ("vocab_size", "vocab_size"),
                       ("rope.dimension_count", "head_dim")):
        writer.add_uint32(f"llama.{key}", cfg[field])
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    writer.add_float32("llama.rope.freq_base", cfg["rope_theta"])
    values = ckpt.materialize()
    for name, value in values.items():
        gguf_name = hf_to_gguf(name)
        if isinstance(value, Ternary):
            codes = value.codes
            if ".q_proj." in name or ".k_proj." in name:
                heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
                codes = _interleave(codes, heads)
            data = _i2s_bytes(codes, value.multiplier)
            writer.add_tensor(gguf_name, data, raw_shape=(value.codes.shape[0], value.codes.shape[1] // 4),
                              raw_dtype=I2_S)
        elif value.ndim == 1:
            writer.add_tensor(gguf_name, np.asarray(value, np.float32))
        else:
            writer.add_tensor(gguf_name, np.asarray(value, np.float32).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    back = api.read(path)
    assert back.config["architectures"] == ["LlamaForCausalLM"] and back.config["hidden_act"] == "silu"
    assert back.config["tie_word_embeddings"] is False
    report = api.verify(path, src, levels="weights")
    assert report.passed, report.layer("weights").failures


def test_1bitllm_gguf_carries_its_sentencepiece_tokenizer_and_reads_back_as_silu(family_folder, tmp_path):
    """tokenizer.ggml.model "llama" with scores; a `bitnet` file with that vocabulary and none of our keys is a
    1bitLLM conversion (SiLU), as bitnet.cpp writes them."""
    src = family_folder("1bitllm")
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    reader = GGUFReader(out)
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    assert len(reader.get_field("tokenizer.ggml.scores").contents()) == api.read(src).config["vocab_size"]
    from bitnet_convert.formats.gguf import causal_lm as gguf_causal_lm, reader as gguf_read

    default = gguf_causal_lm.default_activation(gguf_read.open_gguf(out), gguf_causal_lm.ARCHITECTURES["bitnet"])
    assert default == "silu"
    back = api.convert(out, tmp_path / "back")
    assert (back / "tokenizer.model").is_file()


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("family", ["2b4t", "falcon3"])
def test_ik_llama_cpp_runs_bitnet_cpp_float_files_holding_codes_times_multiplier(family_folder, tmp_path, family,
                                                                                 outtype):
    """No `.scale` tensors: ik_llama.cpp's bitnet-b1.58 and llama loaders take the file as it is, and its graph
    computes the model: F32 to its f16 KV cache's floor, top-1 identical; F16/BF16 weights multiply activations
    rounded to 16 bits (ggml's dot type for them) and are held to the int8-rounding bound (on the Falcon3
    fixture one of 32 positions then has another top-1 than the W1.58A8 model)."""
    pytest.importorskip("ik_llama_cpp")
    from bitnet_convert.verification import runtime

    src = family_folder(family, size="runtime", seed=3)
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp", outtype=outtype)
    report = api.verify(out, src, levels="weights", runtime="ik_llama.cpp")
    layer = report.layer("runtime")
    assert report.passed and layer.passed, layer.failures
    if outtype == "f32":
        assert layer.figures["bound"] == runtime.FLOAT_FLOOR["ik_llama.cpp"]
        assert layer.figures["top1_agreement_with_w158a8"] == 1.0
