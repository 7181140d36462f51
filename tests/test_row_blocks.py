"""Writers read a dense table a block of rows at a time where the source offers rows (bitnet_core/checkpoint.py
RowsLoader, row_blocks): the files are byte for byte those written from the table read whole, whatever the
block size, and no 2-D dense tensor of an HF source is then read whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitnet_convert.fileio import safetensors_io
from bitnet_convert.formats import registry
from bitnet_convert.formats.gguf import stored as gguf_stored
from bitnet_core import checkpoint
from bitnet_core.errors import CorruptData

OUTPUTS = {  # label -> (output name, registry.convert options)
    "hf": ("m-hf", dict(dst_format="hf")),
    "flax": ("m-flax", dict(dst_format="flax")),
    "npz": ("m.npz", dict(dst_format="npz")),
    "gguf-llama.cpp": ("m-tq.gguf", dict(dst_format="gguf", target="llama.cpp")),
    "gguf-bitnet.cpp": ("m-i2s.gguf", dict(dst_format="gguf", target="bitnet.cpp")),
}


def files(out: Path) -> dict[str, bytes]:
    paths = [p for p in sorted(out.rglob("*")) if p.is_file()] if out.is_dir() else [out]
    return {str(p.relative_to(out)) if out.is_dir() else out.name: p.read_bytes() for p in paths}


@pytest.mark.parametrize("label", list(OUTPUTS))
@pytest.mark.parametrize("layout", ["autobitlinear", "bitlinear"])
def test_blocks_of_rows_write_the_same_bytes(hf_checkpoint, tmp_path, monkeypatch, label, layout):
    src = str(hf_checkpoint(layout))
    name, options = OUTPUTS[label]
    (tmp_path / "whole").mkdir()
    (tmp_path / "blocks").mkdir()
    whole = registry.convert(src, str(tmp_path / "whole" / name), **options)

    read_whole = []
    real_read = safetensors_io.StoredTensor.read
    monkeypatch.setattr(safetensors_io.StoredTensor, "read",
                        lambda self: read_whole.append((self.name, self.dtype)) or real_read(self))
    rows = registry.read_checkpoint(src).tensors["model.embed_tokens.weight"].shape[0]
    assert rows % 7  # the last block is a short one
    monkeypatch.setattr(checkpoint, "ROW_BLOCK_BYTES", 7 * 256 * 2)  # 7 rows of the 256-wide bf16 table a block
    monkeypatch.setattr(gguf_stored, "CHUNK_VALUES", 7 * 256 + 10)
    blocks = registry.convert(src, str(tmp_path / "blocks" / name), **options)
    assert files(blocks).keys() == files(whole).keys()
    for key, data in files(whole).items():
        assert files(blocks)[key] == data, key
    dense_tables = [n for n, dtype in read_whole if dtype != np.uint8 and ("embed_tokens" in n or "lm_head" in n)]
    assert dense_tables == []  # the tables came a block at a time


def test_a_short_block_is_refused(hf_checkpoint):
    ckpt = registry.read_checkpoint(str(hf_checkpoint("autobitlinear")))
    entry = ckpt.tensors["model.embed_tokens.weight"]
    assert entry.load_rows is not None
    np.testing.assert_array_equal(entry.load_rows(3, 10), np.asarray(entry.load())[3:10])
    broken = checkpoint.RowsLoader(entry.load, lambda start, stop: entry.load_rows(start, stop)[:-1])
    from bitnet_core import validate

    guarded = validate.checked(checkpoint.Checkpoint(ckpt.config, {entry.name: checkpoint.dense_entry(
        entry.name, entry.shape, entry.dtype, broken)}, {}, {}), "src")
    with pytest.raises(CorruptData, match=r"rows 3:10 loaded with shape"):
        guarded.tensors[entry.name].load_rows(3, 10)
