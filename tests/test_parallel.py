"""bitnet_core/parallel.py: the row ranges cover every row once, small work stays on the calling thread, and
an error in any range is raised after all ranges have ended."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bitnet_core import parallel


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 1001])
def test_ranges_cover_every_row_once(rows, monkeypatch):
    monkeypatch.setattr(parallel, "_WORKERS", 3)
    monkeypatch.setattr(parallel, "_pool", None)
    seen = np.zeros(rows, np.int64)
    lock = threading.Lock()

    def work(start, stop):
        with lock:
            seen[start:stop] += 1

    parallel.for_row_ranges(rows, parallel.MIN_BYTES, work)
    assert np.all(seen == 1)


def test_small_work_runs_on_the_calling_thread():
    threads = []
    parallel.for_row_ranges(100, parallel.MIN_BYTES - 1, lambda a, b: threads.append((threading.get_ident(), a, b)))
    assert threads == [(threading.get_ident(), 0, 100)]


def test_an_error_in_a_helper_range_is_raised_after_every_range_ended(monkeypatch):
    monkeypatch.setattr(parallel, "_WORKERS", 2)
    monkeypatch.setattr(parallel, "_pool", None)
    ended = []

    def work(start, stop):
        if start > 0:
            raise ValueError("code 3 in rows %d:%d" % (start, stop))
        ended.append((start, stop))

    with pytest.raises(ValueError, match="code 3 in rows 50:100"):
        parallel.for_row_ranges(100, parallel.MIN_BYTES, work)
    assert ended == [(0, 50)]


def test_a_transcoded_matrix_is_the_same_on_one_core_or_two(monkeypatch):
    from bitnet_core.codecs import hf2bit, i2s

    rng = np.random.default_rng(0)
    packed = hf2bit.pack(rng.integers(-1, 2, (1024, 1280)).astype(np.int8))
    two = i2s.from_hf2bit(packed, 1024, 1.5)
    monkeypatch.setattr(parallel, "MIN_BYTES", 1 << 60)
    np.testing.assert_array_equal(i2s.from_hf2bit(packed, 1024, 1.5), two)
