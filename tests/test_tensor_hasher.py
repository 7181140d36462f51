"""integrity.TensorHasher: a tensor hashed in pieces (begin + update) gives the digest of the whole (add)."""

import numpy as np

from bitnet_convert.fileio.integrity import TensorHasher

TENSORS = {"a": np.arange(1000, dtype=np.uint8), "b.weight": np.arange(77, dtype=np.float32), "c": np.zeros(0, np.uint8)}


def test_pieces_give_the_digest_of_whole_tensors():
    whole, pieces = TensorHasher(), TensorHasher()
    for name, data in TENSORS.items():
        whole.add(name, data)
        raw = data.view(np.uint8)
        pieces.begin(name, raw.nbytes)
        for start in range(0, raw.nbytes, 300):
            pieces.update(raw[start : start + 300])
    assert pieces.hexdigest() == whole.hexdigest()


def test_background_hashing_gives_the_same_digest():
    """The writers hash on a thread of their own; the digest is the same as hashing in line, and close()
    ends the thread (also when the writer stops half-way)."""
    import gc
    import threading

    inline, background = TensorHasher(), TensorHasher(background=True)
    for name, data in TENSORS.items():
        for hasher in (inline, background):
            hasher.add(name, data)
    assert background.hexdigest() == inline.hexdigest()
    stopped = TensorHasher(background=True)
    stopped.add("a", TENSORS["a"])
    stopped.close()
    stopped.close()  # idempotent
    dropped = TensorHasher(background=True)  # a writer that failed before closing it
    dropped.add("a", TENSORS["a"])
    threads = [t for t in threading.enumerate() if t.name == "bitnet-convert-hash"]
    del dropped
    gc.collect()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
