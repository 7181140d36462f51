"""verify's runtime layer: our GGUF files in llama.cpp and ik_llama.cpp against the JAX model under each
runtime's arithmetic (bitnet_convert/verification/runtime.py says what is compared and why those bounds).

Needs the optional packages (extras `llama`, `ik-llama`); CI installs both. Stable models only: a runtime without
W1.58A8's per-token quantizer is compared through the measured effect of int8 rounding, which on a chaotic random
model is the size of the logits themselves (docs/formats.md §11).
"""

import pytest

from bitnet_convert import api
from bitnet_convert.verification import runtime

SILU = {"hidden_act": "silu", "hidden_size": 512, "intermediate_size": 1024}
RELU2 = {"hidden_size": 512, "intermediate_size": 1024}


def run(candidate, reference, name):
    report = api.verify(candidate, reference, levels="weights", runtime=name)
    return report, report.layer("runtime")


@pytest.fixture(scope="module")
def silu_model(hf_checkpoint):
    return hf_checkpoint("autobitlinear", seed=3, **SILU)


@pytest.fixture(scope="module")
def relu2_model(hf_checkpoint):
    return hf_checkpoint("autobitlinear", seed=3, **RELU2)


@pytest.mark.parametrize("outtype", ["tq2_0", "tq1_0", "f32"])
@pytest.mark.slow
def test_llama_cpp_runs_a_silu_model_as_the_jax_model_does(silu_model, outtype, tmp_path):
    pytest.importorskip("llama_cpp")
    out = api.convert(silu_model, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    report, layer = run(out, silu_model, "llama.cpp")
    assert report.passed and layer.passed, layer.failures
    assert layer.figures["top1_agreement_with_w158a8"] == 1.0
    if outtype == "f32":  # the same function in float32: no room for int8 rounding
        assert layer.figures["bound"] == runtime.FLOAT_FLOOR["llama.cpp"]
        assert layer.figures["max_rel_diff"] < runtime.FLOAT_FLOOR["llama.cpp"]


def test_llama_cpp_on_a_relu2_model_computes_another_function(relu2_model, tmp_path):
    pytest.importorskip("llama_cpp")
    out = api.convert(relu2_model, tmp_path / "m.gguf", outtype="tq2_0")
    report, layer = run(out, relu2_model, "llama.cpp")
    assert report.passed is False and layer.passed is False
    assert layer.failures == ["llama.cpp computes another function: its bitnet graph applies silu in the FFN, "
                              "this model uses relu2"]


def test_ik_llama_cpp_runs_our_i2_s_file_after_requantizing(relu2_model, tmp_path):
    pytest.importorskip("ik_llama_cpp")
    out = api.convert(relu2_model, tmp_path / "m.gguf", target="bitnet.cpp")
    report, layer = run(out, relu2_model, "ik_llama.cpp")
    assert report.passed and layer.passed, layer.failures
    assert layer.figures["top1_agreement_with_w158a8"] == 1.0
    assert any("requantized to IQ2_BN" in note for note in layer.notes)


def test_ik_llama_cpp_repacks_our_i2_s_file_by_four_rows(relu2_model, tmp_path):
    """bench_generate's IQ2_BN_R4 side: the same bytes in another order, which ik_llama.cpp runs with another
    activation quantizer (its logits differ by ~1% of their size here) to the same greedy tokens."""
    pytest.importorskip("ik_llama_cpp")
    import json

    from bitnet_core.config import ModelConfig

    i2_s = api.convert(relu2_model, tmp_path / "m.gguf", target="bitnet.cpp")
    ids = runtime._sequence(ModelConfig.from_hf(json.loads((relu2_model / "config.json").read_text())))
    files, logits = {}, {}
    for layout in ("iq2_bn", "iq2_bn_r4"):
        files[layout] = tmp_path / f"m-{layout}.gguf"
        assert runtime.requantize_iq2_bn(i2_s, files[layout], layout) is None
        logits[layout] = runtime._runtime_logits("ik_llama.cpp", str(files[layout]), ids, tmp_path)
    plain, repacked = (files[k].read_bytes() for k in ("iq2_bn", "iq2_bn_r4"))
    assert len(plain) == len(repacked) and plain != repacked
    assert (logits["iq2_bn"].argmax(-1) == logits["iq2_bn_r4"].argmax(-1)).all()


def test_ik_llama_cpp_reading_i2_s_directly_is_caught(relu2_model, tmp_path, monkeypatch):
    """ik_llama.cpp has no I2_S matmul and runs such a file with wrong logits and no error (docs/formats.md §10):
    the comparison, not the runtime, is what notices."""
    pytest.importorskip("ik_llama_cpp")
    out = api.convert(relu2_model, tmp_path / "m.gguf", target="bitnet.cpp")
    monkeypatch.setattr(runtime, "loadable_file", lambda path, *args: path)
    report, layer = run(out, relu2_model, "ik_llama.cpp")
    assert layer.passed is False and "differ from the JAX model's" in layer.failures[0]


def test_a_runtime_refuses_what_it_cannot_run(relu2_model, silu_model, tmp_path):
    pytest.importorskip("ik_llama_cpp")
    small = api.convert(relu2_model, tmp_path / "m.npz")
    with pytest.raises(api.ConvertError, match="runs GGUF files"):
        api.verify(small, relu2_model, levels="weights", runtime="ik_llama.cpp")
    tq = api.convert(relu2_model, tmp_path / "m-tq.gguf", outtype="tq2_0")
    _, layer = run(tq, relu2_model, "ik_llama.cpp")  # its bitnet graph is SiLU, as llama.cpp's
    assert layer.passed is False and "computes another function" in layer.failures[0]
    # A SiLU model's TQ2_0 file: ik_llama.cpp has no TQ types (it dies inside its reader on them)
    tq = api.convert(silu_model, tmp_path / "s-tq.gguf", outtype="tq2_0")
    _, layer = run(tq, silu_model, "ik_llama.cpp")
    assert layer.failures == ["ik_llama.cpp runs bitnet.cpp's I2_S files (after requantizing); this file holds "
                              "tq2_0 projections: write it with --target bitnet.cpp"]
