"""What the content-hash tests share: patterned tensors, and a ModelHasher fed as a writer feeds it."""

from __future__ import annotations

import numpy as np

from bitnet_convert.fileio.integrity import ModelHasher


def patterned(sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """uint8 tensors of these sizes whose bytes repeat only every 251 (a prime): no two chunks alike."""
    return {name: ((np.arange(size, dtype=np.int64) * 131 + len(name)) % 251).astype(np.uint8)
            for name, size in sizes.items()}


def digest(tensors: dict[str, np.ndarray], algorithm: str, *, background: bool = False, piece: int | None = None,
           config: bytes = b"{}") -> str:
    """The model hash by `algorithm` of these U8 tensors and config.json `config`, each tensor whole or in fresh
    pieces of `piece` bytes."""
    hasher = ModelHasher(background, algorithm)
    for name, data in tensors.items():
        if piece is None:
            hasher.add(name, "U8", data.shape, data)
            continue
        hasher.begin(name, "U8", data.shape, data.nbytes)
        for start in range(0, data.nbytes, piece):
            hasher.update(data[start : start + piece].copy())  # fresh pieces, as writers hand over
    hasher.add_config("config.json", config)
    result = hasher.hexdigest()
    hasher.close()
    return result
