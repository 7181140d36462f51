"""`verify`: every lossless path passes and every kind of loss fails, on stable and on chaotic models, whatever
the model's stability; the parity layer passes on every HF layout and fails on a changed transformers reference.

Chaotic models carry 2B4T-sized multipliers (tests/fixtures.py): on them two implementations disagree on
top-1 for ~10% of positions, which the old statistical verify could not tell from loss (docs/formats.md §11).
"""

import dataclasses
import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_convert import api
from bitnet_convert.cli import main
from bitnet_convert.formats import registry
from bitnet_core.checkpoint import Ternary, eager_entry

BF16 = ml_dtypes.bfloat16
# TQ blocks need rows of 256 values; "tiny" is for what needs no GGUF (parity, damage messages, the CLI)
SIZES = {"small": {"hidden_size": 256, "intermediate_size": 512},
         "wider": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 3}}
TINY = {"hidden_size": 128, "intermediate_size": 256}
STABILITY = {"stable": False, "chaotic": True}
# Every lossless path out of an HF folder: (output name, writer options)
PATHS = {
    "flax": ("m-flax", {}),
    "npz": ("m.npz", {}),
    "i2_s": ("m-i2s.gguf", {"target": "bitnet.cpp"}),
    "tq2_0": ("m-tq2.gguf", {"outtype": "tq2_0"}),
    "tq1_0": ("m-tq1.gguf", {"outtype": "tq1_0"}),
    "gguf-f32": ("m-f32.gguf", {"outtype": "f32"}),
}


@pytest.fixture(scope="module", params=[(s, z) for s in STABILITY for z in SIZES], ids=lambda p: f"{p[0]}-{p[1]}")
def source(request, hf_checkpoint):
    stability, size = request.param
    return hf_checkpoint("autobitlinear", seed=5, is_chaotic=STABILITY[stability], **SIZES[size])


def verify_json(candidate, reference, *args):
    result = CliRunner().invoke(main, ["verify", str(candidate), "--reference", str(reference), "--json", *args])
    return result.exit_code, json.loads(result.output.strip().splitlines()[-1])


@pytest.mark.parametrize("path", PATHS)
def test_every_lossless_path_passes_exactly(source, path, tmp_path):
    name, options = PATHS[path]
    out = api.convert(source, tmp_path / name, **options)
    code, report = verify_json(out, source)
    assert code == 0, report
    weights, function = report["layers"]["weights"], report["layers"]["function"]
    assert weights["passed"] and weights["failures"] == []
    # GGUF stores the embedding as f16 by default: the one cast it declares, reported with its loss
    casts = [n for n in weights["notes"] if ": declared cast" in n]
    assert weights["tensors_cast"] == len(casts) <= (1 if name.endswith(".gguf") else 0)
    assert all(n.startswith("model.embed_tokens.weight: declared cast bfloat16 -> float16") for n in casts)
    assert weights["tensors_compared"] == len(registry.read_checkpoint(str(source)).tensors)
    assert function["max_abs_diff"] == 0.0 and function["logits_differing"] == 0  # the same engine: identical
    assert function["top1_agreement"] == 1.0 and report["max_abs_diff"] == 0.0


def test_an_identical_copy_and_a_round_trip_pass(source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    back = api.convert(api.convert(source, tmp_path / "m-flax"), tmp_path / "back")
    for candidate in (copy, back):
        code, report = verify_json(candidate, source)
        assert code == 0 and report["layers"]["function"]["max_abs_diff"] == 0.0, report


# ---------------------------------------------------------------------------------------------- damage


def _projections(ckpt):
    return [n for n, e in ckpt.tensors.items() if e.kind == "ternary"]


def flip_one_code(values, ckpt):
    name = _projections(ckpt)[3]
    t = values[name]
    codes = t.codes.copy()
    codes[1, 2] = 1 if codes[1, 2] != 1 else 0
    values[name] = Ternary(codes, t.multiplier)
    return name


def scale_one_multiplier(values, ckpt, factor=1.10):
    name = _projections(ckpt)[5]
    values[name] = Ternary(values[name].codes, np.float32(values[name].multiplier * factor))
    return name


def nudge_one_multiplier_by_an_ulp(values, ckpt):
    name = _projections(ckpt)[0]
    values[name] = Ternary(values[name].codes, np.nextafter(values[name].multiplier, np.float32(10)))
    return name


def scale_one_norm_element(values, _ckpt, name="model.layers.0.post_attention_layernorm.weight"):
    norm = values[name].astype(np.float32)
    norm[7] *= 1.5
    values[name] = norm.astype(values[name].dtype)
    return name


def change_one_embedding_element(values, _ckpt):
    name = "model.embed_tokens.weight"
    table = values[name].copy()
    table[11, 3] = np.asarray(np.float32(table[11, 3]) + np.float32(0.25)).astype(table.dtype)
    values[name] = table
    return name


def swap_two_projections(values, _ckpt):
    k, v = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    values[k], values[v] = values[v], values[k]
    return k


DAMAGE = {
    "one-code": flip_one_code,
    "multiplier-x1.10": scale_one_multiplier,
    "multiplier-one-ulp": nudge_one_multiplier_by_an_ulp,
    "norm-x1.5": scale_one_norm_element,
    "embedding-element": change_one_embedding_element,
    "swapped-tensors": swap_two_projections,
}


def damaged_copy(source, tmp_path, damage, fmt="npz"):
    """The source's tensors with one damage, written by our writer (so only the damage differs)."""
    ckpt = registry.read_checkpoint(str(source))
    values = ckpt.materialize()
    name = damage(values, ckpt)
    tensors = {n: eager_entry(n, v) for n, v in values.items()}
    bad = dataclasses.replace(ckpt, tensors=tensors)
    out = api.write(bad, tmp_path / ("bad.npz" if fmt == "npz" else "bad-flax"), format=fmt)
    return out, name


@pytest.mark.parametrize("damage", DAMAGE)
def test_any_loss_fails_and_names_the_tensor(source, damage, tmp_path):
    bad, name = damaged_copy(source, tmp_path, DAMAGE[damage])
    code, report = verify_json(bad, source)
    assert code == 1 and report["passed"] is False
    weights = report["layers"]["weights"]
    assert weights["passed"] is False
    assert any(f.startswith(name) for f in weights["failures"]), weights["failures"]
    assert report["layers"]["function"]["passed"] is False  # and the same engine sees another function


def test_a_failure_says_where_and_both_values(hf_checkpoint, tmp_path):
    source = hf_checkpoint("autobitlinear", seed=5, **TINY)
    bad, name = damaged_copy(source, tmp_path, flip_one_code)
    _, report = verify_json(bad, source)
    (line,) = [f for f in report["layers"]["weights"]["failures"] if f.startswith(name)]
    assert "1 ternary codes differ, the first at [1, 2]: candidate" in line and "reference" in line


def test_a_missing_tensor_and_a_changed_head_fail(hf_checkpoint, tmp_path):
    source = hf_checkpoint("autobitlinear", seed=6, tie_word_embeddings=False, **TINY)
    bad, _ = damaged_copy(source, tmp_path, lambda values, _ckpt: _change_head(values))
    _, report = verify_json(bad, source)
    assert any(f.startswith("lm_head.weight: differs at [11, 3]") for f in report["layers"]["weights"]["failures"])
    ckpt = registry.read_checkpoint(str(source))
    ckpt.tensors.pop("model.norm.weight")
    from bitnet_convert.verification.weights import compare_weights

    weights, _, _ = compare_weights(ckpt, registry.read_checkpoint(str(source)))
    assert weights.passed is False and "model.norm.weight: missing from the candidate" in weights.failures


def _change_head(values):
    head = values["lm_head.weight"].copy()
    head[11, 3] = np.asarray(np.float32(head[11, 3]) * 2 + 1).astype(head.dtype)
    values["lm_head.weight"] = head
    return "lm_head.weight"


def test_a_config_change_of_the_function_fails(hf_checkpoint, tmp_path):
    source = hf_checkpoint("autobitlinear", seed=5, **TINY)
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    config = json.loads((bad / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (bad / "config.json").write_text(json.dumps(config))
    code, report = verify_json(bad, source)
    assert code == 1
    assert any(f.startswith("config rms_norm_eps") for f in report["layers"]["weights"]["failures"])


# ---------------------------------------------------------------------------------- declared casts


def test_a_declared_cast_passes_with_its_loss_reported(hf_checkpoint, tmp_path):
    """q8_0 embeddings: the GGUF declares the cast; the weights layer reports its loss, and the function layer
    runs the reference with the same cast, so its logits must still be identical."""
    source = hf_checkpoint("autobitlinear", seed=5, **SIZES["small"])
    out = api.convert(source, tmp_path / "m.gguf", outtype="tq2_0", embed_type="q8_0")
    code, report = verify_json(out, source)
    assert code == 0, report
    weights = report["layers"]["weights"]
    assert weights["tensors_cast"] == 1
    assert any(n.startswith("model.embed_tokens.weight: declared cast bfloat16 -> q8_0") for n in weights["notes"])
    assert report["layers"]["function"]["max_abs_diff"] == 0.0


@pytest.mark.slow
def test_the_int8_head_runs_on_both_sides_and_its_cast_is_reported(hf_checkpoint, tmp_path):
    """verify --head int8: candidate and reference both run the engine's int8 head (generate --head int8), so
    their logits are still identical; what the cast changes against the stored head is reported, not failed."""
    source = hf_checkpoint("autobitlinear", seed=5, **SIZES["small"])
    out = api.convert(source, tmp_path / "m.gguf", outtype="tq2_0")
    code, report = verify_json(out, source, "--head", "int8")
    assert code == 0, report
    function = report["layers"]["function"]
    assert function["max_abs_diff"] == 0.0 and function["logits_differing"] == 0
    assert function["head_cast"] == "int8" and function["head_cast_max_abs_diff"] > 0
    assert 0.5 < function["head_cast_top1_agreement"] <= 1.0
    assert any(n.startswith("declared cast: int8 head") for n in function["notes"])
    code, plain = verify_json(out, source)
    assert code == 0 and "head_cast" not in plain["layers"]["function"]


def test_a_bf16_weight_scale_rounding_is_the_only_multiplier_change_allowed(hf_checkpoint, tmp_path):
    """Float32 multipliers (Flax) through an HF folder with bf16 weight_scale: each multiplier may differ from
    the source by exactly that rounding (recorded in provenance), and by nothing else."""
    source = hf_checkpoint("online", seed=5, **TINY)  # masters: multipliers are float32 mean|W|
    flax = api.convert(source, tmp_path / "m-flax")
    hf_out = api.convert(flax, tmp_path / "m-hf", layout="autobitlinear")
    code, report = verify_json(hf_out, flax)
    assert code == 0, report
    assert report["layers"]["weights"]["multipliers_rounded"] > 0
    assert 0 < report["layers"]["weights"]["max_multiplier_rel_rounding"] <= 2.0**-8  # bf16: 8 significant bits
    ckpt = registry.read_checkpoint(str(hf_out))
    values = ckpt.materialize()
    name = nudge_one_multiplier_by_an_ulp(values, ckpt)
    bad = api.write(dataclasses.replace(ckpt, tensors={n: eager_entry(n, v) for n, v in values.items()}),
                    tmp_path / "bad.npz", format="npz")
    code, report = verify_json(bad, flax)
    assert code == 1 and any(f.startswith(name) for f in report["layers"]["weights"]["failures"])


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", ["autobitlinear", "bitlinear", "online"])
@pytest.mark.parametrize("act, kv_heads", [("relu2", 2), ("silu", 4)], ids=["relu2-gqa", "silu-mha"])
@pytest.mark.parametrize("stability", STABILITY)
@pytest.mark.slow
def test_parity_with_transformers_on_every_layout(hf_checkpoint, layout, act, kv_heads, stability):
    arch = "BitNetForCausalLM" if act == "relu2" else "LlamaForCausalLM"
    source = hf_checkpoint(layout, seed=2, is_chaotic=STABILITY[stability], hidden_act=act, architecture=arch,
                           num_key_value_heads=kv_heads, **TINY)
    code, report = verify_json(source, source, "--level", "parity")
    parity = report["layers"]["parity"]
    assert code == 0 and parity["passed"], parity
    assert parity["max_layer_rel_diff"] <= parity["layer_rtol"]
    assert parity["max_quantizer_input_rel_diff"] <= parity["quantizer_input_rtol"]
    assert parity["continuous_max_rel_diff"] <= parity["continuous_rtol"]
    assert parity["rounding_ties"] > 0  # they exist, and were accounted for


def test_parity_fails_when_transformers_holds_one_other_norm(hf_checkpoint, monkeypatch):
    from bitnet_convert import reference

    source = hf_checkpoint("autobitlinear", seed=2, is_chaotic=True, **TINY)
    original = reference.load_reference

    def changed(folder):
        model = original(folder)
        model.model.layers[1].post_attention_layernorm.weight.data[5] *= 1.5
        return model

    monkeypatch.setattr(reference, "load_reference", changed)
    report = api.verify(source, source, levels="parity")
    parity = report.layer("parity")
    assert report.passed is False and parity.passed is False
    assert any(f.startswith("decoder layer 1:") for f in parity.failures), parity.failures
    assert not any(f.startswith("decoder layer 0:") for f in parity.failures)  # teacher forcing: local


def test_parity_needs_a_hugging_face_reference(source, tmp_path):
    out = api.convert(source, tmp_path / "m.npz")
    report = api.verify(out, out, levels="parity")
    assert report.layer("parity").passed is None and report.passed is False  # nothing ran: no pass


# ------------------------------------------------------------------------------------------------- CLI


def test_the_table_names_every_layer(hf_checkpoint, tmp_path):
    source = hf_checkpoint("autobitlinear", seed=5, **TINY)
    result = CliRunner().invoke(main, ["verify", str(source), "--reference", str(source)])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["weights", "function", "result"]
    assert lines[-1].split() == ["result", "PASS"]


@pytest.mark.parametrize("args, message", [
    (["--level", "weights,nonsense"], "unknown verify level 'nonsense'"),
    (["--level", "runtime"], "the runtime level needs --runtime"),
])
def test_bad_levels_are_one_error_line(hf_checkpoint, args, message):
    source = hf_checkpoint("autobitlinear", seed=5, **TINY)
    result = CliRunner().invoke(main, ["verify", str(source), "--reference", str(source), *args])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and message in result.output


def test_a_missing_reference_is_one_error_line(hf_checkpoint):
    source = hf_checkpoint("autobitlinear", seed=5, **TINY)
    result = CliRunner().invoke(main, ["verify", str(source), "--reference", "/nonexistent/reference"])
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and "/nonexistent/reference" in result.output


def test_a_pickled_reference_is_refused_before_transformers_sees_it(hf_checkpoint, tmp_path):
    source = hf_checkpoint("autobitlinear", seed=5, **TINY)
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    result = CliRunner().invoke(main, ["verify", str(source), "--reference", str(pickled), "--level", "parity"])
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output


@pytest.mark.parametrize("layout", ["autobitlinear", "bitlinear", "online"])
def test_hf_flax_hf_keeps_the_layout_it_came_in(hf_checkpoint, layout, tmp_path):
    """flax-to-hf defaults to the source's layout (provenance), so every stored tensor comes back bit for bit:
    bitlinear keeps its inverse weight_scale, online its bf16 masters."""
    from bitnet_convert.formats import hf

    source = hf_checkpoint(layout, seed=5, **TINY)
    back = api.convert(api.convert(source, tmp_path / "m-flax"), tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["quantization_config"] == \
        json.loads((source / "config.json").read_text())["quantization_config"]
    def stored(folder):  # name -> bytes: the fixture's writer orders tensors by dtype, ours by model order
        return {name: bytes(data) for name, data in hf.stored_tensor_bytes(folder)}

    assert stored(back) == stored(source)
