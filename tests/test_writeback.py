"""Early writeback (bitnet_convert/writeback.py): while an output is written, the kernel is asked to start
writing its dirty pages, for a file and for every file of a folder output; nothing is left open afterwards."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from bitnet_convert.fileio import atomic, writeback


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def calls(monkeypatch):
    """Records (file, offset, length, flags) of every sync_file_range call, then makes the real one."""
    seen = []
    real = writeback._CALL

    def record(fd, offset, length, flags):
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, flags))
        return real(fd, offset, length, flags) if real is not None else 0

    monkeypatch.setattr(writeback, "_CALL", record)
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")
@pytest.mark.parametrize("directory", [False, True])
def test_writeback_starts_while_the_output_is_written(tmp_path, calls, directory):
    before = open_fds()
    target = tmp_path / ("out" if directory else "out.bin")
    with atomic.atomic_path(target, directory=directory) as tmp:
        files = [tmp / "a.safetensors", tmp / "config.json"] if directory else [tmp]
        for file in files:
            with open(file, "wb") as fh:
                for _ in range(4):
                    fh.write(b"x" * 100_000)
                    fh.flush()
                    time.sleep(writeback.INTERVAL_S)
    assert target.exists() and not list(tmp_path.glob(".*partial*"))
    started = {Path(name).name for name, offset, length, flags in calls}
    assert started == {f.name for f in files}  # every file of the output, by its temporary path
    assert all((offset, length, flags) == (0, 0, writeback.SYNC_FILE_RANGE_WRITE) for _, offset, length, flags in calls)
    assert open_fds() == before  # the thread closed what it opened


def test_without_the_call_it_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(writeback, "_CALL", None)
    with writeback.early_writeback(tmp_path / "x"):
        (tmp_path / "x").write_bytes(b"data")
    assert (tmp_path / "x").read_bytes() == b"data"


def test_a_failed_write_stops_the_thread_and_leaves_nothing(tmp_path, calls):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 1000)
        time.sleep(2 * writeback.INTERVAL_S)
        raise RuntimeError("writer failed")
    assert calls  # it was running
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert not any(t.name == "bitnet-convert-writeback" for t in threading.enumerate())
