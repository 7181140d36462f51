"""Checkpoint <-> GGUF: every target and outtype round-trips exactly; foreign files; errors name the file."""

import dataclasses
import logging

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, quants

from bitnet_convert import api
from bitnet_convert.fileio import integrity
from bitnet_convert.formats import gguf
from bitnet_convert.formats.gguf.types import I2_S
from bitnet_convert.formats.gguf import stored
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Checkpoint, Ternary
from bitnet_core.codecs import i2s
from bitnet_core.errors import ConvertError
from bitnet_core.names import hf_to_gguf
from bitnet_core.quantize import ternarize_master

CASES = [("llama.cpp", o) for o in ("tq2_0", "tq1_0", "f16", "bf16", "f32")] + [
    ("bitnet.cpp", o) for o in ("i2_s", "f16", "bf16", "f32")
]
PROJECTION_TYPE = {"tq2_0": T.TQ2_0, "tq1_0": T.TQ1_0, "i2_s": I2_S, "f16": T.F16, "bf16": T.BF16, "f32": T.F32}


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(seed=0)


@pytest.fixture(scope="module")
def arrays(ckpt):
    return ckpt.materialize()


# bitnet.cpp's graphs apply no `.scale` tensor: a float projection holds codes x multiplier, rounded once.
MULTIPLIER_IN_VALUES = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32}


def assert_same_model(arrays, back, embed_rtol=0.0, multiplier_dtype=np.float32):
    got = back.materialize()
    assert list(got) == list(arrays)
    for name, value in arrays.items():
        if isinstance(value, Ternary):
            assert np.array_equal(got[name].codes, value.codes), name
            expected = np.float32(np.asarray(value.multiplier).astype(multiplier_dtype))
            assert got[name].multiplier == expected, name  # float32 multipliers: exact
        else:
            np.testing.assert_allclose(np.asarray(got[name], np.float32), np.asarray(value, np.float32),
                                       rtol=embed_rtol, atol=0, err_msg=name)


@pytest.mark.parametrize("target,outtype", CASES)
def test_round_trip_every_outtype(ckpt, arrays, tmp_path, target, outtype):
    out = gguf.write(ckpt, tmp_path / "m.gguf", target=target, outtype=outtype)
    assert gguf.detect(out)
    back = gguf.read(str(out))
    in_values = target == "bitnet.cpp" and outtype != "i2_s"
    # bf16 norms and embeddings are exact in f16 here (|x| < 65504, no tiny values); f32 norms are exact.
    assert_same_model(arrays, back, multiplier_dtype=MULTIPLIER_IN_VALUES[outtype] if in_values else np.float32)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert back.config[key] == ckpt.config[key], key

    reader = GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == PROJECTION_TYPE[outtype]
    assert types["blk.1.attn_sub_norm.weight"] == T.F32 and types["token_embd.weight"] == T.F16
    # TQ blocks hold these multipliers (bf16 values, so f16 values) in d; llama.cpp's float outtypes hold codes
    assert ("blk.0.ffn_down.scale" in types) == (target == "llama.cpp" and outtype in ("f16", "bf16", "f32"))
    if in_values:
        rounding = {"f16": ["f16"], "bf16": ["bf16"], "f32": []}[outtype]
        assert gguf.recorded_provenance(out)["multiplier_roundings"] == rounding
    arch = reader.get_field("general.architecture").contents()
    assert arch == {"llama.cpp": "bitnet", "bitnet.cpp": "bitnet-b1.58"}[target]
    if target == "bitnet.cpp":
        assert reader.get_field("bitnet-b1.58.vocab_size").contents() == ckpt.config["vocab_size"]
        assert reader.get_field("bitnet-b1.58.rope.dimension_count").contents() == ckpt.config["head_dim"]
    if outtype == "i2_s":
        assert reader.get_field("general.file_type").contents() == 40


@pytest.mark.parametrize("qtype", [T.TQ2_0, T.TQ1_0])
def test_layout_on_disk_tq(ckpt, arrays, tmp_path, qtype):
    """llama.cpp's converter's layout: every block's d is the multiplier (an f16 value here), no `.scale`; the
    bytes are gguf-py's quantizer's of codes x multiplier. GGUF dims are listed ne0 = in_features first."""
    out = gguf.write(ckpt, tmp_path / "m.gguf", outtype=qtype.name.lower())
    reader = GGUFReader(out)
    t = {t.name: t for t in reader.tensors}
    assert not [name for name in t if name.endswith(".scale")]
    for name, value in arrays.items():
        if isinstance(value, Ternary):
            weight = t[hf_to_gguf(name)]
            assert weight.shape.tolist() == [value.shape[1], value.shape[0]]
            assert weight.data.tobytes() == quants.quantize(value.dequantize(), qtype).tobytes(), name
    assert reader.get_field("bitnet.attention.head_count_kv").contents() == 2
    assert reader.get_field("bitnet_convert.hidden_act").contents() == "relu2"
    assert reader.get_field("bitnet_convert.multiplier").contents() == "tq_block_d"
    assert gguf.recorded_provenance(out)["scale_corrections"] == []


def with_multipliers(ckpt, arrays, multiplier_of):
    """`ckpt` with each projection's multiplier replaced by multiplier_of(name, multiplier)."""
    changed = {name: Ternary(v.codes, multiplier_of(name, v.multiplier)) if isinstance(v, Ternary) else v
               for name, v in arrays.items()}
    return Checkpoint.from_arrays(ckpt.config, changed, tokenizer_files=ckpt.tokenizer_files,
                                  provenance=ckpt.provenance), changed


@pytest.mark.parametrize("outtype", ["tq2_0", "tq1_0"])
def test_tq_multiplier_f16_cannot_hold(ckpt, arrays, tmp_path, caplog, outtype):
    """Layer 1's multipliers are not f16 values (one float32 step above bf16 ones): their blocks hold an f16 next to m and `.scale` the
    exact ratio, warned about in one line and recorded; layer 0 keeps the converter's layout. Both read back
    exactly, and llama.cpp's converter's reading of d alone is within 2^-9 of m."""
    inexact, changed = with_multipliers(ckpt, arrays, lambda name, m: np.nextafter(m, np.float32(np.inf))
                                        if ".layers.1." in name else m)
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        out = gguf.write(inexact, tmp_path / "m.gguf", outtype=outtype)
    lines = [r.getMessage() for r in caplog.records if "f16 cannot hold" in r.getMessage()]
    assert len(lines) == 1 and "7 of 14" in lines[0] and "blk.1.attn_q" in lines[0] and "\n" not in lines[0]
    assert_same_model(changed, gguf.read(out))
    reader = GGUFReader(out)
    t = {t.name: t for t in reader.tensors}
    corrected = sorted(name for name in t if name.endswith(".scale"))
    assert corrected == sorted(gguf.recorded_provenance(out)["scale_corrections"])
    assert corrected and all(name.startswith("blk.1.") for name in corrected)
    for name, value in changed.items():
        if ".layers.1." in name and isinstance(value, Ternary):
            weight, scale = t[hf_to_gguf(name)], t[hf_to_gguf(name).replace(".weight", ".scale")]
            d = np.abs(quants.dequantize(weight.data, weight.tensor_type)).max()
            assert np.float32(d * scale.data[0]) == value.multiplier and d == np.float16(d)
            assert abs(d - value.multiplier) <= 2**-9 * value.multiplier


def test_block_scale():
    """d x scale is the multiplier exactly for every float32 in f16's normal range; no scale for f16 values."""
    rng = np.random.default_rng(0)
    multipliers = np.exp2(rng.uniform(-14, 15.9, 20000)).astype(np.float32)
    for m in multipliers:
        d, scale = stored.block_scale(m)
        if np.float32(np.float16(m)) == m:  # about 2^-13 of them
            assert (d, scale) == (np.float16(m), None)
            continue
        assert scale is not None and np.float32(np.float32(d) * scale) == m and abs(d - m) <= 2**-9 * m, m
    for m in np.float32([1.5, 0.0625, 2.0**-14, 65504.0, np.float16(0.3)]):
        assert stored.block_scale(m) == (np.float16(m), None)
    for m in np.float32([1e6, 1e-9]):  # beyond f16: the multiplier in `.scale` alone
        assert stored.block_scale(m) == (np.float16(1.0), m)


@pytest.mark.parametrize("outtype", ["tq2_0", "tq1_0"])
def test_tq_all_zero_projection_keeps_its_multiplier(ckpt, arrays, tmp_path, outtype):
    """A projection that is all zeros: its blocks all get d (zero blocks have d = 0 otherwise), so the file
    still holds the multiplier."""
    name = "model.layers.0.mlp.down_proj.weight"
    zeros = dict(arrays, **{name: Ternary(np.zeros_like(arrays[name].codes), arrays[name].multiplier)})
    zero_ckpt = Checkpoint.from_arrays(ckpt.config, zeros, tokenizer_files=ckpt.tokenizer_files)
    assert_same_model(zeros, gguf.read(gguf.write(zero_ckpt, tmp_path / "z.gguf", outtype=outtype)))


def test_multiplier_must_match_the_plan(ckpt, tmp_path):
    """The layout is planned from the multiplier a source states beside the codes; a source whose data then
    says otherwise is refused, the output never left half-written."""
    name = "model.layers.1.self_attn.v_proj.weight"
    entry = ckpt.tensors[name]
    stale = dataclasses.replace(entry, multiplier=np.float32(entry.multiplier * 3))
    changed = Checkpoint(ckpt.config, dict(ckpt.tensors, **{name: stale}), ckpt.tokenizer_files, ckpt.provenance)
    with pytest.raises(ConvertError, match=r"v_proj.weight: multiplier .* read, .* when the file was planned"):
        gguf.write(changed, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_i2s_tail_holds_the_multiplier(ckpt, arrays, tmp_path):
    out = gguf.write(ckpt, tmp_path / "m.gguf", target="bitnet.cpp")
    raw = dict(gguf.stored_tensor_bytes(out))["blk.1.ffn_down.weight"]
    down = arrays["model.layers.1.mlp.down_proj.weight"]
    assert bytes(raw) == i2s.pack(down.codes, down.multiplier).tobytes()
    assert np.frombuffer(bytes(raw[-32:-28]), "<f4")[0] == down.multiplier


def test_provenance_and_content_hash(ckpt, tmp_path):
    out = gguf.write(ckpt, tmp_path / "m.gguf", target="bitnet.cpp")
    record = gguf.recorded_provenance(out)
    assert record["format"] == "gguf" and record["target"] == "bitnet.cpp" and record["outtype"] == "i2_s"
    assert record["source"] == ckpt.provenance["source"] and record["hidden_act"] == "relu2"
    assert record["content_hash"] == integrity.hash_stored(gguf.stored_tensor_bytes(out))
    # flipping one stored byte changes the recomputed hash
    data = bytearray(out.read_bytes())
    offset = next(t.data_offset for t in GGUFReader(out).tensors if t.name == "blk.0.attn_k.weight")
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    assert record["content_hash"] != integrity.hash_stored(gguf.stored_tensor_bytes(out))


def test_master_weights_are_ternarized(tmp_path):
    masters = tiny_checkpoint(seed=2, masters=True)
    back = gguf.read(gguf.write(masters, tmp_path / "m.gguf", target="bitnet.cpp"))
    name = "model.layers.0.mlp.up_proj.weight"
    expected = ternarize_master(masters.load(name))
    assert np.array_equal(back.load(name).codes, expected.codes)
    assert back.load(name).multiplier == expected.multiplier


@pytest.mark.parametrize("embed_type,rtol", [("bf16", 0.0), ("f32", 0.0), ("q8_0", 0.02)])
def test_embedding_types(ckpt, arrays, tmp_path, embed_type, rtol):
    out = gguf.write(ckpt, tmp_path / "m.gguf", embed_type=embed_type)
    back = gguf.read(out)
    embed = np.asarray(arrays["model.embed_tokens.weight"], np.float32)
    got = np.asarray(back.load("model.embed_tokens.weight"), np.float32)
    if rtol == 0:
        assert np.array_equal(got, embed)
    else:  # q8_0: int8 per 32-value block with an f16 step max|block|/127: error within one step
        step = np.abs(embed).reshape(-1, 32).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - embed).reshape(-1, 32) <= step).all()
        assert not np.array_equal(got, embed)


def test_relu2_to_llama_cpp_warns_once(ckpt, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        gguf.write(ckpt, tmp_path / "a.gguf")
    lines = [r.getMessage() for r in caplog.records if "graph computes silu" in r.getMessage()]
    assert len(lines) == 1 and "relu2" in lines[0] and "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        gguf.write(tiny_checkpoint(seed=0, hidden_act="silu"), tmp_path / "b.gguf")
        gguf.write(ckpt, tmp_path / "c.gguf", target="bitnet.cpp")
    assert not [r for r in caplog.records if "graph computes" in r.getMessage()]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"outtype": "i2_s"}, "i2_s is for bitnet.cpp, not llama.cpp"),
        ({"target": "bitnet.cpp", "outtype": "tq2_0"}, "tq2_0 is for llama.cpp"),
        ({"target": "vllm"}, "unknown GGUF target"),
        ({"outtype": "q4_0"}, "unknown GGUF outtype"),
        ({"embed_type": "q4_k"}, "unknown embedding type"),
    ],
)
def test_bad_options(ckpt, tmp_path, kwargs, message):
    with pytest.raises(ConvertError, match=message):
        gguf.write(ckpt, tmp_path / "m.gguf", **kwargs)
    assert not list(tmp_path.iterdir())


def test_refuses_to_overwrite_and_untied_models(ckpt, tmp_path):
    out = gguf.write(ckpt, tmp_path / "m.gguf")
    with pytest.raises(ConvertError, match="already exists"):
        gguf.write(ckpt, out)
    gguf.write(ckpt, out, force=True)
    with pytest.raises(ConvertError, match="untied lm_head"):
        gguf.write(tiny_checkpoint(seed=0, tie_word_embeddings=False), tmp_path / "u.gguf")


# --------------------------------------------------------------------------------------- foreign files


def write_foreign(path, arch, arrays, config, *, tensors):
    """A GGUF written with gguf-py alone, the way llama.cpp's or bitnet.cpp's converter lays it out.

    tensors(gguf_name, value) -> list of (name, array, raw_dtype or None)."""
    writer = GGUFWriter(path, arch)
    for key, value in (("context_length", 512), ("embedding_length", config["hidden_size"]),
                       ("block_count", config["num_hidden_layers"]),
                       ("feed_forward_length", config["intermediate_size"]),
                       ("attention.head_count", config["num_attention_heads"]),
                       ("attention.head_count_kv", config["num_key_value_heads"])):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0)
    for name, value in arrays.items():
        for tname, array, raw_dtype in tensors(hf_to_gguf(name), value):
            if raw_dtype is None:
                writer.add_tensor(tname, array)
            else:
                writer.add_tensor(tname, array, raw_shape=None, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dense_f32(name, value):
    return [(name, np.asarray(value, np.float32), None)]


def test_llama_cpp_style_folded_multiplier(ckpt, arrays, tmp_path):
    """llama.cpp's converter: TQ2_0 of codes*m, no `.scale`: multiplier is the blocks' f16 d."""
    def tensors(name, value):
        if isinstance(value, Ternary):
            return [(name, quants.quantize(value.dequantize(), T.TQ2_0), T.TQ2_0)]
        return dense_f32(name, value)

    back = gguf.read(write_foreign(tmp_path / "l.gguf", "bitnet", arrays, ckpt.config, tensors=tensors))
    assert back.config["hidden_act"] == "relu2" and back.tokenizer_files == {}
    for name, value in arrays.items():
        if isinstance(value, Ternary):
            assert np.array_equal(back.load(name).codes, value.codes)
            assert back.load(name).multiplier == np.float32(np.float16(value.multiplier))


@pytest.mark.parametrize("qtype", [T.TQ2_0, T.TQ1_0])
def test_earlier_layout_unit_d_and_scale(ckpt, arrays, tmp_path, qtype):
    """What this tool wrote before (and llama.cpp still runs): blocks of codes with d = 1, the float32 multiplier
    in `.scale`; read back exactly."""
    def tensors(name, value):
        if isinstance(value, Ternary):
            scale = np.array([value.multiplier], np.float32)
            return [(name, quants.quantize(value.codes.astype(np.float32), qtype), qtype),
                    (name.replace(".weight", ".scale"), scale, None)]
        return dense_f32(name, value)

    earlier = write_foreign(tmp_path / "o.gguf", "bitnet", arrays, ckpt.config, tensors=tensors)
    assert_same_model({n: v if isinstance(v, Ternary) else np.float32(v) for n, v in arrays.items()}, gguf.read(earlier))
    # verify's weights layer: the earlier layout against today's (d = multiplier), the same model
    today = gguf.write(ckpt, tmp_path / "n.gguf", outtype=qtype.name.lower(), embed_type="f32")
    report = api.verify(earlier, today, levels="weights")
    assert report.passed, report.layer("weights").failures


def test_llama_cpp_style_f16_values(ckpt, arrays, tmp_path):
    def tensors(name, value):
        if isinstance(value, Ternary):
            return [(name, value.dequantize().astype(np.float16), None)]
        return dense_f32(name, value)

    back = gguf.read(write_foreign(tmp_path / "f.gguf", "bitnet", arrays, ckpt.config, tensors=tensors))
    q = arrays["model.layers.1.self_attn.o_proj.weight"]
    assert np.array_equal(back.load("model.layers.1.self_attn.o_proj.weight").codes, q.codes)
    assert back.load("model.layers.1.self_attn.o_proj.weight").multiplier == np.float32(np.float16(q.multiplier))


@pytest.mark.parametrize("arch", ["bitnet-25", "bitnet-b1.58"])
def test_bitnet_cpp_style_i2s(ckpt, arrays, tmp_path, arch):
    def tensors(name, value):
        if isinstance(value, Ternary):
            packed = i2s.pack(value.codes, value.multiplier)
            return [(name, packed, I2_S)]
        return [(name, np.asarray(value, np.float32).astype(np.float16 if name == "token_embd.weight" else np.float32), None)]

    path = tmp_path / "b.gguf"
    writer = GGUFWriter(path, arch)
    for key, value in (("context_length", 512), ("embedding_length", 256), ("block_count", 2),
                       ("feed_forward_length", 512), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("vocab_size", ckpt.config["vocab_size"]), ("rope.dimension_count", 64)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0)
    for name, value in arrays.items():
        for tname, array, raw_dtype in tensors(hf_to_gguf(name), value):
            if raw_dtype is I2_S:  # info from the packed-code shape, data n/4 + 32 bytes (the tail)
                writer.add_tensor_info(tname, (value.shape[0], value.shape[1] // 4), np.dtype(np.uint8),
                                       array.nbytes, raw_dtype=I2_S)
                writer.tensors[-1][tname].tensor = array
            else:
                writer.add_tensor(tname, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = gguf.read(path)
    assert back.config["hidden_act"] == "relu2" and back.config["head_dim"] == 64
    assert_same_model(arrays, back)


def test_different_block_scales_refused(ckpt, arrays, tmp_path):
    def tensors(name, value):
        if isinstance(value, Ternary):
            w = value.dequantize()
            w[:1] *= 2  # the first row's blocks twice as large: not one multiplier
            return [(name, quants.quantize(w, T.TQ2_0), T.TQ2_0)]
        return dense_f32(name, value)

    path = write_foreign(tmp_path / "x.gguf", "bitnet", arrays, ckpt.config, tensors=tensors)
    back = gguf.read(path)
    with pytest.raises(ConvertError, match=r"x\.gguf: blk\.0\.attn_q\.weight: .*different scales"):
        back.load("model.layers.0.self_attn.q_proj.weight")


def test_unsupported_projection_type_refused(ckpt, arrays, tmp_path):
    def tensors(name, value):
        if isinstance(value, Ternary):
            return [(name, quants.quantize(value.dequantize(), T.Q8_0), T.Q8_0)]
        return dense_f32(name, value)

    path = write_foreign(tmp_path / "q.gguf", "bitnet", arrays, ckpt.config, tensors=tensors)
    with pytest.raises(ConvertError, match=r"q\.gguf: projection blk\.0\.attn_q\.weight has type Q8_0"):
        gguf.read(path)


def test_unsupported_architecture_refused(ckpt, arrays, tmp_path):
    def tensors(name, value):
        return dense_f32(name, value.dequantize() if isinstance(value, Ternary) else value)

    path = write_foreign(tmp_path / "a.gguf", "qwen2", arrays, ckpt.config, tensors=tensors)
    with pytest.raises(ConvertError, match=r"a\.gguf: architecture 'qwen2' is not BitNet"):
        gguf.read(path)


def test_llama_architecture_with_sub_norms_refused(ckpt, arrays, tmp_path):
    """`llama` is read (Llama-family BitNets run under it), but its graph has no sub-norms: a 2B4T-shaped file
    under it is named, not silently run without them."""
    def tensors(name, value):
        return dense_f32(name, value.dequantize() if isinstance(value, Ternary) else value)

    path = write_foreign(tmp_path / "a.gguf", "llama", arrays, ckpt.config, tensors=tensors)
    with pytest.raises(ConvertError, match=r"a\.gguf: unexpected tensor model\.layers\.0\.self_attn\.attn_sub_norm"):
        gguf.read(path)


# ------------------------------------------------------------------------------------------ bad files


def test_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert not gguf.detect(path) and not gguf.detect(tmp_path)
    with pytest.raises(ConvertError, match=r"model\.safetensors: not a GGUF file"):
        gguf.read(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.999, 40 / 1e9])
def test_truncated(ckpt, tmp_path, keep):
    out = gguf.write(ckpt, tmp_path / "m.gguf", target="bitnet.cpp")
    data = out.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(int(len(data) * keep), 8)])
    with pytest.raises(ConvertError, match=r"cut\.gguf: truncated"):
        gguf.read(str(cut))


def test_unknown_tensor_type_id(ckpt, tmp_path):
    out = gguf.write(ckpt, tmp_path / "m.gguf")
    reader = GGUFReader(out)
    info = reader.tensors[0].field
    type_offset = info.offset + sum(int(p.nbytes) for p in info.parts[:4])  # name len, name, n_dims, dims
    data = bytearray(out.read_bytes())
    data[type_offset : type_offset + 4] = (37).to_bytes(4, "little")  # bitnet.cpp's TL1, unknown here
    out.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match=r"m\.gguf: unsupported tensor type"):
        gguf.read(str(out))


def test_corrupt_provenance_json(ckpt, tmp_path):
    out = gguf.write(ckpt, tmp_path / "m.gguf")
    data = out.read_bytes().replace(b'{"content_hash"', b'X"content_hash"', 1)
    out.write_bytes(data)
    with pytest.raises(ConvertError, match="not valid JSON"):
        gguf.recorded_provenance(out)


def test_failure_mid_write_leaves_nothing(ckpt, tmp_path):
    def broken():
        raise ConvertError("source went away")

    tensors = dict(ckpt.tensors)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = dataclasses.replace(tensors[name], load=broken)
    with pytest.raises(ConvertError, match="source went away"):
        gguf.write(Checkpoint(ckpt.config, tensors, ckpt.tokenizer_files, ckpt.provenance), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bf16_to_f16_shortcut_rounds_as_the_float32_path():
    """Every bf16 bit pattern: the direct bf16 -> f16 cast is taken only where it equals bf16 -> f32 -> f16;
    out-of-range values, infinities and NaNs still go the float32 way (and its range check)."""
    from bitnet_convert.formats.gguf import stored

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    safe = bits[(bits & 0x7FFF) < stored._BF16_F16_SAFE]
    values = safe.view(stored.BF16)
    got = stored.encode_float(values, T.F16, "t", "here")
    assert got.tobytes() == values.astype(np.float32).astype(np.float16).tobytes()
    for bad in (0x4780, 0x7F80, 0xFF80, 0xC780):  # 65536, inf, -inf, -65536
        with pytest.raises(ConvertError, match="beyond the float16 range"):
            stored.encode_float(np.array([1, bad], np.uint16).view(stored.BF16), T.F16, "t", "here")


@pytest.mark.parametrize("embed_type", ["f16", "bf16", "f32", "q8_0"])
def test_float_tensors_written_in_pieces_are_the_same_bytes(ckpt, tmp_path, monkeypatch, embed_type):
    from bitnet_convert.formats.gguf import stored

    whole = gguf.write(ckpt, tmp_path / "whole.gguf", embed_type=embed_type).read_bytes()
    monkeypatch.setattr(stored, "CHUNK_VALUES", 1000)  # several rows per piece, a short last piece
    pieces = gguf.write(ckpt, tmp_path / "pieces.gguf", embed_type=embed_type).read_bytes()
    assert pieces == whole
