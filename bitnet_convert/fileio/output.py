"""The one owner of outputs: every format's writer is a plan and a layout, and this module does the rest.

A format says what it stores and where the bytes go:
- a `Plan`: the stored tensors in file order, each with its producer (pieces of its stored bytes), the side
  documents the content hash covers (config, tokenizer files), the writer's settings for the provenance
  record, and how an earlier output of the format is recognized (what --force may replace);
- a layout (`Plan.layout(output)`): headers and members written to the file objects this module hands it,
  taking each tensor's bytes from the stream in plan order.

`write(plan, out)` then owns what every output shares:
- publishing: all or nothing, never over what is not ours (atomic.py), one file, a folder or a set of files;
- direct writes: every file a layout opens is a DirectFile (direct.py);
- read-ahead: the tensors are produced on a second core, ahead of the layout (prefetch.py);
- hashing: each tensor as stored, piece by piece, and the side documents, into the content hash
  (blake3-model-v4, on a thread of its own; integrity.py);
- the progress bar, and the provenance record (written by the layout once the hash is known, or patched into
  a fixed-width placeholder where the format stores the record before the data: GGUF's header).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from bitnet_convert.fileio import atomic, integrity
from bitnet_convert.fileio.direct import DirectFile
from bitnet_convert.fileio.prefetch import DEFAULT_DEPTH, prefetch
from bitnet_convert.fileio.progress import progress_bar
from bitnet_core.errors import ConvertError

HASH_PLACEHOLDER = "~" * 64  # same width as a sha256 hex digest; '~' never occurs in one


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One tensor as the file stores it (what the content hash records of it), and how to make its bytes."""

    name: str
    dtype: str  # as the file names it: safetensors code ("BF16"), npy descr ("<u2"), GGML type ("TQ2_0")
    shape: tuple[int, ...]  # as the file stores it (GGUF: ne0 first)
    nbytes: int
    # The stored bytes in pieces (arrays or bytes-likes, each fresh: it is hashed on another thread).
    produce: Callable[[], Iterable] = dataclasses.field(repr=False, compare=False)
    info: object = dataclasses.field(default=None, repr=False, compare=False)  # the format's own description


@dataclasses.dataclass
class Plan:
    """What one output stores, and its layout: everything a format decides."""

    fmt: str
    tensors: list[PlannedTensor]
    layout: Callable[[Output], None]
    provenance: Mapping  # the checkpoint's, as this output records it
    record: dict  # the writer's settings, recorded beside the provenance
    recorded_provenance: Callable[[Path], dict | None]  # an earlier output's record (what --force may replace)
    documents: dict[str, bytes] = dataclasses.field(default_factory=dict)  # config documents, by name
    tokenizer_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    directory: bool = False  # a folder output; else one file, or `parts` sibling files
    parts: Callable[[Path], list[Path]] | None = None  # the files of a file set (GGUF splits), from OUT
    lookahead: int = DEFAULT_DEPTH  # pieces produced ahead of the layout
    lookahead_bytes: int = 0  # ... and at most this many bytes of them (0: no bound)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # keys a user set (--metadata), recorded
    description: Callable[[], dict] | None = None  # what a dry run shows beyond the tensors (GGUF keys)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def write(plan: Plan, out: str | os.PathLike, *, force: bool = False, quiet: bool = True) -> Path:
    """Write `plan` to `out`, published all or nothing; returns the path written (of a set of files, the first:
    the one a runtime opens)."""
    out = Path(out)
    atomic.refuse_output_over_input(plan.provenance.get("path"), out)  # the file or folder the reader read
    targets = plan.parts(out) if plan.parts is not None else [out]
    with atomic.replacing_outputs_of(plan.fmt, plan.recorded_provenance), \
            atomic.atomic_paths(targets, force=force, directory=plan.directory) as tmps, \
            contextlib.closing(integrity.ModelHasher(background=True)) as hasher, \
            progress_bar(plan.total_bytes, f"writing {out.name}", quiet) as bar:
        output = Output(plan, out, tmps, hasher, bar)
        try:
            plan.layout(output)
            output.finish()
        finally:
            output.close()
    return targets[0]


class Output:
    """What a layout writes through: the files of the output, the tensors' bytes in plan order (read ahead,
    hashed, counted), and the provenance record."""

    def __init__(self, plan: Plan, target: Path, tmps: list[Path], hasher: integrity.ModelHasher, bar) -> None:
        self.plan = plan
        self.target = target  # what the output will be called (errors name it)
        self._tmps = tmps
        self._hasher = hasher
        self._bar = bar
        self._files: list[DirectFile] = []
        self._stream: Iterator | None = None
        self._next = 0  # index of the next tensor in plan.tensors
        self._patch: tuple[int, int, str, int, int] | None = None
        self._digest: str | None = None
        for name, data in plan.documents.items():
            hasher.add_config(name, data)
        for name, data in plan.tokenizer_files.items():
            hasher.add_tokenizer_file(name, data)

    # ------------------------------------------------------------------------------------------- files

    @property
    def folder(self) -> Path:
        """The temporary folder of a folder output (what becomes OUT)."""
        if not self.plan.directory:
            raise AssertionError("a file output has no folder")
        return self._tmps[0]

    def open(self, name: str | int = 0) -> DirectFile:
        """A new file: by name inside a folder output, by its index in a file output's parts (0: the file).
        Closed when the layout returns, if it has not closed it itself."""
        path = self.folder / name if isinstance(name, str) else self._tmps[name]
        fh = DirectFile(path)
        self._files.append(fh)
        return fh

    def close(self) -> None:
        """Stop the read-ahead and close every file (idempotent; after a failure too)."""
        if self._stream is not None:
            self._stream.close()  # after the last tensor it has ended already; after a failure it stops now
        files, self._files = self._files, []
        with contextlib.ExitStack() as closing:  # every file closed even when one of them fails to
            for fh in files:
                closing.callback(fh.close)

    # ----------------------------------------------------------------------------------------- tensors

    def start(self) -> None:
        """Start producing the tensors now (the first `write_tensor` does otherwise): a layout that builds its
        header after declaring the tensors overlaps the two."""
        if self._stream is None:
            plan = self.plan
            self._stream = prefetch(_hashed_pieces(plan.tensors, self._hasher), depth=plan.lookahead,
                                    max_bytes=plan.lookahead_bytes,
                                    weigh=lambda item: 0 if item[1] is None else item[1].nbytes)

    def write_tensor(self, fh, tensor: PlannedTensor) -> None:
        """Write the next tensor's stored bytes to `fh` (it must be `tensor`: the plan's order)."""
        self.start()
        expected = self.plan.tensors[self._next] if self._next < len(self.plan.tensors) else None
        if tensor is not expected:
            raise AssertionError(f"{tensor.name}: written out of the plan's order")
        self._next += 1
        started, _ = next(self._stream)
        if started is not tensor:
            raise AssertionError(f"{tensor.name}: the stream is at {started.name}")
        written = 0
        while written < tensor.nbytes:
            _, raw = next(self._stream)
            fh.write(raw)
            written += raw.nbytes
            self._bar.update(raw.nbytes)

    def write_tensors(self, fh, tensors: Iterable[PlannedTensor]) -> None:
        for tensor in tensors:
            self.write_tensor(fh, tensor)

    # -------------------------------------------------------------------------------------- provenance

    def document(self, name: str, data: bytes) -> None:
        """A config document the content hash covers that the layout makes itself."""
        self._hasher.add_config(name, data)

    def record(self) -> dict:
        """The provenance record, its content hash complete: every tensor written, every document given."""
        self._drain()
        if self._digest is None:
            self._digest = self._hasher.hexdigest()
        return self._record(self._digest)

    def provisional_record(self) -> dict:
        """The provenance record with HASH_PLACEHOLDER for its hash, for a format that stores it before the
        data; the layout then says where the placeholder lies (`patch_hash_at`)."""
        return self._record(HASH_PLACEHOLDER)

    def patch_hash_at(self, part: int, offset: int, covers: tuple[str, int, int] | None = None) -> None:
        """Once written, overwrite the placeholder at `offset` of file `part` with the content hash; `covers`
        (name, start, stop): bytes of that file the hash covers as a config document (GGUF's key/values)."""
        name, start, stop = covers or ("", 0, 0)
        self._patch = (part, offset, name, start, stop)

    def _record(self, content_hash: str) -> dict:
        return provenance_record(self.plan, content_hash)

    def _drain(self) -> None:
        """Every tensor written, and its producer done (a producer's error after its last piece shows here)."""
        if self._next != len(self.plan.tensors):
            raise AssertionError(f"the layout wrote {self._next} of {len(self.plan.tensors)} tensors")
        if self._stream is not None:
            for _ in self._stream:
                raise AssertionError("a producer made more pieces than its tensor holds")

    def finish(self) -> None:
        """Every tensor written, the files closed (their last bytes out), the placeholder patched."""
        self._drain()
        self.close()
        if self._patch is None:
            return
        part, offset, name, start, stop = self._patch
        with open(self._tmps[part], "r+b") as fh:
            if name:
                fh.seek(start)
                self._hasher.add_config(name, fh.read(stop - start))
            fh.seek(offset)
            if fh.read(len(HASH_PLACEHOLDER)) != HASH_PLACEHOLDER.encode():
                raise AssertionError("the provenance record's placeholder is not where the layout said")
            fh.seek(offset)
            fh.write(self._hasher.hexdigest().encode())


def provenance_record(plan: Plan, content_hash: str | None) -> dict:
    """The record an output of `plan` stores: its source, its content hash, the writer's settings, and the keys a
    user set (absent when none: the records of earlier outputs stay as they were)."""
    record = integrity.provenance_record(dict(plan.provenance), content_hash, plan.fmt, **plan.record)
    if plan.metadata:
        record["metadata"] = dict(plan.metadata)
    return record


# ----------------------------------------------------------------------------------------------- dry run


def describe(plan: Plan, out: str | os.PathLike, *, force: bool = False) -> dict:
    """What `write(plan, out, force=force)` would write, without writing anything: the files, each tensor's
    name, stored type, shape and bytes, the total, and what the format adds (GGUF: the architecture and keys).

    Everything a conversion reads and checks is read and checked: every tensor is produced (its codes checked,
    its bytes counted against the plan) and dropped, and the output path is checked as publishing would."""
    out = Path(out)
    atomic.refuse_output_over_input(plan.provenance.get("path"), out)
    targets = plan.parts(out) if plan.parts is not None else [out]
    with atomic.replacing_outputs_of(plan.fmt, plan.recorded_provenance):
        for target in targets:
            atomic.check_target(target, force=force, directory=plan.directory)
    with prefetch(_hashed_pieces(plan.tensors, _NoHash()), depth=plan.lookahead, max_bytes=plan.lookahead_bytes,
                  weigh=lambda item: 0 if item[1] is None else item[1].nbytes) as pieces:
        for _ in pieces:
            pass
    described = {
        "output": str(out),
        "format": plan.fmt,
        "files": [str(target) for target in targets],
        "tensors": [{"name": t.name, "type": t.dtype, "shape": list(t.shape), "bytes": t.nbytes}
                    for t in plan.tensors],
        "tensor_count": len(plan.tensors),
        "total_bytes": plan.total_bytes,
        "metadata": dict(plan.metadata),
    }
    if plan.description is not None:
        described.update(plan.description())
    return described


class _NoHash:
    """A dry run's stand-in for the hasher: nothing is recorded, so nothing is hashed."""

    def begin(self, *args) -> None:
        pass

    def update(self, piece) -> None:
        pass


def _hashed_pieces(tensors: list[PlannedTensor], hasher: integrity.ModelHasher):
    """(tensor, None) opens a tensor, (tensor, bytes) carries its data, each piece hashed as it is made (on the
    read-ahead thread: the hash then runs beside the writing, too)."""
    for t in tensors:
        pieces = iter(t.produce())
        first = next(pieces, None)  # the tensor is made (loaded) before its hash begins
        hasher.begin(t.name, t.dtype, t.shape, t.nbytes)
        yield t, None
        made = 0
        for piece in itertools.chain([first], pieces) if first is not None else ():
            raw = _raw(piece)
            made += raw.nbytes
            if made > t.nbytes:
                break
            if raw.nbytes:  # an empty piece (no rows) has nothing to write
                hasher.update(raw)
                yield t, raw
        if made != t.nbytes:  # a bug in a producer: every later offset would shift
            raise ConvertError(f"tensor {t.name}: produced {made} bytes, planned {t.nbytes}")


def _raw(piece) -> memoryview:
    if isinstance(piece, np.ndarray):
        if piece.dtype.byteorder == ">":
            piece = piece.astype(piece.dtype.newbyteorder("<"))
        return memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
    return memoryview(piece).cast("B")
