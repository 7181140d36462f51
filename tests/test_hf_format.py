"""The Hugging Face reader and writer against independently written fixtures (tests/fixtures.py) and transformers."""

import reference_extra

reference_extra.require()  # the fixtures are written with torch and transformers

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from fixtures import LAYOUTS, QUANT_CONFIGS
from same import assert_same_tensors

from bitnet_convert.fileio import integrity
from bitnet_convert.formats import hf
from bitnet_convert.reference import load_reference, reference_logits
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core import quantize
from bitnet_core.checkpoint import DENSE, TERNARY, Checkpoint, Ternary
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_core.names import is_projection

BF16 = np.dtype(ml_dtypes.bfloat16)
TOKENS = np.array([[5, 17, 200, 3, 99, 250, 12, 44, 7, 130]])


@pytest.fixture(scope="module")
def original():
    """The tiny model every fixture was written from: codes, multipliers and masters to compare with."""
    return {"ternary": tiny_checkpoint(seed=0).materialize(), "masters": tiny_checkpoint(seed=0, masters=True).materialize()}


@pytest.fixture(scope="module")
def written(hf_checkpoint, tmp_path_factory):
    """Factory: (source layout, target layout, **write options) -> folder written by hf.write, cached."""
    cache = {}

    def make(source: str, target: str, **options):
        key = (source, target, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{source}-to-{target}") / "out"
            cache[key] = hf.write(hf.read(str(hf_checkpoint(source))), str(out), layout=target, **options)
        return cache[key]

    return make


def stored(folder: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(folder / "model.safetensors"))


def bf16_round(x) -> np.float32:
    return np.float32(np.float32(x).astype(BF16))


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_back_the_model_it_was_written_from(hf_checkpoint, original, layout):
    ckpt = hf.read(str(hf_checkpoint(layout)))
    assert ckpt.provenance["format"] == "hf" and ckpt.provenance["layout"] == layout
    assert ckpt.provenance["quantization_config"] == QUANT_CONFIGS[layout]
    assert "quantization_config" not in ckpt.config
    expected = original["masters" if layout == "online" else "ternary"]
    assert list(ckpt.tensors) == list(expected)  # model order
    for name, want in expected.items():
        got = ckpt.load(name)
        if isinstance(want, Ternary):
            assert ckpt[name].kind == TERNARY and isinstance(got, Ternary)
            assert got.codes.dtype == np.int8 and np.array_equal(got.codes, want.codes), name
            if layout == "autobitlinear":
                assert got.multiplier == want.multiplier, name
            else:  # bitlinear stores bf16(1/w); the multiplier is its float32 inverse
                assert got.multiplier == np.float32(1) / bf16_round(np.float32(1) / want.multiplier), name
        else:  # dense: norms, embeddings and (online) master weights, exactly as stored
            assert ckpt[name].kind == DENSE and ckpt[name].dtype == want.dtype == got.dtype
            assert got.tobytes() == want.tobytes(), name


def test_tokenizer_files_are_copied_verbatim(hf_checkpoint):
    folder = hf_checkpoint("autobitlinear")
    ckpt = hf.read(str(folder))
    assert set(ckpt.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json"}
    for name, data in ckpt.tokenizer_files.items():
        assert data == (folder / name).read_bytes()


def test_reading_is_lazy(hf_checkpoint, monkeypatch):
    calls = []
    real_unpack = hf.hf2bit.unpack
    monkeypatch.setattr(hf.hf2bit, "unpack", lambda *a: calls.append(1) or real_unpack(*a))
    ckpt = hf.read(str(hf_checkpoint("autobitlinear")))
    assert calls == []
    ckpt.load("model.layers.0.mlp.down_proj.weight")
    assert len(calls) == 1


def test_ternarize_master_matches_transformers_weight_quant(original):
    """Codes exactly as AutoBitLinear's WeightQuant computes them; multiplier within one float32 ulp."""
    for name, master in original["masters"].items():
        if not is_projection(name):
            continue
        w = torch.from_numpy(master.astype(np.float32))
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        torch_codes = (w * scale).round().clamp(-1, 1).numpy().astype(np.int8)
        ours = quantize.ternarize_master(master)
        assert np.array_equal(ours.codes, torch_codes), name
        torch_multiplier = np.float32((1.0 / scale).item())
        assert abs(ours.multiplier - torch_multiplier) <= np.spacing(torch_multiplier), name


def test_ternarize_master_floors_the_mean_of_an_all_zero_matrix():
    t = quantize.ternarize_master(np.zeros((4, 8), BF16))
    assert not t.codes.any() and t.multiplier == np.float32(1) / (np.float32(1) / np.float32(1e-5))


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("layout", LAYOUTS)
def test_writing_the_layout_read_gives_bit_identical_tensors(hf_checkpoint, written, layout):
    source, out = hf_checkpoint(layout), written(layout, layout)
    before, after = stored(source), stored(out)
    assert set(after) == set(before)
    for name, array in before.items():
        assert after[name].dtype == array.dtype and after[name].shape == array.shape, name
        assert after[name].tobytes() == array.tobytes(), name
    config_in, config_out = (json.loads((d / "config.json").read_text()) for d in (source, out))
    assert config_out == config_in
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


@pytest.mark.parametrize("source", ["bitlinear", "online"])
def test_other_layouts_written_as_autobitlinear_keep_codes_and_multipliers(hf_checkpoint, written, source):
    ckpt_in = hf.read(str(hf_checkpoint(source)))
    out = written(source, "autobitlinear")
    ckpt_out = hf.read(str(out))
    assert ckpt_out.provenance["layout"] == "autobitlinear"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == QUANT_CONFIGS["autobitlinear"]
    for name, entry in ckpt_in.tensors.items():
        if not is_projection(name):
            assert ckpt_out.load(name).tobytes() == ckpt_in.load(name).tobytes()
            continue
        want = quantize.as_ternary(ckpt_in.load(name))
        got = ckpt_out.load(name)
        assert np.array_equal(got.codes, want.codes), name
        assert got.multiplier == bf16_round(want.multiplier), name  # weight_scale is bf16


def test_f32_weight_scales_keep_multipliers_exactly(hf_checkpoint, written):
    ckpt_in = hf.read(str(hf_checkpoint("online")))
    out = written("online", "autobitlinear", scale_dtype="f32")
    assert stored(out)["model.layers.0.mlp.up_proj.weight_scale"].dtype == np.float32
    ckpt_out = hf.read(str(out))
    for name in ckpt_in.tensors:
        if is_projection(name):
            assert ckpt_out.load(name).multiplier == quantize.ternarize_master(ckpt_in.load(name)).multiplier


def test_ternary_checkpoint_round_trips_through_the_bitlinear_layout(hf_checkpoint, written):
    ckpt_in = hf.read(str(hf_checkpoint("autobitlinear")))
    ckpt_out = hf.read(str(written("autobitlinear", "bitlinear")))
    files = stored(written("autobitlinear", "bitlinear"))
    for name in ckpt_in.tensors:
        if is_projection(name):
            m = ckpt_in.load(name).multiplier
            assert files[name.replace(".weight", ".weight_scale")][0] == bf16_round(np.float32(1) / m).astype(BF16)
            assert np.array_equal(ckpt_out.load(name).codes, ckpt_in.load(name).codes)


def test_online_layout_from_ternary_codes_is_refused(hf_checkpoint, tmp_path):
    ckpt = hf.read(str(hf_checkpoint("autobitlinear")))
    with pytest.raises(ConvertError, match="cannot write the online layout from ternary weights"):
        hf.write(ckpt, str(tmp_path / "out"), layout="online")
    assert not (tmp_path / "out").exists()


def test_provenance_and_content_hash_match_the_stored_bytes(hf_checkpoint, written):
    out = written("autobitlinear", "autobitlinear")
    record = hf.recorded_provenance(out)
    assert record["format"] == "hf" and record["source_format"] == "hf" and record["layout"] == "autobitlinear"
    assert record["source"] == str(hf_checkpoint("autobitlinear").resolve())
    assert record["hash_algorithm"] == integrity.HASH_ALGORITHM
    assert record["content_hash"] == integrity.hash_stored(hf.stored_tensor_bytes(out))
    names = [name for name, _ in hf.stored_tensor_bytes(out)]
    assert len(names) == len(stored(out)) and any(n.endswith(".weight_scale") for n in names)
    assert hf.recorded_provenance(hf_checkpoint("autobitlinear")) is None  # a foreign folder


def test_writing_refuses_to_overwrite_unless_forced(hf_checkpoint, tmp_path):
    ckpt = hf.read(str(hf_checkpoint("autobitlinear")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # someone's model folder: --force never replaces it (issue 15)
    (out / "keep").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        hf.write(ckpt, str(out))
    with pytest.raises(ConvertError):
        hf.write(ckpt, str(out), force=True)
    assert (out / "keep").exists()
    ours = hf.write(ckpt, str(tmp_path / "ours"))
    (ours / "model.safetensors").write_bytes(b"damaged")
    hf.write(ckpt, str(ours), force=True)  # our own earlier output: replaced whole
    assert hf.read(str(ours)).load("model.norm.weight").shape == ckpt.load("model.norm.weight").shape


def test_written_model_is_streamed_tensor_by_tensor(hf_checkpoint, tmp_path, monkeypatch):
    """Tensors load in order and at most a few ahead of the one being written (the prefetch of the next
    tensor on a second core): the writer never holds the model."""
    from bitnet_convert.fileio import prefetch

    ckpt = hf.read(str(hf_checkpoint("autobitlinear")))
    log = []
    lock = threading.Lock()

    def record(event):
        with lock:
            log.append(event)

    def logged(entry):
        return dataclasses.replace(entry, load=lambda: record(("load", entry.name)) or entry.load())

    wrapped = Checkpoint(ckpt.config, {n: logged(e) for n, e in ckpt.tensors.items()}, ckpt.tokenizer_files,
                         ckpt.provenance)
    real_begin = integrity.ModelHasher.begin  # each tensor's bytes are hashed as they are written
    monkeypatch.setattr(integrity.ModelHasher, "begin",
                        lambda self, name, *rest: record(("written", name)) or real_begin(self, name, *rest))
    hf.write(wrapped, str(tmp_path / "out"))
    loads = [name for event, name in log if event == "load"]
    writes = [name for event, name in log if event == "written" and not name.endswith("_scale")]
    assert loads == writes == list(ckpt.tensors)
    held = 0  # tensors loaded and not yet written
    for event, name in log:
        held += {"load": 1, "written": 0 if name.endswith("_scale") else -1}[event]
        assert 0 <= held <= prefetch.DEFAULT_DEPTH + 2
    scales = [name for event, name in log if name.endswith("_scale")]
    assert scales == [n.replace(".weight", ".weight_scale") for n in ckpt.tensors if is_projection(n)]


def test_sharded_output_and_input(hf_checkpoint, tmp_path):
    ckpt = hf.read(str(hf_checkpoint("autobitlinear")))
    out = hf.write(ckpt, str(tmp_path / "sharded"), max_shard_bytes=150_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_tensors(ckpt, hf.read(str(out)))
    assert hf.recorded_provenance(out)["content_hash"] == integrity.hash_stored(hf.stored_tensor_bytes(out))


def test_sharded_fixture_reads_like_the_single_file(hf_checkpoint, tmp_path):
    """Shards and index written with safetensors itself, by splitting the fixture's file."""
    source = hf_checkpoint("bitlinear")
    folder = tmp_path / "sharded"
    shutil.copytree(source, folder)
    tensors = stored(source)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in halves.items():
        safetensors.numpy.save_file({n: tensors[n] for n in members}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_tensors(hf.read(str(source)), hf.read(str(folder)))


# ------------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def fixture_logits(hf_checkpoint):
    return {layout: reference_logits(load_reference(hf_checkpoint(layout)), TOKENS) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformers_gives_identical_logits_on_a_rewritten_folder(written, fixture_logits, layout):
    logits = reference_logits(load_reference(written(layout, layout)), TOKENS)
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, fixture_logits[layout])


def test_transformers_agrees_with_online_masters_written_as_packed_codes(hf_checkpoint, written, fixture_logits):
    """Codes and f32 multipliers from ternarize_master reproduce transformers' own online quantization."""
    logits = reference_logits(load_reference(written("online", "autobitlinear", scale_dtype="f32")), TOKENS)
    np.testing.assert_allclose(logits, fixture_logits["online"], atol=1e-4, rtol=0)


def test_transformers_loads_every_cross_layout_output(written):
    # Across BitLinear and AutoBitLinear the float operations differ, and in this tiny relu² model a one-ulp
    # change can flip an int8 activation rounding, so only loading and finiteness are compared here; the
    # codes and multipliers are compared exactly above.
    for source, target in [("bitlinear", "autobitlinear"), ("autobitlinear", "bitlinear"), ("online", "bitlinear")]:
        logits = reference_logits(load_reference(written(source, target)), TOKENS)
        assert logits.shape == (1, TOKENS.shape[1], 384) and np.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def damaged(hf_checkpoint, tmp_path):
    """Factory: a writable copy of a fixture, with `edit(tensors)` applied to its model.safetensors."""

    def make(layout="autobitlinear", edit=None, config_edit=None):
        folder = tmp_path / f"damaged-{layout}"
        shutil.copytree(hf_checkpoint(layout), folder)
        if edit is not None:
            tensors = {k: v.copy() for k, v in stored(folder).items()}
            edit(tensors)
            safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if config_edit is not None:
            config = json.loads((folder / "config.json").read_text())
            config_edit(config)
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


Q = "model.layers.1.self_attn.q_proj"


def _set(name, value):
    def edit(tensors):
        tensors[name] = value
    return edit


def _drop(name):
    return lambda tensors: tensors.pop(name)


@pytest.mark.parametrize(
    "layout, edit, config_edit, message, named",
    [
        ("autobitlinear", _drop(f"{Q}.weight"), None, f"missing tensor {Q}.weight", "model.safetensors"),
        ("autobitlinear", _drop(f"{Q}.weight_scale"), None, f"missing tensor {Q}.weight_scale", "model.safetensors"),
        ("autobitlinear", _drop("model.norm.weight"), None, "missing tensor model.norm.weight", "model.safetensors"),
        ("autobitlinear", _set("extra.weight", np.ones(3, BF16)), None, "unexpected tensor extra.weight", "model.safetensors"),
        ("autobitlinear", None, lambda c: c.update(intermediate_size=256), "has shape", "model.safetensors"),
        ("autobitlinear", _set(f"{Q}.weight_scale", np.array([np.nan], BF16)), None, "finite positive", "model.safetensors"),
        ("autobitlinear", _set(f"{Q}.weight_scale", np.array([0.0], BF16)), None, "finite positive", "model.safetensors"),
        ("bitlinear", _set(f"{Q}.weight_scale", np.array([-2.0], BF16)), None, "finite positive", "model.safetensors"),
        ("autobitlinear", _set(f"{Q}.weight_scale", np.array([1, 2], np.int32)), None, "expected one float", "model.safetensors"),
        ("autobitlinear", _set(f"{Q}.weight", np.zeros((256, 256), BF16)), None, "expected 2-D packed uint8", "model.safetensors"),
        ("online", _set(f"{Q}.weight", np.zeros((64, 256), np.uint8)), None, "says online", "model.safetensors"),
        ("autobitlinear", None, lambda c: c.pop("quantization_config"), "no quantization_config", "config.json"),
        ("autobitlinear", None, lambda c: c["quantization_config"].update(quant_method="bitsandbytes"), "not 'bitnet'", "config.json"),
        ("autobitlinear", None, lambda c: c["quantization_config"].update(use_rms_norm=True), "use_rms_norm", "config.json"),
        ("autobitlinear", None, lambda c: c["quantization_config"].update(modules_to_not_convert=["mlp.down_proj"]),
         "leaves model.layers.0.mlp.down_proj unquantized", "config.json"),
        ("autobitlinear", None, lambda c: c.update(architectures=["GPT2LMHeadModel"]), "unsupported architecture", "config.json"),
    ],
    ids=["missing-weight", "missing-scale", "missing-norm", "extra", "shape-mismatch", "nan-scale", "zero-scale",
         "negative-inverse-scale", "int-scale", "bf16-in-packed", "packed-in-online", "no-quant-config",
         "other-quant-method", "rms-norm", "not-converted", "architecture"],
)
def test_bad_checkpoints_raise_one_error_naming_the_file(damaged, layout, edit, config_edit, message, named):
    folder = damaged(layout, edit, config_edit)
    with pytest.raises(ConvertError, match=message) as info:
        hf.read(str(folder))
    assert str(folder / named) in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_code_3_is_corrupt_data_naming_file_and_tensor(damaged, tmp_path):
    def poison(tensors):
        tensors[f"{Q}.weight"][3, 7] = 0b11_00_01_10
    folder = damaged("autobitlinear", poison)
    ckpt = hf.read(str(folder))  # lazy: found when the tensor is loaded
    with pytest.raises(CorruptData, match=f"{folder / 'model.safetensors'}: tensor {Q}.weight: .*invalid code 3"):
        ckpt.load(f"{Q}.weight")
    with pytest.raises(CorruptData, match="invalid code 3"):
        hf.write(ckpt, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_missing_config_and_truncated_weights_are_named(damaged):
    folder = damaged()
    (folder / "config.json").unlink()
    with pytest.raises(ConvertError, match="config.json: missing"):
        hf.read(str(folder))

    folder = damaged("bitlinear")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="truncated") as info:
        hf.read(str(folder))
    assert str(folder / "model.safetensors") in str(info.value)


def test_llama_bitnet_architecture_is_accepted(tmp_path):
    from fixtures import write_hf_checkpoint

    folder = write_hf_checkpoint(tmp_path / "llama", "bitlinear", architecture="LlamaForCausalLM", hidden_act="silu")
    ckpt = hf.read(str(folder))
    assert not any("sub_norm" in n for n in ckpt.tensors)
    assert ckpt.config["architectures"] == ["LlamaForCausalLM"]
    out = hf.write(ckpt, str(tmp_path / "out"), layout="bitlinear")
    assert all(stored(out)[n].tobytes() == a.tobytes() for n, a in stored(folder).items())


def test_unknown_write_options_are_refused(hf_checkpoint, tmp_path):
    ckpt = hf.read(str(hf_checkpoint("autobitlinear")))
    with pytest.raises(ConvertError, match="unknown Hugging Face layout"):
        hf.write(ckpt, str(tmp_path / "a"), layout="gptq")
    with pytest.raises(ConvertError, match="unknown weight_scale dtype"):
        hf.write(ckpt, str(tmp_path / "b"), scale_dtype="f16")


def test_detect(hf_checkpoint, tmp_path):
    assert hf.detect(hf_checkpoint("autobitlinear"))
    assert not hf.detect(tmp_path)
    assert hf.detect(Path("microsoft/bitnet-b1.58-2B-4T"))


@pytest.mark.parametrize("layout", ["autobitlinear", "bitlinear"])
def test_packed_projections_also_load_as_stored(hf_checkpoint, original, layout):
    """load_packed: the stored bytes and the multiplier, for writers that transcode them without unpacking."""
    from bitnet_core import validate
    from bitnet_core.codecs import hf2bit

    folder = hf_checkpoint(layout)
    ckpt = hf.read(str(folder))
    raw = stored(folder)
    for guarded in (False, True):
        entries = validate.checked(ckpt, "x").tensors if guarded else ckpt.tensors
        for name, entry in entries.items():
            if entry.kind != TERNARY:
                assert entry.load_packed is None
                continue
            packed = entry.load_packed()
            assert packed.layout == "hf2bit" and np.array_equal(packed.data, raw[name])
            assert packed.multiplier == entry.load().multiplier  # 1/weight_scale for bitlinear
            assert np.array_equal(packed.transcode(hf2bit.unpack, entry.shape[0]), original["ternary"][name].codes)
    # A wrapper that replaces `load` must not be bypassed: the entry then has no packed loader.
    entry = next(e for e in ckpt if e.kind == TERNARY)
    assert dataclasses.replace(entry, load=lambda: entry.load()).load_packed is None
