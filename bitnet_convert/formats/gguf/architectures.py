"""The GGUF architectures we read and write, as plug-ins: each family of `general.architecture` values is one
module with the same hooks, so that adding an architecture means adding a module here, not learning the reader.

Reading (gguf_read.read calls them in this order, for the file's general.architecture):
    config(reader, arch, by_name) -> dict               config.json from the file's keys
    tensors(reader, arch, config, by_name, path) -> {}  the checkpoint's tensors (entries), in model order
    side_files(reader, arch, config) -> {}              files beside the tokenizer's (an embedding's pooling)

The plug-ins: gguf_causal_lm (2B4T, the 1bitLLM models, the Llama-family BitNets) and gguf_embedding (the
BitNet-embedding encoders, Qwen3 and Gemma3 backbones).
"""

from __future__ import annotations

from types import ModuleType

from bitnet_convert.formats.gguf import causal_lm as gguf_causal_lm, embedding as gguf_embedding

PLUGINS: tuple[ModuleType, ...] = (gguf_causal_lm, gguf_embedding)
BY_NAME: dict[str, ModuleType] = {name: plugin for plugin in PLUGINS for name in plugin.NAMES}


def reading(arch: str) -> ModuleType | None:
    """The plug-in that reads files of `general.architecture` ARCH (None: not a BitNet we know)."""
    return BY_NAME.get(arch)
