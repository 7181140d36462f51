"""`verify`: passes on lossless conversions, fails on a changed multiplier, speaks JSON and exit codes."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bitnet_convert.cli import main


def _verify(*args):
    result = CliRunner().invoke(main, ["verify", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    src = hf_checkpoint("autobitlinear")
    out = tmp_path_factory.mktemp("verify") / "model.npz"
    result = CliRunner().invoke(main, ["hf-to-npz", str(src), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return src, out


def test_verify_passes_on_a_lossless_conversion(converted):
    src, npz = converted
    code, out = _verify(str(npz), "--reference", str(src), "--json")
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0, out
    assert report["passed"] is True
    assert report["top1_agreement"] >= 0.99
    assert report["max_abs_diff"] <= report["tolerance"]
    assert report["mean_kl"] < 1e-3
    assert report["tokens_compared"] == 2 * 160 + 17 + 2 * 48


def test_verify_fails_when_one_weight_scale_is_scaled_by_1_5(converted, tmp_path):
    src, _ = converted
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    tensors[name] = (tensors[name].float() * 1.5).to(torch.bfloat16)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})

    code, out = _verify(str(bad), "--reference", str(src), "--json")
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 1
    assert report["passed"] is False
    assert report["max_abs_diff"] > report["tolerance"]
    assert report["mean_kl"] > 1e-3


def test_verify_table_and_tolerance_flags(converted):
    src, npz = converted
    code, out = _verify(str(npz), "--reference", str(src))
    assert code == 0 and "PASS" in out and "top-1 agreement" in out
    # An impossible tolerance turns the same comparison into a failure with exit code 1.
    code, out = _verify(str(npz), "--reference", str(src), "--rtol", "0", "--max-kl", "0", "--min-top1", "1.01")
    assert code == 1 and "FAIL" in out


def test_verify_with_a_missing_reference_is_one_error_line(converted):
    _, npz = converted
    code, out = _verify(str(npz), "--reference", "/nonexistent/reference")
    assert code == 2
    assert out.count("error:") == 1 and "/nonexistent/reference" in out and "Traceback" not in out
