"""integrity.TensorHasher: a tensor hashed in pieces (begin + update) gives the digest of the whole (add)."""

import numpy as np

from bitnet_convert.integrity import TensorHasher

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
