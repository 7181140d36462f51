"""What both folder formats (hf, flax) write around their safetensors: config, tokenizer files, provenance.

Also the one allow-list of tokenizer files that travel between formats (the npz writer uses it too): nothing
else a source holds is carried into an output, so a stray file, or one named like the target's own files
(`model.safetensors.index.json` would redirect our own reader to other weights), never is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from bitnet_convert.fileio import integrity
from bitnet_convert.fileio.output import Output, Plan, PlannedTensor
from bitnet_convert.fileio.safetensors_io import (
    INDEX_FILE,
    SafetensorsFile,
    TensorSpec,
    dtype_code,
    header_bytes,
    shard_index,
    stored_pieces,
)
from bitnet_convert.fileio.sources import SourceWatch, read_json_file, shown
from bitnet_core.checkpoint import Checkpoint, RowBlocks, TensorEntry, Ternary, row_blocks
from bitnet_core.errors import ConvertError
from bitnet_core.names import TOKENIZER_FILES

log = logging.getLogger("bitnet_convert")
CONFIG_FILE = "config.json"
METADATA_DOCUMENT = "metadata"  # the keys a user set, as the content hash of a folder covers them

# Tokenizer files travel by names.TOKENIZER_FILES (whatever of them a checkpoint has), and chat templates (*.jinja).
_TEMPLATE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.jinja")  # a plain, visible file name: no path, no dot file


def is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or _TEMPLATE.fullmatch(name) is not None


def carried_tokenizer_files(files: Mapping[str, bytes], where: str, *, reserved: Sequence[str] = ()) -> dict[str, bytes]:
    """The tokenizer files an output receives: the allow-listed ones, never a name the target reserves for
    itself; a warning line names what is dropped."""
    carried = {name: data for name, data in files.items() if is_tokenizer_file(name) and name not in reserved}
    warn_not_carried(where, [name for name in files if name not in carried])
    return carried


def read_from(ckpt: Checkpoint) -> str:
    """The file a checkpoint was read from (what a warning about its files names), else its source."""
    return str(ckpt.provenance.get("path") or ckpt.provenance.get("source") or "checkpoint")


def warn_not_carried(where, names: Iterable[str]) -> None:
    """One warning line naming the files (or members) of `where` that no output receives."""
    names = sorted(names)
    if names:
        log.warning("%s: not carried into any output (not a known tokenizer file): %s", shown(where),
                    ", ".join(map(shown, names)))


def read_tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The allow-listed tokenizer files of a folder, by name (table order, then templates by name)."""
    names = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    names += sorted(p.name for p in folder.glob("*.jinja") if p.is_file() and is_tokenizer_file(p.name))
    return {name: (folder / name).read_bytes() for name in names}


def safetensors_folder(fmt: str, files: Sequence[tuple[str, Sequence[TensorSpec]]], produce: Callable,
                       header_metadata: Mapping[str, str], side: SideFiles, provenance: Mapping, record: dict,
                       metadata: Mapping[str, str] | None = None) -> Plan:
    """The plan of a folder of safetensors `files` ((name, specs) each; `produce(spec)` makes a tensor's data)
    and the side files: headers and tensors file by file, the shard index, then config, tokenizer files and
    the provenance record. The keys a user sets (`metadata`) live in the record; the content hash covers them
    as one more document (stored_folder_model reads them back from there)."""
    planned = {spec.name: PlannedTensor(spec.name, dtype_code(spec.dtype), spec.shape, spec.nbytes,
                                        functools.partial(_stored, spec, produce))
               for _, specs in files for spec in specs}
    index = shard_index(files)

    def layout(output: Output) -> None:
        for name, specs in files:
            with output.open(name) as fh:
                fh.write(header_bytes(specs, header_metadata))
                output.write_tensors(fh, [planned[spec.name] for spec in specs])
        if index is not None:
            (output.folder / INDEX_FILE).write_bytes(index)
        side.write(output.folder, output.record())

    documents = {CONFIG_FILE: side.config, **_metadata_document(metadata)}
    return Plan(fmt, list(planned.values()), layout, provenance, record, recorded_provenance, documents=documents,
                tokenizer_files=side.tokenizer_files, directory=True, metadata=dict(metadata or {}))


def _metadata_document(metadata: Mapping | None) -> dict[str, bytes]:
    """The keys a user set, as the content hash covers them ({} when none: earlier hashes stay as they were)."""
    return {METADATA_DOCUMENT: integrity.canonical_json(dict(metadata))} if metadata else {}


def _stored(spec: TensorSpec, produce: Callable):
    return stored_pieces(spec, produce(spec))


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, bitnet_convert.json), or one error line naming it:
    a regular file of at most SIDE_FILE_LIMIT bytes; a non-finite number in it is kept (only ever shown)."""
    return read_json_file(SourceWatch(), path, "JSON record", non_finite=True)


def recorded_provenance(folder) -> dict | None:
    """What our writer recorded in a folder; None for folders bitnet-convert did not write."""
    record = Path(folder) / integrity.PROVENANCE_FILE
    return read_json_object(record) if record.is_file() else None


@dataclasses.dataclass(frozen=True)
class SideFiles:
    """What a folder format writes beside its safetensors, as bytes: config.json and the tokenizer files that
    travel. Known before the provenance record, which holds the hash they are part of."""

    config: bytes
    tokenizer_files: dict[str, bytes]

    def write(self, folder: Path, record: Mapping) -> None:
        (folder / CONFIG_FILE).write_bytes(self.config)
        for name, data in self.tokenizer_files.items():
            (folder / name).parent.mkdir(exist_ok=True)  # sentence-transformers' 1_Pooling/config.json
            (folder / name).write_bytes(data)
        (folder / integrity.PROVENANCE_FILE).write_text(json.dumps(dict(record), indent=2) + "\n")


def side_files(config: Mapping, tokenizer_files: Mapping[str, bytes], *, reserved: Sequence[str], where: str) -> SideFiles:
    """config.json and the allow-listed tokenizer files, none named like the format's own files (`reserved`)."""
    own = (*reserved, CONFIG_FILE, integrity.PROVENANCE_FILE)
    config_bytes = (json.dumps(dict(config), indent=2) + "\n").encode()
    return SideFiles(config_bytes, carried_tokenizer_files(tokenizer_files, where, reserved=own))


def stored_folder_model(folder: Path, tensor_files: Sequence[SafetensorsFile]) -> integrity.StoredModel:
    """What a folder's content hash covers: its safetensors tensors (file by file, each in byte order),
    config.json and the allow-listed tokenizer files."""

    def tensors() -> Iterator[integrity.TensorBytes]:
        for file in tensor_files:
            for tensor in file:
                yield integrity.TensorBytes(tensor.name, dtype_code(tensor.dtype), tensor.shape, tensor.raw())

    config = folder / CONFIG_FILE
    if not config.is_file():
        raise ConvertError(f"{config}: missing")
    record = recorded_provenance(folder) or {}
    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ConvertError(f"{folder / integrity.PROVENANCE_FILE}: metadata is not a JSON object")
    documents = {CONFIG_FILE: config.read_bytes(), **_metadata_document(metadata)}
    return integrity.StoredModel(tensors, documents, read_tokenizer_files(folder))


def dense_producer(entry: TensorEntry, where: str) -> Callable[[], np.ndarray]:
    """A safetensors_io producer for a plain tensor (norm, embedding, master weight), as stored."""

    def produce() -> np.ndarray | RowBlocks:
        blocks = row_blocks(entry)  # an embedding a block of rows at a time, where the source offers it
        if blocks is not None:
            return blocks
        value = entry.load()
        if isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name}: expected a plain array, loaded ternary codes")
        return np.asarray(value)

    return produce
