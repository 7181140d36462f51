"""The Flax folder format: lossless round trips, provenance, and restoring with plain safetensors + nnx."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from same import assert_same_tensors

from bitnet_convert import api
from bitnet_convert.fileio import integrity
from bitnet_convert.formats import flax_dir, hf
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Ternary
from bitnet_core.codecs import hf2bit, rows4
from bitnet_core.config import ModelConfig
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_model import BitNetForCausalLM, params

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(seed=7)


@pytest.fixture(scope="module")
def folder(ckpt, tmp_path_factory):
    return flax_dir.write(ckpt, str(tmp_path_factory.mktemp("flax") / "model-flax"))


def test_round_trip_is_bit_exact(ckpt, folder):
    back = flax_dir.read(str(folder))
    assert_same_tensors(ckpt, back)
    assert back.load("model.embed_tokens.weight").dtype == BF16  # bf16 stays bf16 on disk
    assert back.config == ckpt.config
    assert back.tokenizer_files == ckpt.tokenizer_files
    assert flax_dir.detect(folder) and not hf.detect(folder)


def test_keys_are_nnx_state_paths(ckpt, folder):
    stored = load_file(str(folder / flax_dir.PARAMS_FILE))
    q = stored["model.layers.0.self_attn.q_proj.packed"]
    codes = ckpt.load("model.layers.0.self_attn.q_proj.weight").codes
    assert q.dtype == np.uint8 and q.shape == (codes.shape[0] // 4, codes.shape[1])  # 2 bits per code
    for k in range(4):  # output row 4r + k in bits 2k..2k+1 of packed row r, code + 1
        np.testing.assert_array_equal((q >> (2 * k)) & 3, codes[k::4] + 1)
    assert stored["model.layers.0.self_attn.q_proj.multiplier"].shape == ()
    assert stored["model.layers.1.mlp.ffn_sub_norm.weight"].dtype == BF16
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    _, state = nnx.split(nnx.eval_shape(lambda: BitNetForCausalLM(cfg)))
    assert {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)} == set(stored)


@pytest.mark.slow
def test_plain_safetensors_and_nnx_restore_as_documented(ckpt, folder):
    """The recipe in flax_dir's docstring, verbatim in spirit: no bitnet_convert involved."""
    cfg = ModelConfig.from_hf(json.load(open(folder / "config.json")))
    model = nnx.eval_shape(lambda: BitNetForCausalLM(cfg))
    graphdef, state = nnx.split(model)
    stored = load_file(str(folder / "params.safetensors"))
    flat = [(path, jnp.asarray(stored[".".join(map(str, path))], var.dtype)) for path, var in nnx.to_flat_state(state)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    ids = np.arange(30, dtype=np.int32).reshape(2, 15)
    np.testing.assert_array_equal(params.logits(model, ids), params.logits(api.load_model(folder), ids))
    np.testing.assert_array_equal(params.logits(model, ids), params.logits(params.model_from_checkpoint(ckpt), ids))


def test_provenance_and_content_hash(ckpt, folder):
    record = flax_dir.recorded_provenance(folder)
    assert record["format"] == "flax" and record["format_version"] == flax_dir.FORMAT_VERSION
    assert record["source"] == ckpt.provenance["source"] and record["projections"] == "ternary"
    assert record["content_hash"] == integrity.hash_stored(flax_dir.stored_tensor_bytes(folder))
    names = [name for name, _ in flax_dir.stored_tensor_bytes(folder)]
    assert names[0] == "model.embed_tokens.weight" and "model.layers.0.self_attn.q_proj.packed" in names
    assert json.loads((folder / "bitnet_convert.json").read_text())["format_version"] == 2


def test_training_checkpoint_round_trip(tmp_path):
    masters = tiny_checkpoint(seed=2, masters=True)  # bf16 master weights in the projections
    out = flax_dir.write(masters, str(tmp_path / "masters-flax"))
    stored = load_file(str(out / flax_dir.PARAMS_FILE))
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == BF16
    assert not any(k.endswith(".packed") for k in stored)
    assert_same_tensors(masters, flax_dir.read(str(out)))
    assert flax_dir.recorded_provenance(out)["projections"] == "master weights"
    # ... and the training model's float32 state restores from it
    model = params.model_from_checkpoint(flax_dir.read(str(out)), mode="training")
    master = np.asarray(model.model.layers[0].mlp.down_proj.weight[...])
    np.testing.assert_array_equal(master, stored["model.layers.0.mlp.down_proj.weight"].astype(np.float32))


def test_model_export_round_trip_through_flax_is_bit_exact(ckpt, tmp_path):
    """Checkpoint -> model (float32) -> Checkpoint (stored dtypes) -> flax -> Checkpoint: nothing changes."""
    exported = params.checkpoint_from_model(params.model_from_checkpoint(ckpt), tokenizer_files=ckpt.tokenizer_files)
    assert_same_tensors(ckpt, flax_dir.read(str(flax_dir.write(exported, str(tmp_path / "m-flax")))))


def test_hf_to_flax_to_hf_is_bit_exact(hf_checkpoint, tmp_path):
    source = hf_checkpoint("autobitlinear")
    flax_out = flax_dir.write(hf.read(str(source)), str(tmp_path / "m-flax"))
    hf_out = hf.write(flax_dir.read(str(flax_out)), str(tmp_path / "m-hf"))
    original = dict(hf.stored_tensor_bytes(source))
    again = dict(hf.stored_tensor_bytes(hf_out))
    assert original.keys() == again.keys()
    assert all(bytes(original[k]) == bytes(again[k]) for k in original)


def test_hf_source_is_regrouped_without_int8_codes(hf_checkpoint, tmp_path, monkeypatch):
    """hf -> flax transcodes the HF bytes (rows4.from_hf2bit), and the result is byte-identical to packing the
    codes; flax -> npz/gguf get HF-layout bytes from load_packed, again without int8 codes."""
    source = hf.read(str(hf_checkpoint("autobitlinear")))
    codes = {e.name: e.load().codes for e in source if e.kind == "ternary"}
    monkeypatch.setattr(hf2bit, "unpack", lambda *a: pytest.fail("int8 codes were made"))
    out = flax_dir.write(source, str(tmp_path / "m-flax"))
    stored = load_file(str(out / flax_dir.PARAMS_FILE))
    for name, want in codes.items():
        assert stored[name.replace(".weight", ".packed")].tobytes() == rows4.pack(want).tobytes(), name
    back = flax_dir.read(str(out))
    for name, want in codes.items():
        packed = back[name].load_packed()
        assert packed.layout == hf2bit.LAYOUT and packed.data.tobytes() == hf2bit.pack(want).tobytes(), name


def test_code_3_in_packed_bytes_is_corrupt_data(folder, tmp_path):
    import shutil

    from damage import patch_tensor

    copy = tmp_path / "code3-flax"
    shutil.copytree(folder, copy)
    key = "model.layers.0.mlp.gate_proj.packed"
    patch_tensor(copy / flax_dir.PARAMS_FILE, key, b"\x0c", at=5)  # field 1 of byte 5 = 3
    ckpt = flax_dir.read(str(copy))
    entry = ckpt["model.layers.0.mlp.gate_proj.weight"]
    for load in (entry.load, entry.load_packed):
        with pytest.raises(CorruptData, match=rf"params.safetensors: tensor {key}: .*code 3"):
            load()
    with pytest.raises(ConvertError, match=rf"{key}.*code 3"):
        params.model_from_checkpoint(ckpt)


def test_version_1_folders_are_refused_clearly(ckpt, tmp_path):
    from safetensors.numpy import save_file

    old = tmp_path / "v1-flax"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(ckpt.config))
    arrays = {}
    for name, value in ckpt.materialize().items():
        if isinstance(value, Ternary):
            arrays[name.replace(".weight", ".codes")] = value.codes
            arrays[name.replace(".weight", ".multiplier")] = np.asarray(value.multiplier, np.float32)
        else:
            arrays[name] = value
    save_file(arrays, str(old / "params.safetensors"), metadata={"bitnet_convert_format_version": "1"})
    with pytest.raises(ConvertError, match="version-1 Flax folder.*Convert the model again"):
        flax_dir.read(str(old))
    save_file(arrays, str(old / "params.safetensors"))  # no metadata: recognized by its `.codes` leaves
    with pytest.raises(ConvertError, match="version-1 Flax folder"):
        flax_dir.read(str(old))


def test_out_features_not_a_multiple_of_4_are_refused(tmp_path):
    odd = tiny_checkpoint(seed=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=12)  # k/v: 6 rows
    with pytest.raises(ConvertError, match="k_proj.weight has shape \\[6, 12\\].*multiple of 4"):
        flax_dir.write(odd, str(tmp_path / "odd-flax"))
    assert not (tmp_path / "odd-flax").exists()
    with pytest.raises(ConvertError, match="6 output features.*multiple of 4"):
        params.model_from_checkpoint(odd)


def test_refuses_to_overwrite_and_rejects_corrupt_codes(ckpt, folder, tmp_path):
    with pytest.raises(ConvertError, match="already exists"):
        flax_dir.write(ckpt, str(folder))
    bad = dict(ckpt.materialize())
    name = "model.layers.0.self_attn.k_proj.weight"
    codes = bad[name].codes.copy()
    codes[0, 0] = 2
    bad[name] = Ternary(codes, bad[name].multiplier)
    corrupt = type(ckpt).from_arrays(ckpt.config, bad)
    with pytest.raises(CorruptData, match="outside"):
        flax_dir.write(corrupt, str(tmp_path / "bad-flax"))
    assert not (tmp_path / "bad-flax").exists() and not list(tmp_path.glob(".bad-flax*"))


def test_truncated_file_is_an_error(folder, tmp_path):
    import shutil

    copy = tmp_path / "cut-flax"
    shutil.copytree(folder, copy)
    path = copy / flax_dir.PARAMS_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConvertError, match="params.safetensors"):
        flax_dir.read(str(copy))
