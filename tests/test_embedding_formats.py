"""The BitNet-embedding models through Flax, npz and back to their own HF layout, exactly; verify passes the
conversions and fails a damaged copy (docs/formats.md §12)."""

import reference_extra

reference_extra.require()  # the fixtures are written with torch and transformers

import json

import pytest
import torch
from embedding_fixtures import write_embedding_checkpoint
from safetensors.torch import load_file, save_file

from bitnet_convert import api

SIDE_FILES = ("config.json", "modules.json", "1_Pooling/config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.mark.parametrize("backbone", ["qwen3", "gemma3"])
@pytest.mark.slow
def test_flax_npz_and_back_to_the_same_layout(tmp_path, backbone):
    src = write_embedding_checkpoint(tmp_path / "src", backbone, "small", pooling="lasttoken")
    flax = api.convert(src, tmp_path / "m-flax", quiet=True)
    npz = api.convert(flax, tmp_path / "m.npz", quiet=True)
    back = api.convert(npz, tmp_path / "back", quiet=True)
    original, returned = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert list(returned) == sorted(original) or set(returned) == set(original)  # names without `model.`
    assert not any(name.startswith("model.") for name in returned)
    for name, value in original.items():  # bf16 masters and norms, bit for bit
        assert returned[name].dtype == value.dtype == torch.bfloat16
        assert torch.equal(returned[name].view(torch.int16), value.view(torch.int16)), name
    for name in SIDE_FILES:  # config as it was (no quantization_config added), pooling files carried
        if name == "config.json":
            assert json.loads((back / name).read_text()) == json.loads((src / name).read_text())
        else:
            assert (back / name).read_bytes() == (src / name).read_bytes(), name
    for candidate in (flax, npz, back):
        report = api.verify(candidate, src)
        assert report.passed, report.as_dict()
        assert [layer.name for layer in report.layers] == ["weights", "function"]
        assert report.as_dict()["max_abs_diff"] == 0.0
    # the pooling travels: embed reads it from every format
    assert {api.embed(p, "hello world").pooling for p in (flax, npz, back)} == {"last"}


def test_verify_fails_a_damaged_projection_norm(tmp_path):
    src = write_embedding_checkpoint(tmp_path / "src", "gemma3", "small")
    damaged = write_embedding_checkpoint(tmp_path / "damaged", "gemma3", "small")
    tensors = load_file(str(damaged / "model.safetensors"))
    name = "layers.1.mlp.down_proj.norm.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3] += 0.25
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    report = api.verify(damaged, src)
    assert not report.passed
    weights = next(layer for layer in report.layers if layer.name == "weights")
    function = next(layer for layer in report.layers if layer.name == "function")
    assert not weights.passed and any("model.layers.1.mlp.down_proj.norm.weight" in f for f in weights.failures)
    assert not function.passed  # the hidden states differ too


@pytest.mark.parametrize("args, message", [
    (["generate", "{src}", "--prompt-ids", "1 2"], "Qwen3Model is an embedding model, it does not generate text"),
])
def test_what_is_not_supported_says_so_in_one_line(tmp_path, args, message):
    from click.testing import CliRunner

    from bitnet_convert.cli import main

    src = write_embedding_checkpoint(tmp_path / "src", "qwen3", "small")
    result = CliRunner().invoke(main, [a.format(src=src, tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {src}: {message}" + result.stderr.split(message, 1)[1].rstrip()]
    assert not (tmp_path / "x.gguf").exists()
