"""Format facts of our GGUF files as data: tensor types, targets (llama.cpp / bitnet.cpp), metadata keys.

This module is also the ONE place where gguf-py learns bitnet.cpp's I2_S type (id 36). gguf-py's
`GGMLQuantizationType` is a closed IntEnum and its reader calls `GGMLQuantizationType(raw_type)` on every
tensor, so an unknown id makes it refuse the whole file. We add I2_S as a real member (the way `aenum`'s
`extend_enum` does) and give it a block size in `GGML_QUANT_SIZES`, so `GGUFWriter.add_tensor_info(...,
raw_dtype=I2_S)` and `GGUFReader` both accept it. The block entry (128 values -> 32 bytes) describes the packed
codes only; the 32-byte tail of each I2_S tensor (its float32 multiplier) is outside gguf-py's block arithmetic,
so our writer passes the true byte count and our reader reads the tail itself (gguf-py's `ReaderTensor.n_bytes`
and `.data` stop 32 bytes short for I2_S). Id 36 is unused by mainline ggml as of gguf-py 0.19; if gguf-py
ever assigns it, the registration refuses to run rather than shadow the real type. gguf-py has no public way to
add a type: the enum's internals used here are why pyproject.toml pins the release series the suite has run on.
"""

from __future__ import annotations

import dataclasses

from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
    LlamaFileType,
)

from bitnet_convert.formats.options import COUNT, FLAG, SIZE, WriterOption
from bitnet_core.codecs import i2s


def _register_i2s() -> GGMLQuantizationType:
    existing = GGMLQuantizationType._value2member_map_.get(i2s.GGML_TYPE)
    if existing is not None:
        if existing.name != "I2_S":
            raise ImportError(f"gguf-py now defines type {i2s.GGML_TYPE} as {existing.name}; I2_S needs a new home")
        return existing
    member = int.__new__(GGMLQuantizationType, i2s.GGML_TYPE)
    member._name_ = "I2_S"
    member._value_ = i2s.GGML_TYPE
    GGMLQuantizationType._value2member_map_[i2s.GGML_TYPE] = member
    GGMLQuantizationType._member_map_["I2_S"] = member
    GGMLQuantizationType._member_names_.append("I2_S")
    type.__setattr__(GGMLQuantizationType, "I2_S", member)
    GGML_QUANT_SIZES[member] = (i2s.BLOCK_VALUES, i2s.BLOCK_BYTES)
    return member


I2_S = _register_i2s()
GGMLType = GGMLQuantizationType  # gguf-py's tensor types, I2_S among them


@dataclasses.dataclass(frozen=True)
class OutType:
    """How projections are stored for one `outtype`."""

    ggml_type: GGMLQuantizationType
    file_type: int  # general.file_type (llama_ftype)
    targets: tuple[str, ...]  # runtimes that can load it


# outtype -> storage of the ternary projections. Where the architecture's graph applies `.scale` tensors, float
# outtypes store the *codes* (exact in every float type) with the `.scale` tensor; where it does not (bitnet.cpp's
# graphs, Graph.scale_tensors), they store codes x multiplier (exact in F32; F16/BF16 round the multiplier, a
# declared cast). Never weight / weight_scale: bitnet.cpp's own converter does that on its float path
# (docs/formats.md §7).
OUTTYPES: dict[str, OutType] = {
    "tq1_0": OutType(GGMLType.TQ1_0, LlamaFileType.MOSTLY_TQ1_0, ("llama.cpp",)),
    "tq2_0": OutType(GGMLType.TQ2_0, LlamaFileType.MOSTLY_TQ2_0, ("llama.cpp",)),
    "i2_s": OutType(I2_S, i2s.FILE_TYPE, ("bitnet.cpp",)),
    "f16": OutType(GGMLType.F16, LlamaFileType.MOSTLY_F16, ("llama.cpp", "bitnet.cpp")),
    "bf16": OutType(GGMLType.BF16, LlamaFileType.MOSTLY_BF16, ("llama.cpp", "bitnet.cpp")),
    "f32": OutType(GGMLType.F32, LlamaFileType.ALL_F32, ("llama.cpp", "bitnet.cpp")),
}
# The float type a projection falls back to when its rows do not fit the outtype's blocks (TQ: 256 values), by
# Graph.scale_tensors: codes in F16 are exact; codes x m need F32.
FALLBACK_FLOAT = {True: GGMLType.F16, False: GGMLType.F32}
FLOAT_ROUNDING = {GGMLType.F16: "f16", GGMLType.BF16: "bf16"}  # a multiplier stored in a float value rounds to this

# embed_type -> GGML type of token_embd.weight (and output.weight of an untied head).
EMBED_TYPES: dict[str, GGMLQuantizationType] = {
    "f16": GGMLType.F16, "bf16": GGMLType.BF16, "f32": GGMLType.F32, "q8_0": GGMLType.Q8_0,
}


@dataclasses.dataclass(frozen=True)
class Graph:
    """What one runtime's graph for one `general.architecture` computes and loads (docs/formats.md §6)."""

    architecture: str  # general.architecture; also the prefix of the model keys
    sub_norms: bool  # attn_sub_norm / ffn_sub_norm before o_proj / down_proj
    activation: str  # what the graph computes in the FFN, whatever the model says
    scale_tensors: bool  # applies blk.N.<proj>.scale; else the loader refuses them
    output_tensor: bool  # loads output.weight (an untied head); else the head is token_embd
    vocab_and_rope_dims: bool  # writes `{arch}.vocab_size` and `{arch}.rope.dimension_count`
    interleaved_rope: bool = False  # rotates adjacent pairs: q/k rows reordered (rope.py)


@dataclasses.dataclass(frozen=True)
class Target:
    default_outtype: str
    default_embed_type: str
    graphs: tuple[Graph, ...]  # the BitNet architectures this runtime runs, preferred first


# llama.cpp (as vendored by llama-cpp-python 0.3.36) loads `.scale` tensors for every architecture; its `bitnet`
# graph computes SiLU and ties the head. bitnet.cpp runs 2B4T as `bitnet-b1.58` (relu2), the 1bitLLM models as
# `bitnet` (SiLU) and the Llama-family BitNets (Falcon3, Falcon-E, Llama3-8B-1.58) as `llama`; its loaders know
# no `.scale` tensors (the I2_S tail holds the multiplier).
TARGETS: dict[str, Target] = {
    "llama.cpp": Target("tq2_0", "f16", (
        Graph("bitnet", sub_norms=True, activation="silu", scale_tensors=True, output_tensor=False,
              vocab_and_rope_dims=False),
        Graph("llama", sub_norms=False, activation="silu", scale_tensors=True, output_tensor=True,
              vocab_and_rope_dims=True, interleaved_rope=True),
    )),
    "bitnet.cpp": Target("i2_s", "f16", (
        Graph("bitnet-b1.58", sub_norms=True, activation="relu2", scale_tensors=False, output_tensor=False,
              vocab_and_rope_dims=True),
        Graph("bitnet", sub_norms=True, activation="silu", scale_tensors=False, output_tensor=False,
              vocab_and_rope_dims=True),
        Graph("llama", sub_norms=False, activation="silu", scale_tensors=False, output_tensor=True,
              vocab_and_rope_dims=True, interleaved_rope=True),
    )),
}
DEFAULT_TARGET = "llama.cpp"


def graph_for(target: str, sub_norms: bool, hidden_act: str) -> Graph:
    """The graph `target` runs a model under: the one with its norms and activation, else the one with its norms
    (the writer warns that the runtime computes another activation there)."""
    fitting = [g for g in TARGETS[target].graphs if g.sub_norms == sub_norms]
    return next((g for g in fitting if g.activation == hidden_act), fitting[0])


WRITER_OPTIONS = {
    "target": WriterOption(tuple(TARGETS), None, f"runtime the file is for (default: {DEFAULT_TARGET}; "
                           "bitnet.cpp for the embedding models)"),
    "outtype": WriterOption(tuple(OUTTYPES), None, "projection type (default: " + ", ".join(
        f"{t.default_outtype} for {name}" for name, t in TARGETS.items()) + ")"),
    "embed_type": WriterOption(tuple(EMBED_TYPES), None, "token embedding type (default: " + ", ".join(
        f"{t.default_embed_type} for {name}" for name, t in TARGETS.items()) + ")"),
    "vocab_only": WriterOption((), None, "only the tokenizer and the hyperparameters, no tensors (as llama.cpp's "
                               "converter writes it)", kind=FLAG),
    "split_max_size": WriterOption((), None, "split into files of at most this much tensor data (500M, 2G: "
                                   "powers of 1000), named OUT-00001-of-0000N.gguf as llama.cpp loads them",
                                   kind=SIZE),
    "split_max_tensors": WriterOption((), None, "split into files of at most this many tensors", kind=COUNT),
}


# Model hyper-parameters: config.json field <- gguf-py's key template ("{arch}.context_length") and GGUF value
# type: u32 counts, f32 reals.
U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
MODEL_KEYS: dict[str, tuple[str, GGUFValueType]] = {
    "max_position_embeddings": (Keys.LLM.CONTEXT_LENGTH, U32),
    "hidden_size": (Keys.LLM.EMBEDDING_LENGTH, U32),
    "num_hidden_layers": (Keys.LLM.BLOCK_COUNT, U32),
    "intermediate_size": (Keys.LLM.FEED_FORWARD_LENGTH, U32),
    "num_attention_heads": (Keys.Attention.HEAD_COUNT, U32),
    "num_key_value_heads": (Keys.Attention.HEAD_COUNT_KV, U32),
    "rms_norm_eps": (Keys.Attention.LAYERNORM_RMS_EPS, F32),
    "rope_theta": (Keys.Rope.FREQ_BASE, F32),
}
# Written where Graph.vocab_and_rope_dims, and where head_dim is not hidden / heads.
VOCAB_SIZE, ROPE_DIMENSIONS = Keys.LLM.VOCAB_SIZE, Keys.Rope.DIMENSION_COUNT
KEY_LENGTH, VALUE_LENGTH = Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH

# Our own keys (ignored by both runtimes).
KEY_PROVENANCE = "bitnet_convert.provenance"  # JSON: integrity.provenance_record(...)
KEY_HIDDEN_ACT = "bitnet_convert.hidden_act"  # the checkpoint's activation; llama.cpp's graph ignores it
KEY_MULTIPLIER_SOURCE = "bitnet_convert.multiplier"  # "tq_block_d" | "scale_tensor" | "i2_s_tail" | "in_values"
# llama.cpp's split layout (its model loader and gguf-split): every file holds these three, the first one also
# every other key; files are named PREFIX-00001-of-0000N.gguf, and a runtime opens the first.
KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_NAME = "{prefix}-{number:05d}-of-{count:05d}.gguf"
SCALE_SUFFIX = ".scale"  # blk.N.attn_q.scale: F32 [1], applied as out * scale
