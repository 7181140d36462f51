"""The packed-ternary .npz: bit-exact round trips, plain-numpy readability, size, and refusal of bad files."""

import io
import json
import os
import struct
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest
from same import assert_same_tensors

from bitnet_convert.fileio.integrity import hash_stored
from bitnet_convert.formats import npz
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Checkpoint, Ternary, ternary_entry
from bitnet_core.errors import ConvertError, CorruptData

BF16 = np.dtype(ml_dtypes.bfloat16)
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny():
    return tiny_checkpoint(seed=3)


@pytest.fixture(scope="module")
def tiny_npz(tiny, tmp_path_factory):
    return npz.write(tiny, str(tmp_path_factory.mktemp("npz") / "tiny.npz"))


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("masters", [False, True])
def test_round_trip_is_bit_exact(tmp_path, masters):
    ckpt = tiny_checkpoint(seed=1, masters=masters)
    path = npz.write(ckpt, str(tmp_path / "m.npz"))
    back = npz.read(str(path))
    assert_same_tensors(ckpt, back)
    assert back.config == ckpt.config
    assert back.tokenizer_files == ckpt.tokenizer_files
    assert {e.kind for e in back} == ({"dense"} if masters else {"dense", "ternary"})
    assert back[DOWN].dtype == (BF16 if masters else None)
    assert back.provenance == {"format": "npz", "path": str(path), "source": ckpt.provenance["source"],
                               "source_format": "tiny", "revision": None, "source_layout": None,
                               "multiplier_roundings": [], "tensor_casts": {}}


def test_read_then_write_again_gives_the_same_bytes(tiny_npz, tmp_path):
    again = npz.write(npz.read(str(tiny_npz)), str(tmp_path / "again.npz"))
    # Same tensors and metadata; only the provenance (source) differs, so compare every other member.
    with zipfile.ZipFile(tiny_npz) as a, zipfile.ZipFile(again) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            if name != "meta/provenance.json.npy":
                assert a.read(name) == b.read(name), name
    assert npz.recorded_provenance(again)["content_hash"] == npz.recorded_provenance(tiny_npz)["content_hash"]


def test_writing_is_deterministic(tiny, tiny_npz, tmp_path):
    second = npz.write(tiny, str(tmp_path / "second.npz"))
    assert second.read_bytes() == tiny_npz.read_bytes()


def test_float32_and_float16_dense_tensors_keep_their_dtype(tmp_path):
    ckpt = tiny_checkpoint(seed=2)
    arrays = ckpt.materialize()
    arrays["model.norm.weight"] = arrays["model.norm.weight"].astype(np.float32)
    arrays["model.embed_tokens.weight"] = arrays["model.embed_tokens.weight"].astype(np.float16)
    ckpt = Checkpoint.from_arrays(ckpt.config, arrays, tokenizer_files=ckpt.tokenizer_files)
    back = npz.read(str(npz.write(ckpt, str(tmp_path / "mixed.npz"))))
    assert_same_tensors(ckpt, back)
    assert back["model.norm.weight"].dtype == np.float32
    assert back["model.embed_tokens.weight"].dtype == np.float16


# ---------------------------------------------------------------------------------------- plain numpy reader


def test_plain_numpy_reads_every_member_and_decodes_a_weight_by_the_documented_layout(tiny, tiny_npz):
    z = np.load(tiny_npz, allow_pickle=False)
    fmt = json.loads(bytes(z["meta/format.json"]))
    assert fmt == {"format": "bitnet-convert-npz", "version": 1, "ternary_packing": "base3-5"}
    assert json.loads(bytes(z["meta/config.json"])) == tiny.config
    index = json.loads(bytes(z["meta/tensors.json"]))
    assert [r["name"] for r in index] == list(tiny.tensors)
    for key in z.files:  # nothing needs pickle
        assert z[key].dtype != object

    # The README recipe, nothing from bitnet_convert: 5 trits per byte, lowest digit first, digit - 1.
    out, n_in = tiny[DOWN].shape
    b = z[f"tensor/{DOWN}/codes"]
    assert b.dtype == np.uint8 and b.shape == (-(-out * n_in // 5),)
    codes = ((b[:, None] // 3 ** np.arange(5)) % 3 - 1).reshape(-1)[: out * n_in].reshape(out, n_in)
    weight = codes.astype(np.float32) * z[f"tensor/{DOWN}/multiplier"][0]
    expected = tiny.load(DOWN)
    np.testing.assert_array_equal(codes, expected.codes)
    np.testing.assert_array_equal(weight, expected.dequantize())

    # bf16 is stored as its uint16 bits; the index says so.
    record = next(r for r in index if r["name"] == "model.norm.weight")
    assert record == {"name": "model.norm.weight", "kind": "dense", "shape": [tiny.config["hidden_size"]], "dtype": "bfloat16"}
    norm = z["tensor/model.norm.weight/data"]
    assert norm.dtype == np.uint16
    assert norm.view(BF16).tobytes() == tiny.load("model.norm.weight").tobytes()
    assert bytes(z["tokenizer/tokenizer.json"]) == tiny.tokenizer_files["tokenizer.json"]


def test_the_decoding_recipe_in_the_docstring_runs_as_written(tiny, tiny_npz):
    """The README copies the module docstring: its numpy-only recipe must keep working verbatim."""
    recipe = npz.__doc__.split("Decoding with numpy alone:")[1].split("Dense projections")[0]
    up = "model.layers.0.mlp.up_proj.weight"
    assert tiny[up].shape == (512, 256) and "6912, 2560" in recipe
    scope = {"np": np}
    exec(textwrap.dedent(recipe).replace('"model.npz"', repr(str(tiny_npz))).replace("6912, 2560", "512, 256"), scope)
    np.testing.assert_array_equal(scope["codes"], tiny.load(up).codes)
    np.testing.assert_array_equal(scope["w"], tiny.load(up).dequantize())


def test_at_most_2_1_bits_per_ternary_weight(tiny, tiny_npz):
    """All of the file except the payload of dense tensors and metadata is charged to the ternary weights."""
    ternary_weights = sum(int(np.prod(e.shape)) for e in tiny if e.kind == "ternary")
    with zipfile.ZipFile(tiny_npz) as zf:
        other_payload = sum(i.file_size for i in zf.infolist() if not i.filename.endswith(("/codes.npy", "/multiplier.npy")))
    bits = (os.path.getsize(tiny_npz) - other_payload) * 8 / ternary_weights
    assert 1.6 <= bits <= 2.1, bits


def test_content_hash_covers_the_stored_bytes(tiny, tiny_npz):
    record = npz.recorded_provenance(tiny_npz)
    assert record["format"] == "npz" and record["producer"] == "bitnet-convert"
    assert record["source"] == tiny.provenance["source"] and record["source_format"] == "tiny"
    assert hash_stored(npz.stored_tensor_bytes(tiny_npz)) == record["content_hash"]
    stored = list(npz.stored_tensor_bytes(tiny_npz))
    assert [k for k, _ in stored][:2] == ["tensor/model.embed_tokens.weight/data", "tensor/model.layers.0.input_layernorm.weight/data"]
    assert sum(k.endswith("/codes") for k, _ in stored) == sum(e.kind == "ternary" for e in tiny)


def test_detect(tiny_npz, tmp_path):
    assert npz.detect(tiny_npz)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(tiny_npz.read_bytes())
    assert npz.detect(renamed)  # sniffed by its meta/format.json member
    (tmp_path / "notes.txt").write_text("hello")
    assert not npz.detect(tmp_path / "notes.txt")
    assert not npz.detect(tmp_path)
    assert not npz.detect(tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------------------- writing


def test_refuses_to_overwrite_unless_forced(tiny, tiny_npz):
    before = tiny_npz.read_bytes()
    with pytest.raises(ConvertError, match="already exists"):
        npz.write(tiny, str(tiny_npz))
    npz.write(tiny, str(tiny_npz), force=True)
    assert tiny_npz.read_bytes() == before


def test_tensors_are_loaded_one_at_a_time_and_a_failure_leaves_nothing(tmp_path):
    ckpt = tiny_checkpoint(seed=4)
    loads = []

    def counting(entry):
        def load():
            loads.append(entry.name)
            return entry.load()
        return load

    def failing():
        raise ConvertError("source vanished")

    ckpt.tensors = {n: type(e)(e.name, e.shape, e.kind, e.dtype, counting(e)) for n, e in ckpt.tensors.items()}
    npz.write(ckpt, str(tmp_path / "ok.npz"))
    assert loads == list(ckpt.tensors)  # each tensor loaded exactly once, in order

    ckpt.tensors[DOWN] = ternary_entry(DOWN, ckpt[DOWN].shape, failing)
    with pytest.raises(ConvertError, match="source vanished"):
        npz.write(ckpt, str(tmp_path / "bad.npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npz"]  # no partial file left behind


@pytest.mark.parametrize(
    "bad, message",
    [
        (Ternary(np.full((256, 512), 2, np.int8), 1.5), r"must be -1, 0 or \+1"),
        (Ternary(np.zeros((256, 512), np.int8), np.inf), "multiplier is inf"),
        (Ternary(np.zeros((256, 256), np.int8), 1.5), r"codes have shape \[256, 256\], expected \[256, 512\]"),
    ],
)
def test_writer_refuses_bad_ternary_tensors(tmp_path, bad, message):
    ckpt = tiny_checkpoint(seed=5)
    ckpt.tensors[DOWN] = ternary_entry(DOWN, ckpt[DOWN].shape, lambda: bad)
    out = tmp_path / "bad.npz"
    with pytest.raises(ConvertError, match=message) as err:
        npz.write(ckpt, str(out))
    assert str(out) in str(err.value) and DOWN in str(err.value)
    assert not out.exists()


def test_writer_refuses_a_dtype_it_cannot_store(tmp_path):
    ckpt = tiny_checkpoint(seed=5)
    arrays = ckpt.materialize()
    arrays["model.norm.weight"] = arrays["model.norm.weight"].astype(np.float64)
    ckpt = Checkpoint.from_arrays(ckpt.config, arrays)
    with pytest.raises(ConvertError, match="dtype float64 cannot be stored"):
        npz.write(ckpt, str(tmp_path / "f64.npz"))


# ------------------------------------------------------------------------------------------------ bad files


def rewrite(src, dst, replace=None, drop=()):
    """Copy the zip `src` to `dst`, replacing members (key -> array, may be pickled) and dropping others."""
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            key = info.filename[: -len(".npy")]
            if key in drop:
                continue
            if key in replace:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, replace.pop(key), allow_pickle=True)  # writing a pickle is harmless
                zout.writestr(info.filename, buf.getvalue())
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    return dst


def test_not_a_zip(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"\x93NUMPY this is not an archive" * 10)
    with pytest.raises(ConvertError, match="not a zip archive") as err:
        npz.read(str(path))
    assert str(path) in str(err.value)


def test_truncated_file(tiny_npz, tmp_path):
    path = tmp_path / "truncated.npz"
    path.write_bytes(tiny_npz.read_bytes()[: os.path.getsize(tiny_npz) // 2])
    with pytest.raises(ConvertError, match="not a zip archive, or truncated") as err:
        npz.read(str(path))
    assert str(path) in str(err.value)


def test_pickled_object_array_is_refused_without_unpickling(tiny_npz, tmp_path):
    class Boom:
        def __reduce__(self):  # would run if anyone unpickled it
            return (os.remove, (str(tiny_npz),))

    path = rewrite(tiny_npz, tmp_path / "pickled.npz", replace={f"tensor/{DOWN}/multiplier": np.array([Boom()], object)})
    with pytest.raises(ConvertError, match="pickled object array") as err:
        npz.read(str(path))
    assert str(path) in str(err.value) and f"tensor/{DOWN}/multiplier" in str(err.value)
    assert tiny_npz.exists()
    # numpy itself refuses it too when asked the documented way
    with pytest.raises(ValueError, match="allow_pickle"):
        np.load(path, allow_pickle=False)[f"tensor/{DOWN}/multiplier"]


@pytest.mark.parametrize(
    "drop, message",
    [
        (f"tensor/{DOWN}/codes", f"missing member tensor/{DOWN}/codes"),
        ("tensor/model.norm.weight/data", "missing member tensor/model.norm.weight/data"),
        ("meta/config.json", "missing member meta/config.json"),
        ("meta/tensors.json", "missing member meta/tensors.json"),
        ("meta/format.json", "not a bitnet-convert .npz"),
    ],
)
def test_missing_member(tiny_npz, tmp_path, drop, message):
    path = rewrite(tiny_npz, tmp_path / "missing.npz", drop={drop})
    with pytest.raises(ConvertError, match=message) as err:
        npz.read(str(path))
    assert str(path) in str(err.value)


def test_tensor_missing_from_the_index_is_caught_by_validation(tiny_npz, tmp_path):
    z = np.load(tiny_npz, allow_pickle=False)
    index = [r for r in json.loads(bytes(z["meta/tensors.json"])) if r["name"] != DOWN]
    path = rewrite(
        tiny_npz,
        tmp_path / "short-index.npz",
        replace={"meta/tensors.json": np.frombuffer(json.dumps(index).encode(), np.uint8)},
        drop={f"tensor/{DOWN}/codes", f"tensor/{DOWN}/multiplier"},
    )
    with pytest.raises(ConvertError, match=f"missing tensor {DOWN}") as err:
        npz.read(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "key, array, message",
    [
        (f"tensor/{DOWN}/codes", np.zeros(100, np.uint8), r"is uint8 \[100\], expected uint8 \[26215\]"),
        (f"tensor/{DOWN}/codes", np.zeros(26215, np.int8), r"is int8 \[26215\], expected uint8"),
        (f"tensor/{DOWN}/multiplier", np.ones(2, np.float32), r"is float32 \[2\], expected float32 \[1\]"),
        ("tensor/model.norm.weight/data", np.ones(256, np.float32), r"is float32 \[256\], expected uint16 \[256\]"),
        ("tensor/model.norm.weight/data", np.ones(255, np.uint16), r"is uint16 \[255\], expected uint16 \[256\]"),
        ("meta/config.json", np.frombuffer(b"{not json", np.uint8), "meta/config.json is not valid JSON"),
        ("meta/config.json", np.ones(3, np.float32), "should be a uint8 byte array"),
    ],
)
def test_bad_member_shape_or_dtype(tiny_npz, tmp_path, key, array, message):
    path = rewrite(tiny_npz, tmp_path / "bad.npz", replace={key: array})
    with pytest.raises(ConvertError, match=message) as err:
        npz.read(str(path))
    assert str(path) in str(err.value)


def test_config_that_disagrees_with_the_tensors(tiny, tiny_npz, tmp_path):
    config = dict(tiny.config, intermediate_size=768)
    path = rewrite(tiny_npz, tmp_path / "cfg.npz", replace={"meta/config.json": np.frombuffer(json.dumps(config).encode(), np.uint8)})
    with pytest.raises(ConvertError, match=r"has shape \[512\], config says \[768\]") as err:
        npz.read(str(path))
    assert str(path) in str(err.value)


def test_stray_tensor_member(tiny_npz, tmp_path):
    path = rewrite(tiny_npz, tmp_path / "stray.npz")
    with zipfile.ZipFile(path, "a") as zf:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(3, np.float32))
        zf.writestr("tensor/lm_head.weight/data.npy", buf.getvalue())
    with pytest.raises(ConvertError, match="member tensor/lm_head.weight/data is not listed"):
        npz.read(str(path))


def test_foreign_npz_and_newer_version(tiny_npz, tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.arange(3))
    with pytest.raises(ConvertError, match="not a bitnet-convert .npz"):
        npz.read(str(foreign))
    assert npz.recorded_provenance(foreign) is None
    newer = {"format": "bitnet-convert-npz", "version": 2, "ternary_packing": "base3-5"}
    path = rewrite(tiny_npz, tmp_path / "v2.npz", replace={"meta/format.json": np.frombuffer(json.dumps(newer).encode(), np.uint8)})
    with pytest.raises(ConvertError, match="version 2"):
        npz.read(str(path))


def test_invalid_code_byte_is_caught_when_the_tensor_loads(tiny_npz, tmp_path):
    z = np.load(tiny_npz, allow_pickle=False)
    codes = z[f"tensor/{DOWN}/codes"].copy()
    codes[17] = 250  # above 242: not five trits
    path = rewrite(tiny_npz, tmp_path / "byte.npz", replace={f"tensor/{DOWN}/codes": codes})
    ckpt = npz.read(str(path))  # lazy: headers are fine
    with pytest.raises(CorruptData, match="invalid byte 250") as err:
        ckpt.load(DOWN)
    assert str(path) in str(err.value) and DOWN in str(err.value)


def test_damaged_member_bytes_fail_the_crc_when_loaded(tiny_npz, tmp_path):
    """Reading is lazy: flipped bytes inside one tensor's data are found when that tensor loads."""
    data = bytearray(tiny_npz.read_bytes())
    with zipfile.ZipFile(tiny_npz) as zf:
        info = zf.getinfo(f"tensor/{DOWN}/codes.npy")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # local header, then the member's bytes
    data[start + info.file_size - 10] ^= 0x01  # inside the array data, past the .npy header
    path = tmp_path / "crc.npz"
    path.write_bytes(bytes(data))
    ckpt = npz.read(str(path))
    np.testing.assert_array_equal(ckpt.load("model.norm.weight").view(np.uint16), np.load(tiny_npz)["tensor/model.norm.weight/data"])
    with pytest.raises(CorruptData, match=f"tensor/{DOWN}/codes cannot be read") as err:
        ckpt.load(DOWN)
    assert str(path) in str(err.value)


def test_revision_is_refused(tiny_npz):
    with pytest.raises(ConvertError, match="--revision"):
        npz.read(str(tiny_npz), revision="main")
