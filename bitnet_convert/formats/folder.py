"""What both folder formats (hf, flax) write around their safetensors: config, tokenizer files, provenance."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import integrity
from ..checkpoint import TensorEntry, Ternary
from ..errors import ConvertError
from ..progress import progress_bar
from ..safetensors_io import TensorSpec

CONFIG_FILE = "config.json"


@contextlib.contextmanager
def hashing_progress(specs: Sequence[TensorSpec], out: str | Path, quiet: bool) -> Iterator[tuple]:
    """(hasher, on_written) for safetensors_io's writers: hash each tensor's stored bytes, advance the bar."""
    with contextlib.closing(integrity.TensorHasher(background=True)) as hasher, \
            progress_bar(sum(s.nbytes for s in specs), f"writing {Path(out).name}", quiet) as bar:

        def on_written(spec: TensorSpec, raw: memoryview) -> None:
            hasher.add(spec.name, raw)
            bar.update(raw.nbytes)

        yield hasher, on_written


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, bitnet_convert.json), or one error line naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return value


def recorded_provenance(folder) -> dict | None:
    """What our writer recorded in a folder; None for folders bitnet-convert did not write."""
    record = Path(folder) / integrity.PROVENANCE_FILE
    return read_json_object(record) if record.is_file() else None


def write_side_files(folder: Path, config: Mapping, tokenizer_files: Mapping[str, bytes], record: Mapping,
                     *, reserved: Sequence[str], where: str) -> None:
    """config.json, the tokenizer files verbatim, and the provenance record into `folder`.

    A tokenizer file name is a plain file name: no path, no hidden file, none of the format's own files
    (`reserved`), so a crafted checkpoint cannot write outside the output or replace its tensors."""
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n")
    for name, data in tokenizer_files.items():
        if Path(name).name != name or name.startswith(".") or name in (*reserved, CONFIG_FILE, integrity.PROVENANCE_FILE):
            raise ConvertError(f"{where}: refusing to write tokenizer file {name!r}")
        (folder / name).write_bytes(data)
    (folder / integrity.PROVENANCE_FILE).write_text(json.dumps(dict(record), indent=2) + "\n")


def dense_producer(entry: TensorEntry, where: str) -> Callable[[], np.ndarray]:
    """A safetensors_io producer for a plain tensor (norm, embedding, master weight), as stored."""

    def produce() -> np.ndarray:
        value = entry.load()
        if isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name}: expected a plain array, loaded ternary codes")
        return np.asarray(value)

    return produce
