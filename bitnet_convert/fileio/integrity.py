"""What every output records about itself: its source and a content hash of the model it stores.

The hash, `blake3-model-v4`, is taken of a canonical description of everything a runtime reads in the file:
its config documents, its tokenizer files, and every tensor's name, stored dtype, shape and bytes in the order
the file stores them (docs/formats.md §9). `inspect --check` recomputes it from the file alone, without trusting
any header field it checks. Each format says what it stores (`stored_tensor_bytes`, a StoredModel); writers
feed the same description to a ModelHasher as they write.

v4 describes each tensor's bytes by their BLAKE3 digest: one core hashes a 2B4T output (1.2 GB) in ~0.3 s
beside the writer, where SHA-256 took ~0.7 s of CPU even split over every core. Outputs of earlier versions
record `sha256-model-v3` (the same description, each tensor by the SHA-256 digests of its 1 MiB chunks),
`sha256-model-v2` (one SHA-256 stream over the tensor bytes) or `sha256-tensors-v1` (tensor names and bytes
only): all still checked, v1 with a note of what it covers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import queue
import struct
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import blake3
import numpy as np

from bitnet_convert.fileio.sources import shown
from bitnet_core import __version__
from bitnet_core.errors import ConvertError

HASH_V1 = "sha256-tensors-v1"
HASH_V2 = "sha256-model-v2"
HASH_V3 = "sha256-model-v3"
HASH_V4 = "blake3-model-v4"
HASH_ALGORITHM = HASH_V4  # what writers record
# What each algorithm's hash covers, as inspect reports it.
HASH_COVERAGE = {
    HASH_V1: "tensor names and bytes only (not dtypes, shapes, config or tokenizer files)",
    HASH_V2: "config, tokenizer files, and every tensor's name, dtype, shape and bytes",
    HASH_V3: "config, tokenizer files, and every tensor's name, dtype, shape and bytes",
    HASH_V4: "config, tokenizer files, and every tensor's name, dtype, shape and bytes",
}
FULL_COVERAGE = (HASH_V2, HASH_V3, HASH_V4)  # a file recording one of these needs no note of what it leaves out
CHUNK_BYTES = 1 << 20  # v3's chunk: large enough that a pool task costs little beside it, small for a 2-core split
PROVENANCE_FILE = "bitnet_convert.json"  # inside folder formats (hf, flax)


class _Feed:
    """Items handed to `consume` in order: at once, or with `background` on a thread of its own beside the
    writer that feeds it and the producer that makes the next tensor (hashlib and blake3 release the GIL;
    BENCHMARKS.md, design measurements). In the background the items must stay unchanged until `close`
    (writers hand over fresh arrays or views of their open input), and at most QUEUED wait at a time; an
    exception of `consume` is kept for `check`."""

    QUEUED = 16  # pieces (<= 16 MB each) waiting: the producer runs ahead of a hash thread the others preempt

    def __init__(self, consume: Callable, background: bool) -> None:
        self._consume = consume
        self._pending: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._errors: list[BaseException] = []
        if background:
            self._pending = queue.Queue(maxsize=self.QUEUED)
            self._worker = threading.Thread(target=_consume_all, args=(self._pending, consume, self._errors),
                                            name="bitnet-convert-hash", daemon=True)
            self._worker.start()
            # A feed dropped without close() (its writer failed early) still ends its thread.
            self._finalizer = weakref.finalize(self, self._pending.put, None)
            self._finalizer.atexit = False  # at exit the daemon thread just ends; never wait on its queue

    def put(self, item) -> None:
        if self._pending is None:
            self._consume(item)
        else:
            self._pending.put(item)

    def close(self) -> None:
        """Let the thread consume what it was given, then end it (idempotent; writers call it on failure too, so
        no thread outlives them holding their pieces)."""
        if self._worker is not None:
            self._finalizer()  # puts the end marker, once
            self._worker.join()
            self._worker = None

    def check(self) -> None:
        """Close, and raise what `consume` raised in the background."""
        self.close()
        if self._errors:
            raise self._errors[0]


def _consume_all(pending: queue.Queue, consume: Callable, errors: list) -> None:
    """A feed's thread (no reference to the feed itself, so a dropped one can be collected)."""
    while (item := pending.get()) is not None:
        if not errors:
            try:
                consume(item)
            except BaseException as exc:  # re-raised by check
                errors.append(exc)


class TensorHasher:
    """sha256-tensors-v1 of tensors fed in file order: `add`, or `begin` + `update`s (names and bytes only; a
    ModelHasher hashes the tensor bytes of sha256-model-v2 through one). With `background`, sha256 runs on a
    thread of its own (_Feed: the pieces must then stay unchanged until `hexdigest` or `close`)."""

    def __init__(self, background: bool = False) -> None:
        self._sha = hashlib.sha256()
        self._feed = _Feed(self._sha.update, background)

    def add(self, name: str, data) -> None:
        raw = memoryview(np.ascontiguousarray(data)).cast("B") if not isinstance(data, (bytes, memoryview)) else data
        raw = memoryview(raw).cast("B")
        self.begin(name, raw.nbytes)
        self._feed.put(raw)

    def begin(self, name: str, nbytes: int) -> None:
        """Start a tensor of `nbytes` stored bytes that follow in pieces through `update`: begin + updates
        give the digest `add` gives for the joined bytes (the writer must deliver exactly `nbytes`)."""
        encoded = name.encode()
        self._feed.put(struct.pack("<Q", len(encoded)) + encoded + struct.pack("<Q", nbytes))

    def update(self, piece) -> None:
        self._feed.put(memoryview(piece).cast("B"))

    def close(self) -> None:
        """Hash what was given and end the background thread (idempotent)."""
        self._feed.close()

    def hexdigest(self) -> str:
        self._feed.check()
        return self._sha.hexdigest()


class ChunkHasher:
    """sha256-model-v3's tensor bytes: each tensor, fed in file order (`begin` + `update`s, or `add`), cut into
    CHUNK_BYTES chunks from its first byte (the last one shorter), every chunk hashed on a pool of threads, one
    per core (hashlib releases the GIL); a tensor's digest is the sha256 of its chunks' digests in order.

    Whole chunks inside a piece are hashed from the piece itself; the bytes of a chunk that spans pieces are
    copied (at most CHUNK_BYTES). With `background`, `update` returns once the piece's chunks are queued, so
    the pieces must stay unchanged until `digests` or `close` (as for TensorHasher); without it, `update`
    returns when its chunks are hashed. At most QUEUED chunks wait at a time either way."""

    QUEUED = 32  # chunks handed to the pool and not yet hashed: bounds the pieces kept alive for them

    def __init__(self, background: bool = False, workers: int | None = None) -> None:
        self._background = background
        self._pool = concurrent.futures.ThreadPoolExecutor(workers or _cores(), "bitnet-convert-chunk-hash")
        self._slots = threading.BoundedSemaphore(self.QUEUED)
        self._tensors: list[list[concurrent.futures.Future]] = []  # per tensor: its chunks' digests, in order
        self._partial = bytearray()  # the start of a chunk whose end has not come yet

    def add(self, name: str, data) -> None:
        raw = raw_bytes(data)
        self.begin(name, raw.nbytes)
        self.update(raw)

    def begin(self, name: str, nbytes: int) -> None:
        """Start the next tensor (its name and size are the ModelHasher's description's, not hashed here)."""
        self._end_tensor()
        self._tensors.append([])

    def update(self, piece) -> None:
        raw = memoryview(piece).cast("B")
        submitted = []
        if self._partial:  # complete the chunk that spans pieces
            take = min(CHUNK_BYTES - len(self._partial), raw.nbytes)
            self._partial += raw[:take]
            raw = raw[take:]
            if len(self._partial) == CHUNK_BYTES:
                submitted.append(self._submit(bytes(self._partial)))
                self._partial = bytearray()
        whole = raw.nbytes - raw.nbytes % CHUNK_BYTES
        for start in range(0, whole, CHUNK_BYTES):
            submitted.append(self._submit(raw[start : start + CHUNK_BYTES]))
        self._partial += raw[whole:]
        if not self._background:
            concurrent.futures.wait(submitted)

    def _submit(self, chunk) -> concurrent.futures.Future:
        self._slots.acquire()
        future = self._pool.submit(_chunk_digest, chunk)
        slots = self._slots  # not self: a hasher dropped without close() is then freed, and its pool ends
        future.add_done_callback(lambda _: slots.release())
        self._tensors[-1].append(future)
        return future

    def _end_tensor(self) -> None:
        if self._partial:
            self._submit(bytes(self._partial))
            self._partial = bytearray()

    def digests(self) -> list[str]:
        """Each tensor's digest (hex), in the order they were fed; waits for the pool."""
        self._end_tensor()
        return [hashlib.sha256(b"".join(f.result() for f in chunks)).hexdigest() for chunks in self._tensors]

    def close(self) -> None:
        """Hash what was given, then end the pool's threads (idempotent; writers call it on failure too, and
        may still ask for the digests after it)."""
        self._end_tensor()
        self._pool.shutdown(wait=True)


class TensorDigests:
    """blake3-model-v4's tensor bytes: each tensor's BLAKE3 digest, fed in file order (`begin` + `update`s, or
    `add`); with `background`, hashed on a thread of its own (_Feed, as TensorHasher)."""

    def __init__(self, background: bool = False) -> None:
        self._digests: list = []  # per tensor, its blake3 hasher
        self._feed = _Feed(functools.partial(_hash_piece, self._digests), background)

    def add(self, name: str, data) -> None:
        raw = raw_bytes(data)
        self.begin(name, raw.nbytes)
        self.update(raw)

    def begin(self, name: str, nbytes: int) -> None:
        """Start the next tensor (its name and size are the ModelHasher's description's, not hashed here)."""
        self._feed.put(_NEXT_TENSOR)

    def update(self, piece) -> None:
        self._feed.put(memoryview(piece).cast("B"))

    def close(self) -> None:
        """Hash what was given and end the background thread (idempotent)."""
        self._feed.close()

    def digests(self) -> list[str]:
        """Each tensor's digest (hex), in the order they were fed."""
        self._feed.check()
        return [digest.hexdigest() for digest in self._digests]


_NEXT_TENSOR = object()


def _hash_piece(digests: list, item) -> None:
    if item is _NEXT_TENSOR:
        digests.append(blake3.blake3())
    else:
        digests[-1].update(item)


def raw_bytes(data) -> memoryview:
    """The bytes of an array (any dtype, bf16 included: it has no buffer format) or of a bytes-like object."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def _cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _chunk_digest(chunk) -> bytes:
    return hashlib.sha256(chunk).digest()


@dataclasses.dataclass(frozen=True)
class TensorBytes:
    """One stored tensor as the content hash describes it: everything about it that the file declares."""

    name: str
    dtype: str  # as the file names it: safetensors code ("BF16"), npy descr ("<u2"), GGML type ("TQ2_0")
    shape: tuple[int, ...]  # as the file stores it (GGUF: ne0 first)
    data: memoryview  # the stored bytes


@dataclasses.dataclass(frozen=True)
class StoredModel:
    """What a file stores that a runtime reads (a format's `stored_tensor_bytes`): what the content hash covers.

    Iterating gives each tensor's (name, bytes) in file order, all that sha256-tensors-v1 covered."""

    tensors: Callable[[], Iterator[TensorBytes]]  # in file order; each call reads them anew, lazily
    config: Mapping[str, bytes]  # the config documents, by name, as stored
    tokenizer_files: Mapping[str, bytes]  # by name, as stored

    def __iter__(self) -> Iterator[tuple[str, memoryview]]:
        return ((t.name, t.data) for t in self.tensors())


class ModelHasher:
    """The content hash by `algorithm` (blake3-model-v4, or v3 / v2 for checking older files), fed as a writer
    stores the model: tensors in file order (`add`, or `begin` + `update`s), config documents and tokenizer
    files (`add_config`, `add_tokenizer_file`) in any order, then `hexdigest`.

    Tensor bytes stream through a TensorDigests (v4), ChunkHasher (v3) or TensorHasher (v2), beside the writer
    with `background` (see there); what describes them, and the documents, are kept to build the description
    the digest is taken of."""

    def __init__(self, background: bool = False, algorithm: str = HASH_ALGORITHM) -> None:
        if algorithm not in FULL_COVERAGE:
            raise ValueError(f"ModelHasher computes {', '.join(FULL_COVERAGE)}, not {algorithm!r}")
        self.algorithm = algorithm
        self._tensor_bytes = {HASH_V4: TensorDigests, HASH_V3: ChunkHasher}.get(algorithm, TensorHasher)(background)
        # v4 digests everything by BLAKE3, the earlier versions by SHA-256
        self._digest = blake3.blake3 if algorithm == HASH_V4 else hashlib.sha256
        self._tensors: list[dict] = []
        self._config: dict[str, str] = {}
        self._tokenizer_files: dict[str, str] = {}

    def add(self, name: str, dtype: str, shape, data) -> None:
        raw = raw_bytes(data)
        self.begin(name, dtype, shape, raw.nbytes)
        self._tensor_bytes.update(raw)

    def begin(self, name: str, dtype: str, shape, nbytes: int) -> None:
        """Start a tensor whose `nbytes` stored bytes follow through `update` (as TensorHasher.begin)."""
        self._tensors.append(_tensor_record(name, dtype, shape))
        if self.algorithm != HASH_V2:
            self._tensors[-1]["nbytes"] = int(nbytes)
        self._tensor_bytes.begin(name, nbytes)

    def update(self, piece) -> None:
        self._tensor_bytes.update(piece)

    def add_config(self, name: str, data) -> None:
        self._config[name] = self._digest(data).hexdigest()

    def add_tokenizer_file(self, name: str, data) -> None:
        self._tokenizer_files[name] = self._digest(data).hexdigest()

    def close(self) -> None:
        self._tensor_bytes.close()

    def description(self) -> dict:
        """The canonical description of the model (docs/formats.md §9); waits for the tensor bytes."""
        documents = {"config": self._config, "tokenizer_files": self._tokenizer_files}
        if self.algorithm == HASH_V2:
            return {"algorithm": HASH_V2, "tensors": self._tensors, "tensor_bytes": self._tensor_bytes.hexdigest(),
                    **documents}
        if self.algorithm == HASH_V4:
            digests = self._tensor_bytes.digests()
            return {"algorithm": HASH_V4, "tensors": [dict(record, blake3=digest) for record, digest in
                                                      zip(self._tensors, digests)], **documents}
        tensors = [dict(record, chunks=digest) for record, digest in zip(self._tensors, self._tensor_bytes.digests())]
        return {"algorithm": HASH_V3, "chunk_bytes": CHUNK_BYTES, "tensors": tensors, **documents}

    def hexdigest(self) -> str:
        return self._digest(canonical_json(self.description())).hexdigest()


def _tensor_record(name: str, dtype: str, shape) -> dict:
    return {"name": name, "dtype": dtype, "shape": [int(d) for d in shape]}


def canonical_json(value) -> bytes:
    """One byte string per value (sorted keys, no whitespace, ASCII escapes): equal descriptions hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def hash_stored(stored, algorithm: str = HASH_ALGORITHM) -> str:
    """The content hash by `algorithm` of what a format's `stored_tensor_bytes` returns (a StoredModel;
    sha256-tensors-v1 also takes any iterable of (name, bytes))."""
    if algorithm == HASH_V1:
        return _tensors_v1(stored)
    if algorithm in FULL_COVERAGE:
        return _model(stored, algorithm)
    raise ValueError(f"unknown content hash algorithm {algorithm!r}")


def _tensors_v1(tensors) -> str:
    hasher = TensorHasher()
    for name, raw in tensors:
        hasher.add(name, raw)
    return hasher.hexdigest()


def _model(stored: StoredModel, algorithm: str) -> str:
    if not isinstance(stored, StoredModel):  # bare (name, bytes) pairs lack dtypes, shapes, config, tokenizer
        raise TypeError(f"{algorithm} needs a StoredModel (a format's stored_tensor_bytes), "
                        f"got {type(stored).__name__}")
    with contextlib.closing(ModelHasher(algorithm=algorithm)) as hasher:
        for tensor in stored.tensors():
            hasher.add(tensor.name, tensor.dtype, tensor.shape, tensor.data)
        for name, data in stored.config.items():
            hasher.add_config(name, data)
        for name, data in stored.tokenizer_files.items():
            hasher.add_tokenizer_file(name, data)
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
        # Travel on through every conversion (what `flax-to-hf` restores by default, what `verify` allows):
        "source_layout": ckpt_provenance.get("source_layout"),
        "multiplier_roundings": list(ckpt_provenance.get("multiplier_roundings") or []),
        "tensor_casts": dict(ckpt_provenance.get("tensor_casts") or {}),
        "hash_algorithm": HASH_ALGORITHM,
        "content_hash": content_hash,
    }
    record.update(extra)
    return record


def reader_provenance(fmt: str, path, recorded: dict | None, *, source: str | None = None,
                      revision: str | None = None, **extra) -> dict:
    """A reader's `Checkpoint.provenance`. The original source, its format and revision travel on through a
    chain of conversions (read from what the file recorded); `path`/`format` name the file just read."""
    recorded = _checked_record(recorded or {}, path)
    stored_roundings = extra.pop("multiplier_roundings", [])  # what the file alone shows; its record knows more
    return {
        "format": fmt,
        "path": str(Path(path).resolve()),
        "source": recorded.get("source") or source or str(Path(path).resolve()),
        "source_format": recorded.get("source_format") or fmt,
        "revision": recorded.get("revision") or revision,
        # the HF layout the model first came in, and each rounding its multipliers went through (in order)
        "source_layout": recorded.get("source_layout") or extra.get("layout"),
        "multiplier_roundings": list(recorded.get("multiplier_roundings") or stored_roundings),
        # tensor -> the type a writer on the path cast it to (a GGUF's embedding type), for verify
        "tensor_casts": dict(recorded.get("tensor_casts") or {}),
        **extra,
    }


# The recorded fields that travel on and steer later writers and `verify`: each of the JSON type it must have.
_RECORD_FIELDS = {"source": str, "source_format": str, "revision": str, "source_layout": str,
                  "multiplier_roundings": list, "tensor_casts": dict}


def _checked_record(record, path) -> dict:
    """A recorded provenance whose travelling fields have their types (a record is written by us, but a file
    can hold anything): anything else is one error naming the file and the field."""
    where = f"{shown(path)}: provenance record"
    if not isinstance(record, dict):
        raise ConvertError(f"{where} is a JSON {type(record).__name__}, expected an object")
    for key, kind in _RECORD_FIELDS.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            raise ConvertError(f"{where}: {key} is {value!r:.60}, expected a JSON {_JSON_NAMES[kind]}")
    if not all(isinstance(r, str) for r in record.get("multiplier_roundings") or []):
        raise ConvertError(f"{where}: multiplier_roundings holds {record['multiplier_roundings']!r:.60}, expected "
                           "names of roundings")
    if not all(isinstance(t, str) for t in (record.get("tensor_casts") or {}).values()):
        raise ConvertError(f"{where}: tensor_casts holds {record['tensor_casts']!r:.60}, expected tensor name -> "
                           "type name")
    return record


_JSON_NAMES = {str: "string", list: "list", dict: "object"}
