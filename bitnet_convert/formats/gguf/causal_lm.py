"""The causal language models as GGUF architectures: 2B4T (`bitnet-b1.58`, bitnet.cpp's earlier `bitnet-25`,
llama.cpp's `bitnet`), the 1bitLLM models (bitnet.cpp's `bitnet`) and the Llama-family BitNets (`llama`: Falcon3,
Falcon-E, Llama3-8B-1.58), in the graphs llama.cpp and bitnet.cpp run them with (gguf_types.TARGETS).

One plug-in of gguf_architectures: its hooks write a model under the graph its target runs it as, and read the
files of these architectures, ours and the runtimes' converters', back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bitnet_convert.formats.gguf import entries as entries
from bitnet_convert.formats.gguf import rope as gguf_rope
from bitnet_convert.formats.gguf.entries import model_key
from bitnet_convert.formats.gguf.header import STRING, GGUFHeader, TensorInfo, typed_value
from bitnet_convert.formats.gguf.types import (
    KEY_HIDDEN_ACT,
    KEY_LENGTH,
    MODEL_KEYS,
    ROPE_DIMENSIONS,
    SCALE_SUFFIX,
    U32,
)
from bitnet_core import validate
from bitnet_core.checkpoint import TensorEntry
from bitnet_core.errors import ConvertError
from bitnet_core.names import expected_tensors, gguf_to_hf, is_projection


@dataclasses.dataclass(frozen=True)
class ReadArchitecture:
    """A general.architecture we read: the model it holds when our own keys are absent."""

    sub_norms: bool
    hidden_act: str
    hf_architecture: str  # config.json's class: one transformers runs (BitNet for sub-norm models)
    interleaved_rope: bool = False  # q/k rows stored in llama.cpp's interleaved order (rope.py)


# "bitnet" is llama.cpp's name (2B4T converted by its converter, relu2 although its graph computes SiLU) and
# bitnet.cpp's for the 1bitLLM models (SiLU); the tokenizer tells them apart (SENTENCEPIECE_ACT). "bitnet-25" is
# bitnet.cpp's name for 2B4T before 2025-04-22.
ARCHITECTURES: dict[str, ReadArchitecture] = {
    "bitnet": ReadArchitecture(True, "relu2", "BitNetForCausalLM"),
    "bitnet-b1.58": ReadArchitecture(True, "relu2", "BitNetForCausalLM"),
    "bitnet-25": ReadArchitecture(True, "relu2", "BitNetForCausalLM"),
    "llama": ReadArchitecture(False, "silu", "LlamaForCausalLM", interleaved_rope=True),
}
SENTENCEPIECE_ACT = "silu"  # a `bitnet` file with a SentencePiece tokenizer (tokenizer.ggml.model "llama"): 1bitLLM
NAMES = tuple(ARCHITECTURES)  # the general.architecture values this plug-in reads


# ------------------------------------------------------------------------------------------------- reading


def config(reader: GGUFHeader, arch: str, by_name: dict[str, TensorInfo]) -> dict:
    """config.json from the model keys, each of the GGUF type it must have (its range is validate.model_config's
    to check): BitNetForCausalLM for the sub-norm graphs, LlamaForCausalLM (BitNet-quantized) for `llama`."""
    read_as = ARCHITECTURES[arch]
    config: dict = {"architectures": [read_as.hf_architecture],
                    "model_type": "bitnet" if read_as.sub_norms else "llama"}
    for hf_key, (template, vtype) in MODEL_KEYS.items():
        key = template.format(arch=arch)
        value = model_key(reader, key, vtype)
        if value is None:
            if hf_key == "num_key_value_heads":
                continue
            raise ConvertError(f"{reader.path}: missing key {key}")
        config[hf_key] = value
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    head_dim = model_key(reader, ROPE_DIMENSIONS.format(arch=arch), U32) or \
        model_key(reader, KEY_LENGTH.format(arch=arch), U32)
    if head_dim or config["num_attention_heads"] > 0:  # else validation names the head count
        config["head_dim"] = head_dim or config["hidden_size"] // config["num_attention_heads"]
    config["vocab_size"] = int(by_name["token_embd.weight"].shape[-1])  # dims are listed ne0 first
    config["hidden_act"] = typed_value(reader, KEY_HIDDEN_ACT, frozenset((STRING,)), "a string") or \
        default_activation(reader, read_as)
    config["tie_word_embeddings"] = "output.weight" not in by_name
    for hf_key, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = model_key(reader, key, U32)
        if value is not None:
            config[hf_key] = value
    config.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0, torch_dtype="bfloat16")
    return config


def default_activation(reader: GGUFHeader, read_as) -> str:
    """The activation of a file without our key: the architecture's, but a `bitnet` file with a SentencePiece
    vocabulary is one of bitnet.cpp's 1bitLLM conversions (SiLU), not 2B4T (Llama-3 BPE, relu2)."""
    model = typed_value(reader, "tokenizer.ggml.model", frozenset((STRING,)), "a string")
    return SENTENCEPIECE_ACT if read_as.sub_norms and model == "llama" else read_as.hidden_act


def tensors(reader: GGUFHeader, arch: str, config: dict, by_name: dict[str, TensorInfo],
            path: Path) -> dict[str, TensorEntry]:
    """The checkpoint's tensors in model order (extras last): `.scale` tensors multiply into their projection."""
    found: dict[str, TensorEntry] = {}
    for t in reader.tensors:
        if t.name.endswith(SCALE_SUFFIX):
            continue
        try:
            hf_name = gguf_to_hf(t.name)
        except KeyError:
            raise ConvertError(f"{path}: unexpected tensor {t.name}") from None
        scale = by_name.get(t.name.removesuffix(".weight") + SCALE_SUFFIX)
        if is_projection(hf_name):
            heads = gguf_rope.heads_of(hf_name, config) if ARCHITECTURES[arch].interleaved_rope else None
            found[hf_name] = entries.projection(reader, t, scale, hf_name, path, heads)
        else:
            found[hf_name] = entries.dense(reader, t, hf_name, path)
    order = expected_tensors(validate.model_config(config, str(path)))
    return {n: found[n] for n in order if n in found} | found


def side_files(reader: GGUFHeader, arch: str, config: dict) -> dict[str, bytes]:
    return {}  # the tokenizer's files only
