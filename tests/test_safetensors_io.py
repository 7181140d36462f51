"""The streaming safetensors writer and memory-mapped reader, checked against safetensors' own readers."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import reference_extra
import safetensors
import safetensors.numpy

from bitnet_convert.fileio import prefetch
from bitnet_convert.fileio.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorSpec,
    header_bytes,
    open_model_files,
    open_safetensors,
    plan_shards,
    write_safetensors,
    write_sharded_safetensors,
)
from bitnet_core.errors import ConvertError

BF16 = np.dtype(ml_dtypes.bfloat16)


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "embed": (rng.standard_normal((33, 16)) * 3).astype(BF16),
        "packed": rng.integers(0, 255, (5, 16), dtype=np.uint8),  # odd byte count: later tensors unaligned
        "scale": np.array([1.40625], BF16),
        "norm": rng.standard_normal(7).astype(np.float32),
        "half": rng.standard_normal((3, 3)).astype(np.float16),
        "ids": rng.integers(-(2**40), 2**40, 4, dtype=np.int64),
        "codes": rng.integers(-1, 2, (4, 4), dtype=np.int8),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
    }


def write_arrays(path, arrays, metadata=None, **kw):
    specs = [TensorSpec.of(n, a) for n, a in arrays.items()]
    return write_safetensors(path, specs, lambda spec: arrays[spec.name], metadata, **kw)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_written_file_reads_back_identically_in_safetensors_numpy_and_torch(tmp_path):
    reference_extra.require()
    import safetensors.torch
    import torch

    arrays = sample_arrays()
    path = tmp_path / "x.safetensors"
    size = write_arrays(path, arrays, {"format": "pt"})
    assert size == path.stat().st_size

    loaded = safetensors.numpy.load_file(str(path))
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        assert same(loaded[name], array), name

    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        embed = f.get_tensor("embed")
    assert embed.dtype == torch.bfloat16
    assert np.array_equal(embed.view(torch.uint16).numpy(), arrays["embed"].view(np.uint16))
    torch_loaded = safetensors.torch.load_file(str(path))
    assert torch_loaded["norm"].numpy().tobytes() == arrays["norm"].tobytes()

    ours = open_safetensors(path)
    assert ours.metadata == {"format": "pt"}
    assert list(ours.tensors) == list(arrays)  # file order is the order of the specs
    for name, array in arrays.items():
        assert same(ours.tensors[name].array(), array), name
        assert bytes(ours.tensors[name].raw()) == array.tobytes()


def test_header_layout_follows_the_spec(tmp_path):
    arrays = {"b": np.arange(3, dtype=np.uint8), "a": np.ones((2, 2), BF16)}
    path = tmp_path / "x.safetensors"
    write_arrays(path, arrays, {"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    text = raw[8 : 8 + n].decode()
    assert text == text.rstrip() + " " * (len(text) - len(text.rstrip()))  # padded with spaces only
    header = json.loads(text)
    assert header == {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [3, 11]},
    }
    assert len(raw) == 8 + n + 11
    assert raw[8 + n :] == arrays["b"].tobytes() + arrays["a"].tobytes()
    assert header_bytes([TensorSpec.of(k, v) for k, v in arrays.items()], {"format": "pt"}) == raw[: 8 + n]


def test_reader_reads_files_written_by_safetensors_itself(tmp_path):
    reference_extra.require()
    import safetensors.torch
    import torch

    tensors = {"w": torch.randn(6, 5).bfloat16(), "p": torch.arange(12, dtype=torch.uint8).reshape(3, 4)}
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    ours = open_safetensors(path)
    assert ours.tensors["w"].dtype == BF16 and ours.tensors["w"].shape == (6, 5)
    assert np.array_equal(ours.tensors["w"].array().view(np.uint16), tensors["w"].view(torch.uint16).numpy())
    assert np.array_equal(ours.tensors["p"].array(), tensors["p"].numpy())


def test_reading_is_zero_copy_and_read_only(tmp_path):
    path = tmp_path / "x.safetensors"
    write_arrays(path, {"a": np.arange(1000, dtype=np.float32)})
    sf = open_safetensors(path)
    view = sf.tensors["a"].array()
    assert np.shares_memory(view, sf.data())
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1


def test_writer_streams_tensors_in_spec_order_a_few_at_a_time(tmp_path):
    arrays = sample_arrays()
    calls, written = [], []

    def produce(spec):
        calls.append(spec.name)
        # produced on a second core at most DEFAULT_DEPTH (+1 in hand) ahead of the writes: never the whole model
        assert len(calls) <= len(written) + prefetch.DEFAULT_DEPTH + 2
        return arrays[spec.name]

    specs = [TensorSpec.of(n, a) for n, a in arrays.items()]
    write_safetensors(tmp_path / "x.safetensors", specs, produce,
                      on_written=lambda spec, raw: written.append((spec.name, bytes(raw))))
    assert calls == list(arrays)
    assert written == [(n, a.tobytes()) for n, a in arrays.items()]


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float16), b"\0" * 5],
    ids=["wrong-shape", "wrong-dtype", "wrong-length"],
)
def test_writer_refuses_data_that_breaks_the_header_promise(tmp_path, bad):
    spec = TensorSpec("t", np.float32, (3, 2))
    with pytest.raises(ConvertError, match="tensor t: produced"):
        write_safetensors(tmp_path / "x.safetensors", [spec], lambda s: bad)


def test_writer_rejects_duplicate_names(tmp_path):
    spec = TensorSpec("t", np.float32, (1,))
    with pytest.raises(ValueError, match="duplicate"):
        header_bytes([spec, spec])


def _valid_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_arrays(path, {"a": np.arange(16, dtype=np.float32), "b": np.ones(8, BF16)})
    return path


def _with_header(path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-5]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:20]), "does not fit"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "shorter than"),
        (lambda p: p.write_bytes(b""), "shorter than"),
        (lambda p: p.write_bytes(p.read_bytes() + b"junk"), "trailing bytes"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"), "does not fit"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{]]}"), "not JSON"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "not a JSON object"),
        (lambda p: _with_header(p, {"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"x"), "unknown"),
        (lambda p: _with_header(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"xxxx"), "4 bytes for shape"),
        (lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"xyz"), "overlap or gap"),
        (lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": "x", "data_offsets": [0, 1]}}, b"x"), "malformed"),
        (lambda p: _with_header(p, {"__metadata__": {"k": 1}}, b""), "__metadata__"),
    ],
    ids=["truncated-data", "truncated-header", "short", "empty", "trailing", "huge-header", "bad-json",
         "json-array", "bad-dtype", "size-mismatch", "overlap", "bad-shape", "bad-metadata"],
)
def test_damaged_files_give_one_convert_error_naming_the_file(tmp_path, damage, message):
    path = _valid_file(tmp_path)
    damage(path)
    with pytest.raises(ConvertError, match=message) as info:
        open_safetensors(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_convert_error(tmp_path):
    with pytest.raises(ConvertError, match="no such file"):
        open_safetensors(tmp_path / "nope.safetensors")


def test_plan_shards_keeps_order_and_gives_oversized_tensors_their_own_shard():
    specs = [TensorSpec(n, np.uint8, (size,)) for n, size in [("a", 4), ("b", 4), ("c", 20), ("d", 1), ("e", 9)]]
    shards = plan_shards(specs, 10)
    assert [[s.name for s in shard] for shard in shards] == [["a", "b"], ["c"], ["d", "e"]]


def test_sharded_writer_and_reader_agree_with_the_index_convention(tmp_path):
    arrays = sample_arrays()
    specs = [TensorSpec.of(n, a) for n, a in arrays.items()]
    written = []
    paths = write_sharded_safetensors(tmp_path, specs, lambda s: arrays[s.name], {"format": "pt"},
                                      max_shard_bytes=1200, on_written=lambda s, raw: written.append(s.name))
    assert len(paths) > 1
    assert [p.name for p in paths] == [f"model-{i:05d}-of-{len(paths):05d}.safetensors" for i in range(1, len(paths) + 1)]
    assert written == list(arrays)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert set(index["weight_map"]) == set(arrays)
    for name, shard in index["weight_map"].items():
        assert same(safetensors.numpy.load_file(str(tmp_path / shard))[name], arrays[name])

    files = open_model_files(tmp_path)
    assert files.where == tmp_path / INDEX_FILE
    assert list(files.tensors) == list(arrays)
    assert [n for n, _ in files.stored_bytes()] == list(arrays)
    for name, array in arrays.items():
        assert same(files.tensors[name].array(), array)


def test_sharded_writer_writes_one_plain_file_when_everything_fits(tmp_path):
    arrays = sample_arrays()
    paths = write_sharded_safetensors(tmp_path, [TensorSpec.of(n, a) for n, a in arrays.items()],
                                      lambda s: arrays[s.name], max_shard_bytes=10**9)
    assert paths == [tmp_path / SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists()
    assert open_model_files(tmp_path).where == tmp_path / SINGLE_FILE


def test_index_that_disagrees_with_its_shards_is_named(tmp_path):
    arrays = sample_arrays()
    write_sharded_safetensors(tmp_path, [TensorSpec.of(n, a) for n, a in arrays.items()],
                              lambda s: arrays[s.name], max_shard_bytes=1200)
    index_path = tmp_path / INDEX_FILE
    index = json.loads(index_path.read_text())
    good = dict(index["weight_map"])

    index["weight_map"] = {**good, "ghost": next(iter(good.values()))}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="ghost is listed but not stored") as info:
        open_model_files(tmp_path)
    assert str(index_path) in str(info.value)

    index["weight_map"] = {n: s for n, s in good.items() if n != "norm"}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="does not list it"):
        open_model_files(tmp_path)

    index["weight_map"] = {**good, "norm": "../elsewhere.safetensors"}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="not a plain file name"):
        open_model_files(tmp_path)

    index_path.write_text("{}")
    with pytest.raises(ConvertError, match="weight_map"):
        open_model_files(tmp_path)


def test_folder_without_weights_is_named(tmp_path):
    with pytest.raises(ConvertError, match="no model.safetensors") as info:
        open_model_files(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_read_is_a_private_copy_of_the_mapped_view(tmp_path):
    from bitnet_convert.fileio.safetensors_io import (
        SafetensorsFile,
        TensorSpec,
        write_safetensors,
    )

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(7, dtype=np.uint8)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, [TensorSpec.of(n, a) for n, a in arrays.items()], lambda spec: arrays[spec.name])
    for tensor in SafetensorsFile(path):
        got = tensor.read()
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.flags.writeable
        assert got.tobytes() == tensor.array().tobytes() == arrays[tensor.name].tobytes()
