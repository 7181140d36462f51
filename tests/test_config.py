"""ModelConfig reads every field from the checkpoint's own config.json, in both spellings transformers uses."""

import json

import numpy as np
import pytest

from bitnet_convert.reference import load_reference, reference_logits
from bitnet_convert.tiny import tiny_config
from bitnet_core.config import ConfigError, ModelConfig
from bitnet_model import params


def test_rope_theta_top_level_and_inside_rope_parameters():
    top = tiny_config(384)
    nested = {k: v for k, v in top.items() if k != "rope_theta"}
    nested["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert ModelConfig.from_hf(top).rope_theta == ModelConfig.from_hf(nested).rope_theta == 500000.0


def test_fields_come_from_the_file_not_library_defaults():
    cfg = ModelConfig.from_hf(tiny_config(384, num_key_value_heads=1, tie_word_embeddings=False, hidden_act="silu"))
    assert (cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.hidden_act) == (1, False, "silu")
    assert cfg.max_position_embeddings == 512 and cfg.head_dim == 64 and cfg.sub_norms


def test_llama_family_bitnet_has_no_sub_norms():
    cfg = ModelConfig.from_hf(tiny_config(384, architecture="LlamaForCausalLM", hidden_act="silu"))
    assert not cfg.sub_norms and cfg.architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
])
def test_configs_we_cannot_run_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**tiny_config(384), **change})


@pytest.mark.slow
def test_rope_parameters_checkpoint_matches_transformers(hf_checkpoint, tmp_path):
    """transformers 5 and our model both take theta from rope_parameters: same logits as the top-level spelling."""
    src = hf_checkpoint("autobitlinear")
    nested = tmp_path / "nested"
    nested.mkdir()
    for f in src.iterdir():
        (nested / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    (nested / "config.json").write_text(json.dumps(config))

    from bitnet_convert.formats import hf

    ids = np.random.default_rng(0).integers(0, 384, size=(1, 96))
    ours = params.logits(params.model_from_checkpoint(hf.read(str(nested))), ids)
    np.testing.assert_array_equal(ours, params.logits(params.model_from_checkpoint(hf.read(str(src))), ids))
    ref = reference_logits(load_reference(nested), ids)
    assert np.abs(ours - ref).max() <= 5e-2 * np.abs(ref).max()
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
