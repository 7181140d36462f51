"""Format facts of our GGUF files as data: tensor types, targets (llama.cpp / bitnet.cpp), metadata keys.

This module is also the ONE place where gguf-py learns bitnet.cpp's I2_S type (id 36). gguf-py's
`GGMLQuantizationType` is a closed IntEnum and its reader calls `GGMLQuantizationType(raw_type)` on every
tensor, so an unknown id makes it refuse the whole file. We add I2_S as a real member (the way `aenum`'s
`extend_enum` does) and give it a block size in `GGML_QUANT_SIZES`, so `GGUFWriter.add_tensor_info(...,
raw_dtype=I2_S)` and `GGUFReader` both accept it. The block entry (128 values -> 32 bytes) describes the packed
codes only; the 32-byte tail of each I2_S tensor (its float32 multiplier) is outside gguf-py's block arithmetic,
so our writer passes the true byte count and our reader reads the tail itself (gguf-py's `ReaderTensor.n_bytes`
and `.data` stop 32 bytes short for I2_S). Id 36 is unused by mainline ggml as of gguf-py 0.19; if gguf-py
ever assigns it, the registration refuses to run rather than shadow the real type.
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

from bitnet_convert.formats.options import WriterOption
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
T = GGMLQuantizationType


@dataclasses.dataclass(frozen=True)
class OutType:
    """How projections are stored for one `outtype`."""

    ggml_type: GGMLQuantizationType
    file_type: int  # general.file_type (llama_ftype)
    scale_tensor: bool  # multiplier as a separate F32 `.scale` tensor (else inside the I2_S tail)
    targets: tuple[str, ...]  # runtimes that can load it


# outtype -> storage of the ternary projections. Float outtypes store the *codes* (exact in every float
# type) with the `.scale` tensor, never codes*multiplier: that keeps them lossless, and it avoids the trap of
# bitnet.cpp's own converter, which divides by weight_scale on its F16/F32 path (docs/formats.md §7).
OUTTYPES: dict[str, OutType] = {
    "tq1_0": OutType(T.TQ1_0, LlamaFileType.MOSTLY_TQ1_0, True, ("llama.cpp",)),
    "tq2_0": OutType(T.TQ2_0, LlamaFileType.MOSTLY_TQ2_0, True, ("llama.cpp",)),
    "i2_s": OutType(I2_S, i2s.FILE_TYPE, False, ("bitnet.cpp",)),
    "f16": OutType(T.F16, LlamaFileType.MOSTLY_F16, True, ("llama.cpp", "bitnet.cpp")),
    "bf16": OutType(T.BF16, LlamaFileType.MOSTLY_BF16, True, ("llama.cpp", "bitnet.cpp")),
    "f32": OutType(T.F32, LlamaFileType.ALL_F32, True, ("llama.cpp", "bitnet.cpp")),
}

# embed_type -> GGML type of token_embd.weight (and output.weight if ever untied).
EMBED_TYPES: dict[str, GGMLQuantizationType] = {"f16": T.F16, "bf16": T.BF16, "f32": T.F32, "q8_0": T.Q8_0}


@dataclasses.dataclass(frozen=True)
class Target:
    architecture: str  # general.architecture; also the prefix of the model keys
    default_outtype: str
    default_embed_type: str
    vocab_and_rope_dims: bool  # writes `{arch}.vocab_size` and `{arch}.rope.dimension_count`


TARGETS: dict[str, Target] = {
    "llama.cpp": Target("bitnet", "tq2_0", "f16", False),
    "bitnet.cpp": Target("bitnet-b1.58", "i2_s", "f16", True),
}
DEFAULT_TARGET = "llama.cpp"

WRITER_OPTIONS = {
    "target": WriterOption(tuple(TARGETS), DEFAULT_TARGET, "runtime the file is for"),
    "outtype": WriterOption(tuple(OUTTYPES), None, "projection type (default: " + ", ".join(
        f"{t.default_outtype} for {name}" for name, t in TARGETS.items()) + ")"),
    "embed_type": WriterOption(tuple(EMBED_TYPES), None, "token embedding type (default: " + ", ".join(
        f"{t.default_embed_type} for {name}" for name, t in TARGETS.items()) + ")"),
}

# general.architecture values we read -> the activation their runtime computes when our own key is absent.
# "bitnet" is llama.cpp's (whose graph computes SiLU, but every model shipped under it is relu2: 2B4T);
# "bitnet-25" is bitnet.cpp's name for 2B4T before 2025-04-22.
ARCHITECTURES: dict[str, str] = {"bitnet": "relu2", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}

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
# Written for bitnet.cpp (Target.vocab_and_rope_dims), and where head_dim is not hidden / heads.
VOCAB_SIZE, ROPE_DIMENSIONS = Keys.LLM.VOCAB_SIZE, Keys.Rope.DIMENSION_COUNT
KEY_LENGTH, VALUE_LENGTH = Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH

# Our own keys (ignored by both runtimes).
KEY_PROVENANCE = "bitnet_convert.provenance"  # JSON: integrity.provenance_record(...)
KEY_HIDDEN_ACT = "bitnet_convert.hidden_act"  # the checkpoint's activation; llama.cpp's graph ignores it
KEY_MULTIPLIER_SOURCE = "bitnet_convert.multiplier"  # where multipliers live: "scale_tensor" | "i2_s_tail"
SCALE_SUFFIX = ".scale"  # blk.N.attn_q.scale: F32 [1], applied as out * scale
