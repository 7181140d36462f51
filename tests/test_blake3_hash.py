"""blake3-model-v4 (docs/formats.md §9): each tensor's bytes by their BLAKE3 digest, the documents and the
description too. The digest is checked against an independent computation of the description (the blake3
package directly, itself checked against BLAKE3's published digest of no input) and a known answer; pieces of
any size and a hash thread or none give it; every byte counts, and so does where one tensor ends. (That v4
outputs fail every edit the other tests make: test_integrity.py and test_model_hash.py, whose outputs record
v4.)"""

from __future__ import annotations

import gc
import json
import threading

import blake3
import model_hashing
import numpy as np
import pytest

from bitnet_convert.fileio.integrity import HASH_ALGORITHM, HASH_V4, TensorDigests

SIZES = {"blk.0.w": 3 * 1024 * 1024 + 12_345, "norm": 1000, "empty": 0}
# Of these tensors with config.json "{}": a change to the algorithm that keeps both computations in step shows here.
KNOWN_DIGEST = "d4b79f210e1a2ed79539d8db0ef1d92d635d6d0ea4a382d4fadd2c794a59047e"
# BLAKE3's digest of the empty input, from its specification's test vectors.
EMPTY_BLAKE3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def _tensors() -> dict[str, np.ndarray]:
    return model_hashing.patterned(SIZES)


def _independent_digest(tensors: dict[str, np.ndarray], config: bytes) -> str:
    """The description of §9 built by hand with the blake3 package."""
    records = [{"name": name, "dtype": "U8", "shape": [data.nbytes], "nbytes": data.nbytes,
                "blake3": blake3.blake3(data.tobytes()).hexdigest()} for name, data in tensors.items()]
    description = {"algorithm": "blake3-model-v4", "tensors": records,
                   "config": {"config.json": blake3.blake3(config).hexdigest()}, "tokenizer_files": {}}
    return blake3.blake3(json.dumps(description, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digest(tensors: dict[str, np.ndarray], **how) -> str:
    return model_hashing.digest(tensors, HASH_V4, **how)


def test_writers_record_v4():
    assert HASH_ALGORITHM == HASH_V4


def test_the_digest_is_the_described_one():
    assert blake3.blake3(b"").hexdigest() == EMPTY_BLAKE3
    tensors = _tensors()
    expected = _independent_digest(tensors, b"{}")
    assert _digest(tensors) == expected
    assert expected == KNOWN_DIGEST


@pytest.mark.parametrize(("background", "piece"), [(False, 7919), (True, 7919), (True, 1 << 20),
                                                   (False, 4 << 20)])
def test_pieces_and_threads_give_the_same_digest(background, piece):
    tensors = _tensors()
    assert _digest(tensors, background=background, piece=piece) == _digest(tensors)


def test_every_byte_and_every_tensor_end_counts():
    tensors = _tensors()
    digest = _digest(tensors)
    big = tensors["blk.0.w"]
    for at in (0, 1023, 1024, 1 << 20, big.nbytes - 1):  # BLAKE3's chunks are 1 KiB: both ends of some
        changed = big.copy()
        changed[at] ^= 1
        assert _digest({**tensors, "blk.0.w": changed}) != digest, at
    # the same bytes in the same order, one byte moved from the end of a tensor to the start of the next
    moved = {"blk.0.w": big[:-1], "norm": np.concatenate([big[-1:], tensors["norm"]]), "empty": tensors["empty"]}
    assert _digest(moved) != digest
    assert _digest(tensors, config=b"{ }") != digest


def test_close_ends_the_thread_also_half_way():
    def threads():
        return [t for t in threading.enumerate() if t.name == "bitnet-convert-hash"]

    before = set(threads())
    stopped = TensorDigests(background=True)
    stopped.begin("a", 3)
    stopped.update(np.zeros(3, np.uint8))
    stopped.close()
    stopped.close()  # idempotent
    assert stopped.digests() == [blake3.blake3(bytes(3)).hexdigest()]
    dropped = TensorDigests(background=True)  # a writer that failed before closing it
    dropped.begin("a", 3)
    dropped.update(np.zeros(3, np.uint8))
    running = set(threads()) - before
    del dropped
    gc.collect()
    for thread in running:
        thread.join(timeout=10)
        assert not thread.is_alive()
