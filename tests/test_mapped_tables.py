"""Tables read in place from the memory-mapped checkpoint (bitnet_model/tables.py): the kernels read them where the
file has them, at any offset, to the same numbers as a copy; a greedy step leaves none of their pages resident;
`generate` reads a safetensors table in place and decodes the same tokens as with a copy and the full head."""

import mmap

import ml_dtypes
import numpy as np
import pytest

from bitnet_model import engine, native, tables

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason()}")


def mapped_table(tmp_path, values: np.ndarray, offset: int) -> tuple[np.ndarray, mmap.mmap]:
    """`values` written `offset` bytes into a file after filler bytes, and a read-only view of them in its map."""
    path = tmp_path / f"table-{offset}.bin"
    filler = np.random.default_rng(offset).integers(0, 256, offset, dtype=np.uint8).tobytes()
    path.write_bytes(filler + values.tobytes() + b"\x7f" * 5)
    with open(path, "rb") as fh:
        whole = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    flat = np.frombuffer(whole, np.uint8)
    return flat[offset:offset + values.nbytes].view(values.dtype).reshape(values.shape), whole


def bf16_rows(rng, rows: int, cols: int) -> np.ndarray:
    return (0.05 * rng.standard_normal((rows, cols))).astype(np.float32).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("offset", [0, 2, 34, 70, 4096 + 6])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_kernels_read_a_table_in_place_as_they_read_a_copy(tmp_path, offset, dtype):
    rng = np.random.default_rng(offset)
    values = bf16_rows(rng, 300, 96)
    if dtype == "f32":
        values = values.astype(np.float32)
    view, _ = mapped_table(tmp_path, values, offset)
    table = tables.in_place(view)
    assert table is not None and table.shape == (300, 96) and table.offset == view.ctypes.data % 64
    assert table.data.unsafe_buffer_pointer() == view.ctypes.data - table.offset  # adopted, not copied
    copy = engine._table(np.array(values))  # the engine's own form of a copied table
    np.testing.assert_array_equal(table.host(), copy)

    h = rng.standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(native.table_matmul(h, table)), np.asarray(native.table_matmul(h, copy)))
    ids = np.asarray([[0, 299, 17], [5, 5, 123]], np.int32)
    np.testing.assert_array_equal(np.asarray(native.table_rows(ids, table)), values.astype(np.float32)[ids])
    np.testing.assert_array_equal(np.asarray(native.table_rows(ids, copy)), values.astype(np.float32)[ids])
    codes, scales, bounds = engine.screen_rows(values.astype(np.float32))
    got = native.greedy_head(h, table, codes, scales, bounds)
    want = native.greedy_head(h, copy, codes, scales, bounds)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(native.table_matmul(h, copy)).argmax(-1))


def test_only_a_mapped_contiguous_table_is_read_in_place(tmp_path):
    values = bf16_rows(np.random.default_rng(0), 64, 32)
    view, _ = mapped_table(tmp_path, values, 6)
    assert tables.in_place(np.array(values)) is None  # a copy in memory: nothing to map
    assert tables.in_place(view[:, :16]) is None  # not contiguous
    assert tables.in_place(view.astype(np.float16)) is None  # another dtype (and a copy)
    assert tables.in_place(view[1:]) is not None  # any row: the aligned start is still inside the map


def resident_bytes(address: int) -> int:
    """Rss of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                begin, end = (int(x, 16) for x in head.split("-"))
                inside = begin <= address < end
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the table")


def test_a_greedy_step_leaves_no_table_page_resident(tmp_path):
    """The rows the screen re-scores come from the mapping; the kernel drops their pages after it (a fault maps 64
    KB around it: without the drop, a long generation ends with the whole table resident)."""
    rng = np.random.default_rng(1)
    values = bf16_rows(rng, 4096, 512)  # 4 MB
    view, _ = mapped_table(tmp_path, values, 10)
    table = tables.in_place(view)
    codes, scales, bounds = engine.screen_rows(values.astype(np.float32))
    h = rng.standard_normal((1, 512)).astype(np.float32)
    tokens, rescored = native.greedy_head(h, table, codes, scales, bounds)
    assert int(rescored[0]) >= 1 and resident_bytes(view.ctypes.data) <= 4096
    native.table_rows(np.arange(0, 4096, 97, dtype=np.int32), table).block_until_ready()
    assert resident_bytes(view.ctypes.data) <= 4096
    rows = np.asarray(view[::97], np.float32)  # the same rows read through numpy: their pages stay
    assert rows.shape == (43, 512) and resident_bytes(view.ctypes.data) >= 43 * 1024
    tables.drop_pages(view)
    assert resident_bytes(view.ctypes.data) <= 2 * 4096  # the partial pages at either end may stay


def test_generate_reads_a_safetensors_table_in_place(hf_checkpoint):
    """The default greedy load of an HF folder: the bf16 table in place, the screen beside it; the same tokens
    as a copied table through the full head, and sampling keeps the copy (it reads every row every step)."""
    from bitnet_convert.generate_command import load_generator

    folder = hf_checkpoint(seed=3)
    screened = load_generator(str(folder))
    full = load_generator(str(folder), screen=False)
    sampler = load_generator(str(folder), greedy=False)
    assert isinstance(screened.weights.embed, tables.MappedTable) and screened.weights.screen_codes is not None
    assert not isinstance(full.weights.embed, tables.MappedTable) and full.weights.screen_codes is None
    assert not isinstance(sampler.weights.embed, tables.MappedTable) and sampler.weights.screen_codes is None
    np.testing.assert_array_equal(screened.weights.embed.host(), np.asarray(full.weights.embed))
    screened.eos_ids = full.eos_ids = set()
    rng = np.random.default_rng(5)
    for length in (1, 7, 20):
        prompt = [int(t) for t in rng.integers(0, screened.cfg.vocab_size, length)]
        assert screened.generate(prompt, 12).new_ids == full.generate(prompt, 12).new_ids
