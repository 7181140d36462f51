"""Every output says where it came from and can prove it is unchanged (issue #5, part 2).

- Provenance: every format's output records producer, package version, source, source format, revision and a
  content hash of the model (`blake3-model-v4`, test_model_hash.py, test_blake3_hash.py); a hub source keeps its repo id and commit.
- `inspect --check` recomputes the hash from the file alone: exit 0 on a fresh output of every format and
  GGUF type, exit 1 after one byte of tensor data is flipped (a dense tensor and a ternary one).
- `inspect` and `verify` warn about degenerate weights: an all-zero tensor, a multiplier far from its
  siblings, a ternary weight with almost no non-zeros; a healthy model gets no warning.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from damage import (
    GGUF_NORM,
    GGUF_PROJ,
    GGUF_VARIANTS,
    NORM,
    PROJ,
    copy,
    gguf_tensor_offsets,
    npz_array,
    npz_data_offset,
    npz_rewrite,
    run_cli,
    safetensors_offsets,
    small_checkpoint,
    write,
    xor_byte,
)

from bitnet_convert.fileio.integrity import HASH_ALGORITHM, PROVENANCE_FILE, hash_stored
from bitnet_convert.formats import registry
from bitnet_core import __version__
from bitnet_core.checkpoint import Checkpoint, Ternary

REPO_ID = "bitnet-tests/tiny-bitnet"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# output variant -> (format, writer options, output name)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "hf": ("hf", {}, "m-hf"),
    "hf-bitlinear": ("hf", {"layout": "bitlinear"}, "m-bitlinear-hf"),
    "flax": ("flax", {}, "m-flax"),
    "npz": ("npz", {}, "m.npz"),
    **{f"gguf-{k}": ("gguf", v, f"m-{k}.gguf") for k, v in GGUF_VARIANTS.items()},
}



@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """An offline Hugging Face cache holding REPO_ID at COMMIT (refs/main points to it)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "snapshots").mkdir(parents=True)
    write(small_checkpoint(seed=21), repo / "snapshots" / COMMIT, "hf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.fixture(scope="module")
def outputs(hub_cache, tmp_path_factory):
    """Every output variant, converted from the hub repo id (through the offline cache)."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("outputs")
    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(hub_cache), True
    try:
        ckpt = registry.read_checkpoint(REPO_ID)
        return {name: registry.write_checkpoint(ckpt, str(root / out), fmt, **opts)
                for name, (fmt, opts, out) in VARIANTS.items()}
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


# ---------------------------------------------------------------------------------------------- provenance


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_output_records_its_source_and_a_content_hash(variant, outputs):
    fmt = VARIANTS[variant][0]
    module = registry.format_module(fmt)
    record = module.recorded_provenance(outputs[variant])
    assert record is not None
    assert record["producer"] == "bitnet-convert"
    assert record["producer_version"] == __version__
    assert record["format"] == fmt
    assert record["source"] == REPO_ID
    assert record["source_format"] == "hf"
    assert record["revision"] == COMMIT
    assert record["hash_algorithm"] == HASH_ALGORITHM
    assert re.fullmatch(r"[0-9a-f]{64}", record["content_hash"])
    assert record["content_hash"] == hash_stored(module.stored_tensor_bytes(outputs[variant]))


def test_a_local_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    src = write(small_checkpoint(seed=22), tmp_path / "src-hf", "hf")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["convert", "src-hf", "out.npz", "-q"]).exit_code == 0
    record = registry.format_module("npz").recorded_provenance(tmp_path / "out.npz")
    assert (record["converted_from"], record["converted_from_format"]) == (str(src.resolve()), "hf")
    assert (record["source"], record["source_format"]) == ("bitnet_convert.tiny seed=22", "tiny")  # its origin
    assert record["revision"] is None

    foreign = tmp_path / "foreign-hf"  # an HF folder we did not write is its own source
    shutil.copytree(src, foreign)
    (foreign / PROVENANCE_FILE).unlink()
    assert run_cli(["convert", "foreign-hf", "out2.npz", "-q"]).exit_code == 0
    record = registry.format_module("npz").recorded_provenance(tmp_path / "out2.npz")
    assert (record["source"], record["source_format"]) == (str(foreign.resolve()), "hf")


def test_a_hub_revision_given_on_the_command_line_is_recorded(offline_hub, tmp_path):
    out = tmp_path / "m.npz"
    result = run_cli(["hf-to-npz", REPO_ID, out, "--revision", COMMIT, "-q"])
    assert result.exit_code == 0, result.stderr
    record = registry.format_module("npz").recorded_provenance(out)
    assert (record["source"], record["revision"]) == (REPO_ID, COMMIT)


@pytest.mark.parametrize(
    "via",
    [
        "hf",
        "flax",
        "npz",
        "gguf",
    ],
)
def test_the_original_source_survives_a_chain_of_conversions(via, outputs, tmp_path):
    """hub -> X -> npz: the npz still names the hub repo and commit (as the npz and flax readers promise)."""
    first = outputs[{"hf": "hf", "flax": "flax", "npz": "npz", "gguf": "gguf-tq2_0"}[via]]
    out = tmp_path / "again.npz"
    assert run_cli(["convert", first, out, "-q"]).exit_code == 0
    record = registry.format_module("npz").recorded_provenance(out)
    assert (record["source"], record["revision"]) == (REPO_ID, COMMIT)


# ---------------------------------------------------------------------------------------- inspect --check


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_check_passes_on_a_fresh_output(variant, outputs):
    result = run_cli(["inspect", "--check", "--json", outputs[variant]])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["check_passed"] is True
    assert report["recorded_hash"] == report["computed_hash"]
    assert report["provenance"]["source"] == REPO_ID


def _first_byte(data: np.ndarray, ok) -> int:
    """Index of the first byte for which `ok(byte)` holds (a byte whose flip keeps the tensor decodable)."""
    hits = np.flatnonzero(ok(data))
    assert hits.size, "no suitable byte"
    return int(hits[0])


def _ternary_ok(variant: str):
    """Bytes of a stored ternary tensor where XOR 1 gives another valid value (never code 3)."""
    if variant.startswith("hf") or variant in ("flax", "gguf-tq2_0", "gguf-i2_s", "gguf-q8_0-embed"):
        return lambda b: (b & 3) < 2  # 2-bit codes: 0 <-> 1 in the low field
    if variant == "npz":
        return lambda b: (b % 2 == 0) & (b < 242)  # base-3 byte b -> b + 1 <= 242
    return lambda b: np.ones_like(b, bool)  # TQ1_0 digits, float codes: any byte (a float may stop being ternary)


def _flip(variant: str, path: Path, which: str) -> None:
    """Flip one bit of tensor data: `which` is "dense" (a norm weight) or "ternary" (a projection)."""
    fmt = VARIANTS[variant][0]
    if fmt in ("hf", "flax"):
        file = path / ("model.safetensors" if fmt == "hf" else "params.safetensors")
        key = NORM if which == "dense" else (PROJ if fmt == "hf" else PROJ.replace(".weight", ".packed"))
        start, end = safetensors_offsets(file)[key]
        data = np.frombuffer(file.read_bytes()[start:end], np.uint8)
        at = 0 if which == "dense" else _first_byte(data, _ternary_ok(variant))
        xor_byte(file, start + at)
    elif fmt == "gguf":
        offset = gguf_tensor_offsets(path)[GGUF_NORM if which == "dense" else GGUF_PROJ]
        data = np.frombuffer(path.read_bytes()[offset : offset + 4096], np.uint8)
        at = 0 if which == "dense" else _first_byte(data, _ternary_ok(variant))
        xor_byte(path, offset + at)
    else:  # npz: raw flip (the zip CRC then fails); see the CRC-consistent test below
        key = f"tensor/{NORM}/data" if which == "dense" else f"tensor/{PROJ}/codes"
        data = npz_array(path, key).view(np.uint8).reshape(-1)
        at = 0 if which == "dense" else _first_byte(data, _ternary_ok(variant))
        xor_byte(path, npz_data_offset(path, key) + at)


@pytest.mark.parametrize("which", ["dense", "ternary"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_check_fails_after_one_flipped_byte_of_tensor_data(variant, which, outputs, tmp_path):
    path = copy(outputs[variant], tmp_path / outputs[variant].name)
    _flip(variant, path, which)
    result = run_cli(["inspect", "--check", path])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    if errors:  # the flip made bytes no writer produces (a CRC error, a float that is no longer ternary)
        assert len(errors) == 1 and str(path) in errors[0]
        assert not (variant.startswith(("hf", "gguf-tq2", "gguf-i2")) or variant == "flax"), errors[0]
    else:
        assert "MISMATCH" in result.stdout


@pytest.mark.parametrize("which", ["dense", "ternary"])
def test_check_fails_on_an_npz_changed_behind_a_valid_zip_crc(which, outputs, tmp_path):
    """An edit with the zip's CRC recomputed (e.g. by a tool): only the content hash can tell."""
    key = f"tensor/{NORM}/data" if which == "dense" else f"tensor/{PROJ}/codes"
    array = npz_array(outputs["npz"], key).copy()
    flat = array.view(np.uint8).reshape(-1)
    flat[_first_byte(flat, _ternary_ok("npz"))] ^= 1
    path = npz_rewrite(outputs["npz"], tmp_path / "edited.npz", replace={key: array})
    result = run_cli(["inspect", "--check", path])
    assert result.exit_code == 1, result.stderr
    assert "MISMATCH" in result.stdout
    assert "OK" not in result.stdout.split("content hash", 1)[1].splitlines()[0]


def test_check_refuses_a_file_with_no_recorded_hash(tmp_path, outputs):
    """A foreign file (here: our hf output with its provenance removed) has nothing to check against."""
    path = copy(outputs["hf"], tmp_path / "foreign-hf")
    (path / "bitnet_convert.json").unlink()
    result = run_cli(["inspect", "--check", path])
    assert result.exit_code == 2
    assert "records no content hash" in result.stderr


# -------------------------------------------------------------------------------------- degenerate weights

Q0 = "model.layers.0.self_attn.q_proj.weight"
K1 = "model.layers.1.self_attn.k_proj.weight"
V2 = "model.layers.2.self_attn.v_proj.weight"
N3 = "model.layers.3.input_layernorm.weight"


def degenerate_checkpoint() -> Checkpoint:
    """Four layers (so a projection has three siblings), each holding one kind of degenerate weight."""
    ckpt = small_checkpoint(seed=23, num_hidden_layers=4)
    arrays = ckpt.materialize()
    q = arrays[Q0]
    arrays[Q0] = Ternary(np.zeros_like(q.codes), q.multiplier)  # all zero
    k = arrays[K1]
    sparse = np.zeros_like(k.codes)
    sparse.reshape(-1)[:: 250] = 1  # 0.4 % non-zero
    arrays[K1] = Ternary(sparse, k.multiplier)
    v = arrays[V2]
    arrays[V2] = Ternary(v.codes, np.float32(v.multiplier * 64))  # far from its siblings' ~1.5
    arrays[N3] = np.zeros_like(arrays[N3])  # an all-zero norm
    return Checkpoint.from_arrays(ckpt.config, arrays, tokenizer_files=ckpt.tokenizer_files, provenance=ckpt.provenance)


EXPECTED_WARNINGS = {
    Q0: r"all-zero",
    K1: r"only 0\.\d+% non-zero",
    V2: r"multiplier .* the median of its siblings",
    N3: r"all-zero tensor",
}


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:") and "llama.cpp's bitnet graph" not in line]


@pytest.mark.parametrize("variant", ["hf", "flax", "npz", "gguf-tq2_0", "gguf-i2_s"])
def test_inspect_warns_about_degenerate_weights(variant, tmp_path):
    fmt, opts, name = VARIANTS[variant]
    path = write(degenerate_checkpoint(), tmp_path / name, fmt, **opts)
    result = run_cli(["inspect", path])
    assert result.exit_code == 0, result.stderr
    warnings = _warnings(result.stderr)
    for tensor, why in EXPECTED_WARNINGS.items():
        hits = [w for w in warnings if tensor in w]
        assert len(hits) == 1 and re.search(why, hits[0]), (tensor, warnings)
    assert len(warnings) == len(EXPECTED_WARNINGS), warnings


def test_inspect_does_not_warn_about_a_healthy_model(outputs):
    result = run_cli(["inspect", outputs["npz"]])
    assert result.exit_code == 0
    assert _warnings(result.stderr) == []


@pytest.mark.slow
def test_verify_warns_about_degenerate_weights(tmp_path):
    """The candidate is the reference itself, so only the warnings are under test (not the parity)."""
    ckpt = degenerate_checkpoint()
    reference = write(ckpt, tmp_path / "ref-hf", "hf")
    candidate = write(ckpt, tmp_path / "cand.npz", "npz")
    result = run_cli(["verify", candidate, "--reference", reference, "--json"])
    assert result.exit_code in (0, 1), result.stderr  # a verdict, not an error
    warnings = _warnings(result.stderr)
    for tensor, why in EXPECTED_WARNINGS.items():
        assert any(tensor in w and re.search(why, w) for w in warnings), (tensor, warnings)
    assert sorted(json.loads(result.stdout)["warnings"]) == sorted(w.removeprefix("warning: ") for w in warnings)
