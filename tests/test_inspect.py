"""`inspect`: the numbers it prints are the checkpoint's own, in every format."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_convert.cli import main
from bitnet_convert.formats import registry
from bitnet_convert.tiny import tiny_checkpoint

OUT_NAMES = {"hf": "m-hf", "flax": "m-flax", "npz": "m.npz", "gguf": "m.gguf"}


@pytest.fixture(scope="module")
def model():
    return tiny_checkpoint(seed=5)


@pytest.mark.parametrize("fmt", list(registry.FORMATS))
def test_json_report_matches_the_tensors(model, fmt, tmp_path):
    path = registry.write_checkpoint(model, str(tmp_path / OUT_NAMES[fmt]), fmt)
    result = CliRunner().invoke(main, ["inspect", "--json", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["format"] == fmt
    assert report["config"]["hidden_size"] == 256 and report["config"]["num_hidden_layers"] == 2
    assert report["size_bytes"] > 0
    tensors = {t["name"]: t for t in report["tensors"]}
    assert list(tensors) == list(model.tensors)
    for name, entry in model.tensors.items():
        row = tensors[name]
        assert row["shape"] == list(entry.shape)
        if entry.kind == "ternary":
            t = entry.load()
            shares = [float(np.mean(t.codes == v)) for v in (-1, 0, 1)]
            assert [row["share_minus"], row["share_zero"], row["share_plus"]] == pytest.approx(shares, abs=1e-12)
            assert row["multiplier"] == float(t.multiplier)
        else:
            assert row["share_zero"] is None and row["multiplier"] is None


def test_text_report_names_format_architecture_and_statistics(model, tmp_path):
    path = registry.write_checkpoint(model, str(tmp_path / "m.gguf"), "gguf", target="bitnet.cpp")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("format        gguf")
    assert "BitNetForCausalLM" in lines[2] and "heads 4/2" in lines[2] and "act relu2" in lines[2]
    q = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj.weight"))
    codes = model["model.layers.0.self_attn.q_proj.weight"].load()
    assert f"{np.mean(codes.codes == 0):6.3f}" in q and "256x256" in q


def test_inspect_of_a_missing_path_is_one_error_line(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nothing.gguf")])
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and "nothing.gguf" in result.output
