"""verify --levels parity for the BitNet-embedding encoders: the JAX model's hidden states against transformers'
Qwen3Model / Gemma3TextModel with BitNet layers (reference.load_embedding_reference), tie-robust as for the
causal LMs (verification/parity.py); sequences of 72 tokens, past every sliding window of the fixtures."""

import reference_extra

reference_extra.require()  # the fixtures are written with torch and transformers

import pytest
import torch
from embedding_fixtures import SIZES, write_embedding_checkpoint

from bitnet_convert import api, reference


@pytest.mark.parametrize("backbone", ["qwen3", "gemma3"])
@pytest.mark.slow
def test_parity_of_the_encoder_passes(tmp_path, backbone):
    assert SIZES[backbone]["medium"].get("sliding_window", 0) < 72
    src = write_embedding_checkpoint(tmp_path / "src", backbone, "medium")
    report = api.verify(src, src, levels="parity")
    (parity,) = report.layers
    assert parity.name == "parity" and parity.passed, parity.failures
    figures = parity.figures
    assert figures["max_layer_rel_diff"] <= figures["layer_rtol"]
    assert figures["max_logit_rel_diff"] < 1e-5  # the final hidden states, to float rounding
    assert figures["continuous_max_rel_diff"] < 1e-5


def test_parity_fails_when_the_reference_computes_another_function(tmp_path, monkeypatch):
    src = write_embedding_checkpoint(tmp_path / "src", "gemma3", "medium")
    load = reference.load_embedding_reference

    def changed(folder):  # transformers' model with one BitLinear norm off by 5%: not rounding
        model = load(folder)
        with torch.no_grad():
            model.layers[1].mlp.up_proj.rms_norm.weight.mul_(1.05)
        return model

    monkeypatch.setattr(reference, "load_embedding_reference", changed)
    (parity,) = api.verify(src, src, levels="parity").layers
    assert not parity.passed
    assert any(f.startswith("decoder layer 1:") for f in parity.failures), parity.failures
    assert not any(f.startswith("decoder layer 0:") for f in parity.failures)  # teacher forcing: no carry-over
