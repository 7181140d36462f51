"""bitnet_core/codecs/native.cc: each function is the numpy code it replaces, byte for byte, at every level this CPU
runs (scalar, AVX2, AVX-512), against references written from each layout's definition; conversions give the same
bytes with the library and without it; a machine without a compiler keeps the numpy codecs."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bitnet_convert.formats import registry
from bitnet_convert.formats.gguf import stored, tq
from bitnet_core.codecs import _bits, hf2bit, native, rows4, trits

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native codecs unavailable: {native.reason()}")


def _levels() -> list[int]:
    return list(range(native.cpu_level() + 1))


def _hf_bytes(rng, rows: int, n_in: int) -> np.ndarray:
    """HF packed bytes of valid codes (0, 1, 2 in every field)."""
    fields = rng.integers(0, 3, size=(4, rows, n_in), dtype=np.uint8)
    return fields[0] | fields[1] << 2 | fields[2] << 4 | fields[3] << 6


def _rows_by_definition(packed: np.ndarray, reverse: bool) -> np.ndarray:
    """hf2bit.to_rows' layout from its docstring: byte [k, r, j, p] holds output row k*R + r's values at columns
    128j + 32g + p in field g (field 3 - g when reversed); value row k*R + r is field k of HF row r."""
    rows, n_in = packed.shape
    values = np.stack([(packed >> (2 * k)) & 3 for k in range(4)])  # [k, r, column]
    chunks = values.reshape(4, rows, n_in // 128, 4, 32)  # [k, r, j, g, p]
    out = np.zeros((4, rows, n_in // 128, 32), np.uint8)
    for g in range(4):
        out |= chunks[:, :, :, g, :] << (2 * (3 - g if reverse else g))
    return out


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize(("rows", "n_in"), [(1, 128), (3, 256), (17, 384), (64, 2560)])
@pytest.mark.parametrize("reverse", [False, True])
def test_to_rows_is_the_layout(level, rows, n_in, reverse):
    rng = np.random.default_rng(rows * n_in + reverse)
    packed = _hf_bytes(rng, rows, n_in)
    expected = _rows_by_definition(packed, reverse)
    planes = np.full((4, rows, n_in // 128, 32), 0xAB, np.uint8)
    native.to_rows(packed, reverse, planes, 0, rows, level)
    assert np.array_equal(planes, expected)
    if rows > 2:  # a range of rows writes those rows' bytes and nothing else
        part = np.full_like(planes, 0xAB)
        native.to_rows(packed, reverse, part, 1, rows - 1, level)
        assert np.array_equal(part[:, 1:-1], expected[:, 1:-1])
        assert (part[:, [0, -1]] == 0xAB).all()
    assert np.array_equal(hf2bit.to_rows(packed, reverse), expected)  # what the transcoders call


def _rows4_by_definition(packed: np.ndarray) -> np.ndarray:
    """rows4's layout from its docstring: byte (r, i) holds value row 4r + k in field k; value row k*R + r is
    field k of HF row r."""
    rows = packed.shape[0]
    values = np.concatenate([(packed >> (2 * k)) & 3 for k in range(4)])  # value rows in order
    grouped = values.reshape(rows, 4, -1)  # [r, k]: value row 4r + k
    return (grouped[:, 0] | grouped[:, 1] << 2 | grouped[:, 2] << 4 | grouped[:, 3] << 6).astype(np.uint8)


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize(("rows", "n_in"), [(4, 1), (4, 37), (8, 64), (20, 100), (640, 2560)])
def test_to_rows4_is_the_layout(level, rows, n_in):
    packed = _hf_bytes(np.random.default_rng(rows * n_in), rows, n_in)
    expected = _rows4_by_definition(packed)
    out = np.full_like(packed, 0xAB)
    native.to_rows4(packed, out, 0, rows // 4, level)
    assert np.array_equal(out, expected)
    if rows >= 8:  # a range of groups writes their rows and nothing else
        part = np.full_like(packed, 0xAB)
        native.to_rows4(packed, part, 1, rows // 4, level)
        written = np.ones(rows, bool)
        written[[k * (rows // 4) for k in range(4)]] = False  # group 0's four rows
        assert np.array_equal(part[written], expected[written]) and (part[~written] == 0xAB).all()
    assert np.array_equal(rows4.from_hf2bit(packed, 4 * rows), expected)  # what the Flax writer calls


def _trits_by_definition(packed: np.ndarray) -> np.ndarray:
    """trits' layout from its docstring: the flattened codes' digits (code + 1; value row k*R + r is field k of
    HF row r), padded with digit 1 to a multiple of five, byte i = d[5i] + 3 d[5i+1] + ... + 81 d[5i+4]."""
    digits = np.concatenate([((packed >> (2 * k)) & 3).reshape(-1) for k in range(4)]).astype(np.int64)
    digits = np.concatenate([digits, np.ones(-digits.size % 5, np.int64)]).reshape(-1, 5)
    return (digits @ 3 ** np.arange(5)).astype(np.uint8)


@pytest.mark.parametrize(("rows", "n_in"), [(1, 1), (1, 2), (3, 7), (5, 13), (64, 256), (640, 2560)])
def test_to_trits_is_the_layout(rows, n_in):
    packed = _hf_bytes(np.random.default_rng(rows + n_in), rows, n_in)
    expected = _trits_by_definition(packed)
    out = np.full(expected.size, 0xFF, np.uint8)
    native.to_trits(packed, out, 0, out.size)
    assert np.array_equal(out, expected)
    for cut in {1, out.size // 2, out.size - 1} - {0, out.size}:  # two ranges, as two threads make them
        part = np.full_like(out, 0xFF)
        native.to_trits(packed, part, 0, cut)
        native.to_trits(packed, part, cut, out.size)
        assert np.array_equal(part, expected), cut
    assert np.array_equal(trits.from_hf2bit(packed, 4 * rows), expected)  # what the npz writer calls


@pytest.mark.parametrize("level", _levels())
def test_has_code3_finds_every_field_anywhere(level):
    rng = np.random.default_rng(3)
    for n in (0, 1, 31, 32, 33, 1000):
        valid = _hf_bytes(rng, 1, n).reshape(-1) if n else np.zeros(0, np.uint8)
        assert not native.has_code3(valid, level)
        for at in {0, n // 2, n - 1} if n else ():
            for field in range(4):
                bad = valid.copy()
                bad[at] |= 3 << (2 * field)
                assert native.has_code3(bad, level), (n, at, field)
                assert _bits.has_code3(bad)


@pytest.mark.parametrize("level", _levels())
def test_bf16_to_f16_is_ml_dtypes_for_every_value_below_the_limit(level):
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    below = every[(every & 0x7FFF) < stored._BF16_F16_SAFE]
    expected = below.view(ml_dtypes.bfloat16).astype(np.float16).view(np.uint16)
    for start in (0, 5):  # vectors and the scalar tail
        out = np.empty_like(below[start:])
        assert native.bf16_to_f16(below[start:], out, stored._BF16_F16_SAFE, level)
        assert np.array_equal(out, expected[start:])


@pytest.mark.parametrize("level", _levels())
def test_bf16_to_f16_reports_any_value_at_or_beyond_the_limit(level):
    limit = stored._BF16_F16_SAFE
    beyond = [limit, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, limit | 0x8000]  # 65536, +-inf, NaNs, -65536
    for value in beyond:
        for at in (0, 17, 40, 99):  # inside the first vector, later ones, the scalar tail
            src = np.full(100, 0x3F80, np.uint16)  # 1.0
            src[at] = value
            assert not native.bf16_to_f16(src, np.empty_like(src), limit, level), (hex(value), at)


def test_tq2_0_blocks_copy_the_codes_and_mark_zero_blocks():
    rng = np.random.default_rng(5)
    qs = _hf_bytes(rng, 1, 64 * 9).reshape(9, 64)
    qs[[0, 4, 8]] = 0x55  # blocks of zero codes only
    qs[5, 63] = 0x56  # one nonzero code in the last byte
    out = np.empty((9, 66), np.uint8)
    native.tq2_0_blocks(qs, out, 0x3C00)
    assert np.array_equal(out[:, :64], qs)
    d = out[:, 64:].copy().view("<u2").reshape(-1)
    assert d.tolist() == [0, 0x3C00, 0x3C00, 0x3C00, 0, 0x3C00, 0x3C00, 0x3C00, 0]


def test_the_functions_refuse_what_they_cannot_read():
    packed = np.zeros((4, 256), np.uint8)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.has_code3(packed[:, ::2])
    with pytest.raises(ValueError, match="level"):
        native.has_code3(packed.reshape(-1), native.cpu_level() + 1)
    with pytest.raises(ValueError, match="to_trits"):
        native.to_trits(packed, np.zeros(5, np.uint8), 0, 5)
    with pytest.raises(ValueError, match="one size"):
        native.bf16_to_f16(np.zeros(4, np.uint16), np.zeros(5, np.uint16), 0x4780)


SIZES = {"small": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4},
         "wider": {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8}}


@pytest.mark.parametrize(("fmt", "options", "transcoder"), [("gguf", {"target": "bitnet.cpp"}, "to_rows"),
                                                         ("gguf", {"outtype": "tq2_0"}, "to_rows"),
                                                         ("npz", {}, "to_trits"), ("flax", {}, "to_rows4")])
@pytest.mark.parametrize(("size", "chaotic"), [("small", False), ("wider", True)])
def test_conversions_are_the_same_bytes_without_the_library(fmt, options, transcoder, size, chaotic, hf_checkpoint,
                                                            tmp_path, monkeypatch):
    """An HF folder written with transformers' packing: its projections take the transcoding paths."""
    folder = hf_checkpoint(is_chaotic=chaotic, **SIZES[size])
    calls = []
    function = getattr(native, transcoder)
    monkeypatch.setattr(native, transcoder, lambda *args, **kw: calls.append(1) or function(*args, **kw))
    registry.format_module(fmt).write(registry.read_checkpoint(str(folder)), str(tmp_path / "native"), **options)
    assert calls  # the library made the projections
    monkeypatch.setattr(native, "available", lambda: False)
    registry.format_module(fmt).write(registry.read_checkpoint(str(folder)), str(tmp_path / "numpy"), **options)
    assert _contents(tmp_path / "native") == _contents(tmp_path / "numpy")


def _contents(path) -> dict:
    """A file's bytes, or a folder's files' bytes by name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_without_a_compiler_the_numpy_codecs_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BITNET_CONVERT_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        assert not native.available()
        assert "no C++ compiler" in native.reason()
        packed = _hf_bytes(np.random.default_rng(7), 8, 256)
        assert np.array_equal(hf2bit.to_rows(packed, True), _rows_by_definition(packed, True))
        assert tq.tq2_0_from_hf2bit(packed, 32).shape == (32, tq.row_bytes(tq.TQ2_0, 256))
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
    assert native.available()
