"""GGUF -> Checkpoint: files written by us, by llama.cpp's converter and by bitnet.cpp's.

The file's `general.architecture` picks its plug-in (architectures.py: the model's config from the keys and its
tensors); the tensors are read back by entries.py, the tokenizer by tokenizer.py. This module opens the file,
holds it for the run, and says what the content hash covers (`stored_tensor_bytes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bitnet_convert.fileio import integrity
from bitnet_convert.fileio.sources import SourceWatch
from bitnet_convert.formats.gguf import architectures as gguf_architectures, tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf.header import MAGIC, STRING, GGUFHeader, TensorInfo, typed_value
from bitnet_convert.formats.gguf.types import KEY_PROVENANCE
from bitnet_core import validate
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.errors import ConvertError

def detect(path: Path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".gguf" and path.exists():  # a FIFO named m.gguf is refused by the reader, by name
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


NAME = "gguf"


def open_gguf(path, watch: SourceWatch | None = None) -> GGUFHeader:
    """The parsed header (header.py: bounded, lazy), through a descriptor held by `watch` (or its own)."""
    path = Path(path)
    return GGUFHeader((watch or SourceWatch()).hold(path), path)


def stored_nbytes(t: TensorInfo) -> int:
    return t.stored_nbytes


def raw_bytes(reader: GGUFHeader, t: TensorInfo) -> np.ndarray:
    """A tensor's stored bytes as a view of the mapped file (inspection)."""
    return reader.data[t.data_offset : t.data_offset + stored_nbytes(t)]


def field_reader(reader: GGUFHeader) -> Callable[[str], object]:
    """key -> its value (None when absent); strings that are not UTF-8 are refused naming the key."""
    return reader.value


# The content hash's one config document: the key/values as stored (the tokenizer's among them).
KEY_VALUES_DOCUMENT = "key/values"
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # gguf-py's fields for the file header


def stored_tensor_bytes(path) -> integrity.StoredModel:
    """What the content hash covers: every tensor as stored (GGML type, dims ne0 first, bytes incl. I2_S tails,
    no alignment padding) in file order, and the key/values (`stored_key_values`)."""
    reader = open_gguf(path)

    def tensors() -> Iterator[integrity.TensorBytes]:
        for t in sorted(reader.tensors, key=lambda t: t.data_offset):
            dims = tuple(int(d) for d in t.shape)
            yield integrity.TensorBytes(t.name, t.tensor_type.name, dims, memoryview(raw_bytes(reader, t)).cast("B"))

    return integrity.StoredModel(tensors, {KEY_VALUES_DOCUMENT: stored_key_values(reader)}, {})


def stored_key_values(reader: GGUFHeader) -> bytes:
    """Every key/value entry exactly as stored (key, type, value), in file order, but the provenance key (it
    holds the hash). Our writer stores provenance last, so this is the key/value section up to it."""
    entries = []
    for field in reader.fields.values():
        if field.name in _HEADER_FIELDS or field.name == KEY_PROVENANCE:
            continue
        size = sum(int(part.nbytes) for part in field.parts)
        entries.append(reader.data[field.offset : field.offset + size].tobytes())
    return b"".join(entries)


def recorded_provenance(path) -> dict | None:
    return recorded(field_reader(open_gguf(path)), path)


def recorded(field, path) -> dict | None:
    value = field(KEY_PROVENANCE)
    if value is None:
        return None
    try:
        record = json.loads(value)
    except json.JSONDecodeError:
        raise ConvertError(f"{path}: {KEY_PROVENANCE} is not valid JSON") from None
    return record if isinstance(record, dict) else None



def read(path: str, *, revision: str | None = None) -> Checkpoint:
    del revision  # a local file has none
    path = Path(path)
    watch = SourceWatch()  # the file, held open for the whole run and checked again after each tensor load
    reader = open_gguf(path, watch)
    field = field_reader(reader)
    arch = typed_value(reader, "general.architecture", frozenset((STRING,)), "a string")
    plugin = gguf_architectures.reading(arch)
    if plugin is None:
        raise ConvertError(f"{path}: architecture {arch!r} is not BitNet (expected one of "
                           f"{', '.join(gguf_architectures.BY_NAME)})")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ConvertError(f"{path}: no token_embd.weight tensor")
    config = plugin.config(reader, arch, by_name)
    vocab = gguf_tokenizer.vocab_from_fields(field, str(path), n_vocab=config["vocab_size"])
    entries = watch.guard(plugin.tensors(reader, arch, config, by_name, path))
    tokenizer_files = {}
    if vocab is not None:
        tokenizer_files = gguf_tokenizer.tokenizer_files(vocab, config["max_position_embeddings"], str(path))
    tokenizer_files.update(plugin.side_files(reader, arch, config))
    provenance = integrity.reader_provenance(NAME, path, recorded(field, path), source=str(path.resolve()),
                                             architecture=arch)
    ckpt = Checkpoint(config, entries, tokenizer_files, provenance)
    validate.check_tensors(ckpt, str(path))
    return ckpt
