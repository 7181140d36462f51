"""What every output records about itself: its source and a content hash of its tensors.

The hash is sha256 over each tensor's name and *stored* bytes, in the order the file stores them, so
`inspect --check` can recompute it from the file alone, without trusting any header field it checks.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from . import __version__

HASH_ALGORITHM = "sha256-tensors-v1"
PROVENANCE_FILE = "bitnet_convert.json"  # inside folder formats (hf, flax)


class TensorHasher:
    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def add(self, name: str, data) -> None:
        raw = memoryview(np.ascontiguousarray(data)).cast("B") if not isinstance(data, (bytes, memoryview)) else data
        raw = memoryview(raw).cast("B")
        encoded = name.encode()
        self._sha.update(struct.pack("<Q", len(encoded)) + encoded + struct.pack("<Q", raw.nbytes))
        self._sha.update(raw)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def hash_stored(tensors) -> str:
    """Hash an iterator of (name, bytes) as a format's `stored_tensor_bytes` yields them."""
    hasher = TensorHasher()
    for name, raw in tensors:
        hasher.add(name, raw)
    return hasher.hexdigest()


def provenance_record(ckpt_provenance: dict, content_hash: str | None, fmt: str, **extra) -> dict:
    """The dict each writer stores (as JSON) beside or inside its output."""
    record = {
        "producer": "bitnet-convert",
        "producer_version": __version__,
        "format": fmt,
        "source": ckpt_provenance.get("source"),
        "source_format": ckpt_provenance.get("format"),
        "revision": ckpt_provenance.get("revision"),
        "hash_algorithm": HASH_ALGORITHM,
        "content_hash": content_hash,
    }
    record.update(extra)
    return record
