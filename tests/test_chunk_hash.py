"""sha256-model-v3 (docs/formats.md §9): each tensor's bytes as the digests of fixed-size chunks, hashed on every
core. The digest is checked against an independent computation of the description and a known answer; pieces
that cut chunks anywhere, a thread pool or none give it; every chunk counts, and so does where one tensor ends.
(That v3 outputs fail every edit the other tests make: test_integrity.py and test_integrity_v2.py, whose outputs
now record v3.)"""

from __future__ import annotations

import gc
import hashlib
import json
import threading

import model_hashing
import numpy as np
import pytest

from bitnet_convert.fileio.integrity import CHUNK_BYTES, HASH_V3, ChunkHasher

# Three tensors: one of two whole chunks and a short third, one shorter than a chunk, one empty.
SIZES = {"blk.0.w": 2 * CHUNK_BYTES + 12_345, "norm": 1000, "empty": 0}
# Of these tensors with config.json "{}": a change to the algorithm that keeps both computations in step shows here.
KNOWN_DIGEST = "4b6b8f83cca5f72cd7cdec5ac52c646a706677bd15daf67ebe4882990f9277a5"


def _tensors() -> dict[str, np.ndarray]:
    return model_hashing.patterned(SIZES)


def _independent_digest(tensors: dict[str, np.ndarray], config: bytes) -> str:
    """The description of §9 built by hand, chunk by chunk with hashlib."""
    records = []
    for name, data in tensors.items():
        raw = data.tobytes()
        chunks = b"".join(hashlib.sha256(raw[i : i + CHUNK_BYTES]).digest() for i in range(0, len(raw), CHUNK_BYTES))
        records.append({"name": name, "dtype": "U8", "shape": [len(raw)], "nbytes": len(raw),
                        "chunks": hashlib.sha256(chunks).hexdigest()})
    description = {"algorithm": "sha256-model-v3", "chunk_bytes": 1 << 20, "tensors": records,
                   "config": {"config.json": hashlib.sha256(config).hexdigest()}, "tokenizer_files": {}}
    return hashlib.sha256(json.dumps(description, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digest(tensors: dict[str, np.ndarray], **how) -> str:
    return model_hashing.digest(tensors, HASH_V3, **how)


def test_the_digest_is_the_described_one():
    tensors = _tensors()
    expected = _independent_digest(tensors, b"{}")
    assert _digest(tensors) == expected
    assert expected == KNOWN_DIGEST


@pytest.mark.parametrize(("background", "piece"), [(False, 7919), (True, 7919), (True, CHUNK_BYTES - 1),
                                                   (False, 3 * CHUNK_BYTES)])
def test_pieces_and_threads_give_the_same_digest(background, piece):
    tensors = _tensors()
    assert _digest(tensors, background=background, piece=piece) == _digest(tensors)


def test_every_chunk_and_every_tensor_end_counts():
    tensors = _tensors()
    digest = _digest(tensors)
    big = tensors["blk.0.w"]
    for at in (0, CHUNK_BYTES - 1, CHUNK_BYTES, 2 * CHUNK_BYTES + 5, big.nbytes - 1):  # each chunk, both ends
        changed = big.copy()
        changed[at] ^= 1
        assert _digest({**tensors, "blk.0.w": changed}) != digest, at
    # the same bytes in the same order, one byte moved from the end of a tensor to the start of the next
    moved = {"blk.0.w": big[:-1], "norm": np.concatenate([big[-1:], tensors["norm"]]), "empty": tensors["empty"]}
    assert _digest(moved) != digest


def test_close_ends_the_pool_also_half_way():
    def threads():
        return [t for t in threading.enumerate() if t.name.startswith("bitnet-convert-chunk-hash")]

    stopped = ChunkHasher(background=True)
    stopped.begin("a", 3 * CHUNK_BYTES)
    stopped.update(np.zeros(3 * CHUNK_BYTES, np.uint8))
    stopped.close()
    stopped.close()  # idempotent
    dropped = ChunkHasher(background=True)  # a writer that failed before closing it
    dropped.begin("a", 3 * CHUNK_BYTES)
    dropped.update(np.zeros(3 * CHUNK_BYTES, np.uint8))
    running = threads()
    del dropped
    gc.collect()
    for thread in running:
        thread.join(timeout=10)
        assert not thread.is_alive()
