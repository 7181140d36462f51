"""The causal language models as GGUF architectures: 2B4T (`bitnet-b1.58`, bitnet.cpp's earlier `bitnet-25`,
llama.cpp's `bitnet`), the 1bitLLM models (bitnet.cpp's `bitnet`) and the Llama-family BitNets (`llama`: Falcon3,
Falcon-E, Llama3-8B-1.58), in the graphs llama.cpp and bitnet.cpp run them with (types.TARGETS).

One plug-in of architectures.py: its hooks write a model under the graph its target runs it as, and read the
files of these architectures, ours and the runtimes' converters', back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

from bitnet_convert.formats.gguf import entries
from bitnet_convert.formats.gguf import rope as gguf_rope
from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf.entries import model_key, vocab_size
from bitnet_convert.formats.gguf.header import STRING, GGUFHeader, TensorInfo, typed_value
from bitnet_convert.formats.gguf.stored import GGUFModel, StoredTensor, float_tensor, projection
from bitnet_convert.formats.gguf.types import (
    GGMLType,
    DEFAULT_TARGET,
    EMBED_TYPES,
    KEY_HIDDEN_ACT,
    KEY_LENGTH,
    MODEL_KEYS,
    OUTTYPES,
    ROPE_DIMENSIONS,
    SCALE_SUFFIX,
    TARGETS,
    U32,
    Graph,
    OutType,
    graph_for,
)
from bitnet_core import validate
from bitnet_core.checkpoint import TERNARY, Checkpoint, TensorEntry, Ternary
from bitnet_core.config import ModelConfig
from bitnet_core.errors import ConvertError
from bitnet_core.names import expected_tensors, gguf_to_hf, hf_to_gguf, is_projection
from bitnet_core.quantize import as_ternary

log = logging.getLogger("bitnet_convert")
EMBEDDING_TABLES = ("model.embed_tokens.weight", "lm_head.weight")  # stored as --embed-type


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


# ------------------------------------------------------------------------------------------------- writing


def writes(cfg: ModelConfig) -> bool:
    return not cfg.encoder


def model(ckpt: Checkpoint, cfg: ModelConfig, where: str, *, target: str | None, outtype: str | None,
          embed_type: str | None) -> GGUFModel:
    """The graph `target` runs the model's family as (gguf.types.TARGETS) and the stored types, from the writer
    options; refused where the target has no such graph or type, warned where its graph computes another
    activation."""
    target = target or DEFAULT_TARGET
    if target not in TARGETS:
        raise ConvertError(f"unknown GGUF target {target!r} (choose from {', '.join(TARGETS)})")
    runtime = TARGETS[target]
    outtype = outtype or runtime.default_outtype
    embed_type = embed_type or runtime.default_embed_type
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown GGUF outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    projection_type = OUTTYPES[outtype]
    if target not in projection_type.targets:
        raise ConvertError(f"outtype {outtype} is for {' and '.join(projection_type.targets)}, not {target}")
    if embed_type not in EMBED_TYPES:
        raise ConvertError(f"unknown embedding type {embed_type!r} (choose from {', '.join(EMBED_TYPES)})")
    graph = graph_for(target, cfg.sub_norms, cfg.hidden_act)
    if not cfg.tie_word_embeddings and not graph.output_tensor:
        raise ConvertError(f"{where}: untied lm_head; {target}'s {graph.architecture} graph always ties the output "
                           "to token_embd")
    if cfg.hidden_act != graph.activation:
        log.warning(
            "%s: this model uses %s but %s's %s graph computes %s in the FFN: its outputs will be wrong",
            where, cfg.hidden_act, target, graph.architecture, graph.activation,
        )
    vocab = functools.partial(gguf_tokenizer.vocab_from_files, ckpt.tokenizer_files, ckpt.config, cfg.vocab_size, where)
    return GGUFModel(graph, projection_type, EMBED_TYPES[embed_type], cfg, vocab,
                     record=dict(target=target, outtype=outtype, embed_type=embed_type, hidden_act=cfg.hidden_act),
                     casts={name: embed_type for name in EMBEDDING_TABLES if name in ckpt.tensors})


def plan(ckpt: Checkpoint, model: GGUFModel, where: str) -> list[StoredTensor]:
    stored = _plan(ckpt, model.projection_type, model.graph, model.embed_type, where)
    if model.projection_type.ggml_type in (GGMLType.TQ1_0, GGMLType.TQ2_0):
        model.record["scale_corrections"] = _scale_corrections(stored, model.projection_type, where)
    return stored


def _scale_corrections(stored: list[StoredTensor], projection_type: OutType, where: str) -> list[str]:
    """The TQ projections whose blocks could not hold the multiplier exactly (stored.block_scale), warned about
    in one line: readers that ignore `.scale` compute them with d alone."""
    weights = {t.name for t in stored if t.ggml_type == projection_type.ggml_type}
    corrected = [t.name for t in stored if t.name.endswith(SCALE_SUFFIX)
                 and t.name.removesuffix(SCALE_SUFFIX) + ".weight" in weights]
    if corrected:
        shown = ", ".join(name.removesuffix(SCALE_SUFFIX) for name in corrected[:4])
        more = f" and {len(corrected) - 4} more" if len(corrected) > 4 else ""
        log.warning("%s: %d of %d %s projections have a multiplier f16 cannot hold (%s%s): their blocks' d is the "
                    "f16 next to it and a .scale tensor holds the exact ratio (llama.cpp applies it; a reader that "
                    "ignores .scale is off by < 2^-9)", where, len(corrected), len(weights),
                    projection_type.ggml_type.name, shown, more)
    return corrected


def model_keys(writer, model: GGUFModel) -> None:
    """None of its own: the model keys every architecture has say all these graphs read."""


def _plan(ckpt: Checkpoint, projection_type: OutType, graph: Graph, embed_type, where: str) -> list[StoredTensor]:
    """Every stored tensor in file order; each checkpoint entry is loaded once, when its first tensor is due."""
    plan: list[StoredTensor] = []
    for entry in ckpt:
        name = hf_to_gguf(entry.name)
        heads = gguf_rope.heads_of(entry.name, ckpt.config) if graph.interleaved_rope else None
        if heads is not None:
            entry = _rows_interleaved(entry, heads)
        if is_projection(entry.name):
            plan += projection(entry, name, projection_type, graph, where)
        elif len(entry.shape) == 1:
            plan.append(float_tensor(entry, name, GGMLType.F32, where))
        else:
            plan.append(float_tensor(entry, name, embed_type, where))
    return plan


def _rows_interleaved(entry: TensorEntry, heads: int) -> TensorEntry:
    """The projection with its rows in the interleaved-RoPE order (its codes moved, none changed; the stored HF
    bytes are not transcoded directly then)."""
    def load() -> Ternary:
        value = as_ternary(entry.load())
        return Ternary(gguf_rope.to_interleaved(value.codes, heads), value.multiplier)

    return dataclasses.replace(entry, kind=TERNARY, dtype=None, load=load)


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
    config["vocab_size"] = vocab_size(reader, by_name)
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
