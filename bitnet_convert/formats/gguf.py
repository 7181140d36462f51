"""GGUF, for llama.cpp (architecture `bitnet`) and bitnet.cpp (`bitnet-b1.58`): the format module.

The work is split by job: gguf_types (format facts as tables, and gguf-py's I2_S registration), gguf_write,
gguf_read and gguf_tokenizer (tokenizer.json <-> tokenizer.ggml.* keys).
"""

from __future__ import annotations

from bitnet_convert.formats.gguf_read import (
    detect,
    read,
    recorded_provenance,
    stored_tensor_bytes,
    tensor_types,
)
from bitnet_convert.formats.gguf_types import (
    EMBED_TYPES,
    OUTTYPES,
    TARGETS,
    WRITER_OPTIONS,
)
from bitnet_convert.formats.gguf_write import NAME, write

__all__ = [
    "NAME", "detect", "read", "write", "stored_tensor_bytes", "recorded_provenance", "tensor_types", "OUTTYPES",
    "TARGETS", "EMBED_TYPES", "WRITER_OPTIONS",
]
