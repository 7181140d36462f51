"""prefetch: order kept, bounded look-ahead, errors surface in the consumer, the worker never outlives it."""

import threading
import time

import pytest

from bitnet_convert.fileio.prefetch import prefetch


def assert_new_threads_end(before: set) -> None:
    deadline = time.monotonic() + 5
    while (new := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert new == []


def test_items_arrive_in_order_and_production_stays_a_few_ahead():
    produced, consumed = [], []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    for item in prefetch(items(), depth=2):
        assert len(produced) <= len(consumed) + 4  # 2 queued, 1 being put, 1 in hand
        consumed.append(item)
    assert consumed == list(range(50))


def test_a_producer_error_is_raised_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("tensor 3 is corrupt")

    got = []
    with pytest.raises(ValueError, match="tensor 3 is corrupt"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_stops_the_worker():
    def items():
        i = 0
        while True:
            i += 1
            yield i

    before = set(threading.enumerate())  # threads of earlier tests may end meanwhile: watch only new ones
    with pytest.raises(RuntimeError):
        for item in prefetch(items()):
            if item == 3:
                raise RuntimeError("disk full")
    assert_new_threads_end(before)


def test_a_byte_bound_keeps_the_lookahead_small():
    """max_bytes: the worker waits while what it made and the consumer has not taken weighs more than the
    bound (one item over at most), however deep the count allows."""
    made, taken = [], []
    lock = threading.Lock()

    def items():
        for i in range(40):
            with lock:
                made.append(i)
            yield bytes(10)

    for item in prefetch(items(), depth=1000, max_bytes=35, weigh=len):
        time.sleep(0.002)
        with lock:
            ahead = len(made) - len(taken)
        assert ahead <= 5  # 35 bytes: 3 held + 1 over the bound + 1 being made
        taken.append(item)
    assert len(taken) == 40


def test_close_stops_a_worker_that_was_never_iterated():
    def items():
        while True:
            yield 1

    before = set(threading.enumerate())
    pending = prefetch(items(), depth=2)
    pending.close()
    assert_new_threads_end(before)
