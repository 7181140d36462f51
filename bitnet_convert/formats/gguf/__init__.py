"""GGUF, for llama.cpp and bitnet.cpp: the format module (what registry.FORMATS names).

The package, by job:
- writer.py and reader.py: Checkpoint -> GGUF file(s) and back; each asks the model's or the file's architecture
  plug-in (architectures.py: causal_lm.py, embedding.py) what differs between architectures: the runtime's
  graph, the tensors, the keys; stored.py (tensors as stored, with their producers) and entries.py (tensors
  read back) are the tensor halves both plug-ins use;
- types.py: format facts as tables (tensor types, outtypes, targets and their graphs, keys) and gguf-py's I2_S;
- header.py (the container, parsed by us), bulk.py (gguf-py's writer, arrays packed in bulk), tokenizer.py
  (tokenizer files <-> tokenizer.ggml.* keys), tq.py (TQ1_0 / TQ2_0 blocks), rope.py (llama's q/k row order).
"""

from __future__ import annotations

from bitnet_convert.formats.gguf.reader import (
    detect,
    files,
    read,
    recorded_provenance,
    stored_tensor_bytes,
    tensor_types,
)
from bitnet_convert.formats.gguf.types import (
    EMBED_TYPES,
    OUTTYPES,
    TARGETS,
    WRITER_OPTIONS,
)
from bitnet_convert.formats.gguf.writer import NAME, plan, write

__all__ = [
    "NAME", "detect", "files", "read", "plan", "write", "stored_tensor_bytes", "recorded_provenance", "tensor_types", "OUTTYPES", "TARGETS",
    "EMBED_TYPES", "WRITER_OPTIONS",
]
