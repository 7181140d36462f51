"""The GGUF architectures we write and read, as plug-ins: each family of `general.architecture` values is one
module with the same hooks for both directions, so that adding an architecture means adding a module here, not
learning the writer or the reader.

Writing (writer.plan calls them in this order, on the plug-in whose `writes(cfg)` is true):
    model(ckpt, cfg, where, target=, outtype=, embed_type=) -> GGUFModel
                                                the graph the target runs the model as (what it computes), the
                                                stored types and the tokenizer, from the writer options
    plan(ckpt, model, where) -> [StoredTensor]  every stored tensor in file order, with its producer
    model_keys(writer, model)                   the architecture's own keys, after the model keys all share
Reading (reader.read calls them in this order, on the plug-in of the file's general.architecture, one of NAMES):
    config(reader, arch, by_name) -> dict       config.json from the file's keys
    tensors(reader, arch, config, by_name, path) -> {name: TensorEntry}
                                                the checkpoint's tensors, in model order
    side_files(reader, arch, config) -> {name: bytes}
                                                files beside the tokenizer's (an embedding model's pooling)

The plug-ins: causal_lm (2B4T, the 1bitLLM models, the Llama-family BitNets) and embedding (the BitNet-embedding
encoders on Qwen3 and Gemma3 backbones).
"""

from __future__ import annotations

from types import ModuleType

from bitnet_convert.formats.gguf import causal_lm, embedding
from bitnet_core.config import ModelConfig

PLUGINS: tuple[ModuleType, ...] = (causal_lm, embedding)
BY_NAME: dict[str, ModuleType] = {name: plugin for plugin in PLUGINS for name in plugin.NAMES}


def writing(cfg: ModelConfig) -> ModuleType:
    """The plug-in that writes the model of `cfg`."""
    return next(plugin for plugin in PLUGINS if plugin.writes(cfg))


def reading(arch: str) -> ModuleType | None:
    """The plug-in that reads files of `general.architecture` ARCH (None: not a BitNet we know)."""
    return BY_NAME.get(arch)
