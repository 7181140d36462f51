"""The general.* keys of a GGUF as llama.cpp's own converter writes them: general.type, the name and what
gguf-py's heuristics take from it and from the model card (basename, size label, version, license, base
models, tags, languages ...), and the size label from the parameter count.

They come from gguf-py's own `Metadata` (the converter's), fed what the converter feeds it: the model card's
front matter (formats/model_card.py reads it, without YAML), config.json (its `_name_or_path`) and the
source's name (the folder's, or the hub repo's). What the converter takes from generation_config.json (the
general.sampling.* keys) is not written: docs/formats.md §6.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
from gguf import GGUFType, Metadata
from gguf.utility import size_label

from bitnet_convert.formats.gguf.types import SCALE_SUFFIX
from bitnet_core.names import expected_tensors


def add_to(writer, provenance: dict, config: dict, fallback_name: str, total: int) -> None:
    """general.type and the model card's keys; `total`: the model's parameter count (parameter_count), which
    the size label says."""
    source = str(provenance.get("source") or "").rstrip("/")
    folder = PurePosixPath(source.replace("\\", "/")) if source else None  # a folder path or a hub repo id
    card = provenance.get("model_card") or {}
    metadata = Metadata.apply_metadata_heuristic(Metadata(), dict(card), config, folder, total)
    if metadata.name is None:
        metadata.name = folder.name if folder is not None and folder.name else fallback_name
    if metadata.size_label is None and total > 0:
        metadata.size_label = size_label(total, total, 0, 0)
    writer.add_type(GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)


def parameter_count(tensors, cfg) -> int:
    """The values of every planned tensor (`.name`, `.shape`) of the model, in every file of a split set, but our
    `.scale` tensors (llama.cpp's converter writes none); a vocab-only file, which plans none, counts the
    tensors the config says the model has (its size label is the full file's)."""
    if not tensors:
        return sum(int(np.prod(shape)) for shape, _ in expected_tensors(cfg).values())
    return sum(int(np.prod(t.shape)) for t in tensors if not t.name.endswith(SCALE_SUFFIX))
