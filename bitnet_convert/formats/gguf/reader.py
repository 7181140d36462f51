"""GGUF -> Checkpoint: files written by us, by llama.cpp's converter and by bitnet.cpp's.

The file's `general.architecture` picks its plug-in (architectures.py: the model's config from the keys and its
tensors); the tensors are read back by entries.py, the tokenizer by tokenizer.py. This module opens the file,
holds it for the run, and says what the content hash covers (`stored_tensor_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bitnet_convert.fileio import integrity
from bitnet_convert.fileio.sources import SourceWatch, parse_json, shown
from bitnet_convert.formats.gguf import architectures as gguf_architectures, tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf.header import (
    INTEGER_TYPES,
    MAGIC,
    STRING,
    GGUFHeader,
    GGUFSet,
    TensorInfo,
    typed_value,
)
from bitnet_convert.formats.gguf.types import (
    KEY_PROVENANCE,
    KEY_SPLIT_COUNT,
    KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS,
    SPLIT_NAME,
)
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


def open_gguf(path, watch: SourceWatch | None = None) -> GGUFSet:
    """The parsed header (header.py: bounded, lazy) through a descriptor held by `watch` (or its own); for
    the first file of a split set, the headers of every file, read as one."""
    path = Path(path)
    watch = watch or SourceWatch()
    first = GGUFHeader(watch.hold(path), path)
    count = typed_value(first, KEY_SPLIT_COUNT, INTEGER_TYPES, "an integer (u16)")
    if count is None or count <= 1:
        return GGUFSet([first])
    number = typed_value(first, KEY_SPLIT_NO, INTEGER_TYPES, "an integer (u16)")
    paths = _split_paths(path, number, count)
    if number != 0:
        raise ConvertError(f"{path}: file {number + 1} of a split GGUF of {count} files; open the first, "
                           f"{paths[0].name}")
    headers = [first]
    for expected, part in enumerate(paths[1:], start=1):
        if not part.is_file():
            raise ConvertError(f"{part}: missing (file {expected + 1} of the {count} files of {path.name})")
        header = GGUFHeader(watch.hold(part), part)
        found = [typed_value(header, key, INTEGER_TYPES, "an integer") for key in (KEY_SPLIT_NO, KEY_SPLIT_COUNT)]
        if found != [expected, count]:
            raise ConvertError(f"{part}: says it is file {found[0]} of {found[1]}, expected {expected} of {count} "
                               f"(files of another split set?)")
        headers.append(header)
    return GGUFSet(headers, typed_value(first, KEY_SPLIT_TENSORS, INTEGER_TYPES, "an integer (i32)"))


def _split_paths(path: Path, number, count: int) -> list[Path]:
    """The files of the split set `path` is file `number` (from 0) of: PREFIX-0000i-of-0000N.gguf."""
    if not isinstance(number, int) or not 0 <= number < count:
        raise ConvertError(f"{path}: {KEY_SPLIT_NO} is {number!r}, not a file of {count}")
    suffix = f"-{number + 1:05d}-of-{count:05d}.gguf"
    if not path.name.endswith(suffix) or len(path.name) == len(suffix):
        raise ConvertError(f"{path}: file {number + 1} of a split GGUF of {count} files, but not named "
                           f"PREFIX{suffix} (llama.cpp finds the other files by these names)")
    prefix = path.name[: -len(suffix)]
    return [path.with_name(SPLIT_NAME.format(prefix=prefix, number=i, count=count)) for i in range(1, count + 1)]



def stored_nbytes(t: TensorInfo) -> int:
    return t.stored_nbytes


def raw_bytes(reader: GGUFSet, t: TensorInfo) -> np.ndarray:
    """A tensor's stored bytes as a view of the mapped file that holds it (inspection)."""
    return (t.header or reader).data[t.data_offset : t.data_offset + stored_nbytes(t)]


def field_reader(reader: GGUFSet) -> Callable[[str], object]:
    """key -> its value (None when absent); strings that are not UTF-8 are refused naming the key."""
    return reader.value


# The content hash's one config document: the key/values as stored (the tokenizer's among them).
KEY_VALUES_DOCUMENT = "key/values"
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # gguf-py's fields for the file header


def stored_tensor_bytes(path) -> integrity.StoredModel:
    """What the content hash covers: every tensor as stored (GGML type, dims ne0 first, bytes incl. I2_S tails,
    no alignment padding) in file order, and the key/values (`stored_key_values`)."""
    reader = open_gguf(path)

    def tensors() -> Iterator[integrity.TensorBytes]:  # file by file, each in data order
        for t in sorted(reader.tensors, key=lambda t: (reader.headers.index(t.header), t.data_offset)):
            dims = tuple(int(d) for d in t.shape)
            yield integrity.TensorBytes(t.name, t.tensor_type.name, dims, memoryview(raw_bytes(reader, t)).cast("B"))

    return integrity.StoredModel(tensors, {KEY_VALUES_DOCUMENT: stored_key_values(reader)}, {})


def stored_key_values(reader: GGUFSet) -> bytes:
    """Every key/value entry exactly as stored (key, type, value), in file order, but the provenance key (it
    holds the hash). Our writer stores provenance last, so this is the key/value section up to it."""
    entries = []
    for field in reader.fields.values():
        if field.name in _HEADER_FIELDS or field.name == KEY_PROVENANCE:
            continue
        size = sum(int(part.nbytes) for part in field.parts)
        entries.append(reader.data[field.offset : field.offset + size].tobytes())
    return b"".join(entries)


def files(path) -> list[Path]:
    """The file, or every file of the split set whose first file it is."""
    return open_gguf(path).files


def tensor_types(path) -> dict[str, str]:
    """Tensor name -> its GGML type's name ("I2_S", "F16", "Q8_0" ...), in file order."""
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


def recorded_provenance(path) -> dict | None:
    """What our writer recorded (in the first file of a split set: a later file answers for its set, so that
    --force recognizes it as ours)."""
    first = GGUFHeader(SourceWatch().hold(Path(path)), Path(path))
    number = typed_value(first, KEY_SPLIT_NO, INTEGER_TYPES, "an integer (u16)")
    count = typed_value(first, KEY_SPLIT_COUNT, INTEGER_TYPES, "an integer (u16)")
    if number and count and count > 1:
        first_path = _split_paths(Path(path), number, count)[0]
        return recorded_provenance(first_path) if first_path.is_file() else None
    return recorded(field_reader(first), path)



def recorded(field, path) -> dict | None:
    value = field(KEY_PROVENANCE)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConvertError(f"{shown(path)}: key {KEY_PROVENANCE} is {type(value).__name__}, expected a JSON string")
    record = parse_json(value.encode(), shown(path), f"key {KEY_PROVENANCE}", non_finite=True)
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
    if reader.tensors and "token_embd.weight" not in by_name:
        raise ConvertError(f"{path}: no token_embd.weight tensor")
    config = plugin.config(reader, arch, by_name)
    vocab = gguf_tokenizer.vocab_from_fields(field, str(path), n_vocab=config["vocab_size"])
    entries = watch.guard(plugin.tensors(reader, arch, config, by_name, path))
    tokenizer_files = {}
    if vocab is not None:
        tokenizer_files = gguf_tokenizer.tokenizer_files(vocab, config["max_position_embeddings"], str(path))
    tokenizer_files.update(plugin.side_files(reader, arch, config))
    provenance = integrity.reader_provenance(NAME, path, recorded(field, path), source=str(path.resolve()),
                                             architecture=arch, **vocab_only_mark(reader))
    return checked(Checkpoint(config, entries, tokenizer_files, provenance), path)


def vocab_only_mark(reader: GGUFSet) -> dict:
    """What a reader's provenance says of a file with no tensors: llama.cpp's --vocab-only, a tokenizer."""
    return {} if reader.tensors else {"vocab_only": True}


def checked(ckpt: Checkpoint, path: Path) -> Checkpoint:
    """A model whose tensors are all there and fit its config; or a vocab-only file, read as its tokenizer and
    hyperparameters (a Checkpoint without tensors, `provenance["vocab_only"]`), which must hold a tokenizer."""
    if not ckpt.provenance.get("vocab_only"):
        validate.check_tensors(ckpt, str(path))
    elif not ckpt.tokenizer_files:
        raise ConvertError(f"{path}: no tensors and no tokenizer keys: neither a model nor a vocabulary")
    else:
        validate.model_config(ckpt.config, str(path))
    return ckpt
