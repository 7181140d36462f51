"""What every output records about itself: its source and a content hash of its tensors.

The hash is sha256 over each tensor's name and *stored* bytes, in the order the file stores them, so
`inspect --check` can recompute it from the file alone, without trusting any header field it checks.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from . import __version__

HASH_ALGORITHM = "sha256-tensors-v1"
PROVENANCE_FILE = "bitnet_convert.json"  # inside folder formats (hf, flax)


class TensorHasher:
    """The content hash of an output, fed tensor by tensor in file order: `add`, or `begin` + `update`s."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def add(self, name: str, data) -> None:
        raw = memoryview(np.ascontiguousarray(data)).cast("B") if not isinstance(data, (bytes, memoryview)) else data
        raw = memoryview(raw).cast("B")
        self.begin(name, raw.nbytes)
        self._sha.update(raw)

    def begin(self, name: str, nbytes: int) -> None:
        """Start a tensor of `nbytes` stored bytes that follow in pieces through `update`: begin + updates
        give the digest `add` gives for the joined bytes (the writer must deliver exactly `nbytes`)."""
        encoded = name.encode()
        self._sha.update(struct.pack("<Q", len(encoded)) + encoded + struct.pack("<Q", nbytes))

    def update(self, piece) -> None:
        self._sha.update(memoryview(piece).cast("B"))

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
        "source_format": ckpt_provenance.get("source_format") or ckpt_provenance.get("format"),
        "revision": ckpt_provenance.get("revision"),
        "converted_from": ckpt_provenance.get("path"),
        "converted_from_format": ckpt_provenance.get("format"),
        "hash_algorithm": HASH_ALGORITHM,
        "content_hash": content_hash,
    }
    record.update(extra)
    return record


def reader_provenance(fmt: str, path, recorded: dict | None, *, source: str | None = None,
                      revision: str | None = None, **extra) -> dict:
    """A reader's `Checkpoint.provenance`. The original source, its format and revision travel on through a
    chain of conversions (read from what the file recorded); `path`/`format` name the file just read."""
    recorded = recorded or {}
    return {
        "format": fmt,
        "path": str(Path(path).resolve()),
        "source": recorded.get("source") or source or str(Path(path).resolve()),
        "source_format": recorded.get("source_format") or fmt,
        "revision": recorded.get("revision") or revision,
        **extra,
    }
