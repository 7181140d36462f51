"""fileio/direct.py: a DirectFile holds exactly the bytes an ordinary file written the same way holds, across
buffer boundaries, with seeks back (zipfile's header rewrites), through O_DIRECT or without it; and the
writers that read a table a block of rows at a time write what they wrote reading it whole."""

from __future__ import annotations

import errno
import os
import zipfile

import numpy as np
import pytest

from bitnet_convert.fileio import direct
from bitnet_convert.fileio.direct import DirectFile


@pytest.fixture(params=[True, False], ids=["o_direct", "page_cache"])
def small_buffers(request, monkeypatch):
    """Buffers of 3 blocks, so a few KB cross several; with and without O_DIRECT."""
    monkeypatch.setattr(direct, "BUFFER_BYTES", 3 * direct.BLOCK)
    if not request.param:
        monkeypatch.setattr(direct, "_O_DIRECT", 0)
    return request.param


def _both(tmp_path, ops):
    """Run `ops(file)` on a DirectFile and on a plain file; return both files' bytes."""
    plain, ours = tmp_path / "plain.bin", tmp_path / "direct.bin"
    with open(plain, "wb") as fh:
        ops(fh)
    with DirectFile(ours) as fh:
        ops(fh)
    return plain.read_bytes(), ours.read_bytes()


@pytest.mark.parametrize("sizes", [[0], [1], [4095, 1, 4096], [5000] * 7, [3 * 4096], [3 * 4096 + 1], [40_000, 3]])
def test_appends_equal_a_plain_file(tmp_path, small_buffers, sizes):
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]

    def ops(fh):
        for piece in pieces:
            assert fh.write(memoryview(piece)) == piece.size

    plain, ours = _both(tmp_path, ops)
    assert ours == plain
    assert len(ours) == sum(sizes)


def test_seeks_back_overwrite_flushed_and_buffered_bytes(tmp_path, small_buffers):
    data = bytes(range(256)) * 200  # 51,200 bytes: several buffers of 12,288

    def ops(fh):
        fh.write(data)
        end = fh.tell()
        fh.seek(10)  # long since handed to the writer thread
        fh.write(b"HEAD" * 5)
        fh.seek(end - 7)  # still in the buffer being filled
        fh.write(b"tail")
        fh.seek(3 * direct.BLOCK - 2)  # across a buffer boundary, behind the current buffer
        fh.write(b"across")
        fh.seek(0, os.SEEK_END)
        assert fh.tell() == end
        fh.write(b"more")
        fh.seek(end + 100)  # past the end: the gap reads as zeros
        fh.write(b"!")

    plain, ours = _both(tmp_path, ops)
    assert ours == plain
    assert ours[10:30] == b"HEAD" * 5 and ours[-1:] == b"!"


def test_zipfile_writes_the_same_archive(tmp_path, small_buffers):
    members = {f"m{i}.bin": os.urandom(n) for i, n in enumerate([0, 17, 9000, 30_000])}

    def ops(fh):
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, data in members.items():
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as member:  # header rewritten after the data
                    member.write(data)

    plain, ours = _both(tmp_path, ops)
    assert ours == plain
    with zipfile.ZipFile(tmp_path / "direct.bin") as zf:
        assert zf.testzip() is None
        assert {name: zf.read(name) for name in zf.namelist()} == members


def test_a_failed_write_is_raised_and_the_file_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "BUFFER_BYTES", direct.BLOCK)

    def refuse(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct, "_pwrite_all", refuse)
    fh = DirectFile(tmp_path / "full.bin")
    with pytest.raises(OSError, match="No space left"):
        for _ in range(8):
            fh.write(bytes(direct.BLOCK))
        fh.close()
    fh.close()  # after the error: closes without writing or raising again
    assert fh.closed


def test_a_filesystem_without_o_direct_is_written_through_the_page_cache(tmp_path, monkeypatch):
    calls = []
    real_open = os.open

    def no_direct(path, flags, mode=0o777):
        calls.append(bool(flags & direct._O_DIRECT))
        if flags & direct._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    if not direct._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(os, "open", no_direct)
    with DirectFile(tmp_path / "f.bin") as fh:
        fh.write(b"abc" * 5000)
    assert calls == [True, False]
    assert (tmp_path / "f.bin").read_bytes() == b"abc" * 5000
