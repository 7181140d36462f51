"""The BitNet-embedding encoders (Qwen3Model / Gemma3TextModel backbones) as GGUF for bitnet.cpp's embedding
branch, and back (docs/formats.md §12).

What bitnet.cpp's `utils/convert-bitnet-embedding-to-gguf.py` writes, and so what its runtime reads:
architecture `qwen3` / `gemma3`; the usual model keys plus `vocab_size`, `rope.dimension_count`, `key_length`
and `value_length` (head_dim, which is never hidden / heads in these models) and `pooling_type`; the projections
in I2_S (its tail holds the float32 multiplier), the RMSNorm inside each BitLinear as
`blk.N.<proj>_norm_in.weight`, Gemma's sandwich norms under llama.cpp's gemma3 names; no `output.weight`.

Two choices of ours, both so that the file reads back exactly:
- Norms are F32 (bitnet.cpp's converter writes F16; every float type loads, and bf16 -> f32 holds every value).
- Gemma's model norms scale by (1 + w) and the runtime's RMSNorm by the stored weight, so the file holds
  f32(1 + w), as bitnet.cpp's does. Reading subtracts 1 again: exact for every bf16 w with 2^-16 <= |w| < 2^23
  or w = 0; a smaller |w| loses its low bits in the sum. Such norms come back with the declared encoding
  `unit_offset` (verify's weights layer then compares against the same arithmetic applied to the reference),
  and the writer warns when any value is affected.
The keys bitnet.cpp does not write and our JAX model needs are written under llama.cpp's names where it has one
(`attention.sliding_window`, `attention.sliding_window_pattern` per layer, `rope.freq_base_swa`), else under
ours (`bitnet_convert.query_pre_attn_scalar`); a file without them reads with what llama.cpp's gemma3 graph
assumes (transformers' defaults; attention scaled by head_dim^-1/2).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, Keys, PoolingType

from bitnet_convert.formats.gguf import entries
from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf.entries import model_key, vocab_size
from bitnet_convert.formats.gguf.header import INTEGER_TYPES, STRING, typed_value
from bitnet_convert.formats.gguf.stored import GGUFModel, StoredTensor, float_tensor, projection
from bitnet_convert.formats.gguf.types import (
    GGMLType,
    EMBED_TYPES,
    KEY_HIDDEN_ACT,
    KEY_LENGTH,
    MODEL_KEYS,
    OUTTYPES,
    ROPE_DIMENSIONS,
    U32,
    VALUE_LENGTH,
    Graph,
)
from bitnet_core import validate
from bitnet_core.checkpoint import UNIT_OFFSET, Checkpoint, TensorEntry
from bitnet_core.config import (
    DEFAULT_ACTIVATION,
    FULL_ATTENTION,
    GEMMA3,
    MODEL_TYPES,
    QWEN3,
    SLIDING_ATTENTION,
    ModelConfig,
)
from bitnet_core.errors import ConvertError
from bitnet_core.names import (
    LAYER_ROLES,
    SANDWICH_GGUF,
    POOLING_CONFIG_FILE,
    expected_tensors,
    hf_to_gguf,
    is_projection,
    layer_name,
)
from bitnet_core.pooling import end_token, pooling_of

log = logging.getLogger("bitnet_convert")

TARGET = "bitnet.cpp"  # the one runtime with a graph for these models (an RMSNorm inside every BitLinear)
OUTTYPE = "i2_s"
ARCHITECTURES = {QWEN3: "qwen3", GEMMA3: "gemma3"}  # our class -> general.architecture (bitnet.cpp's names)
READ_AS = {arch: cls for cls, arch in ARCHITECTURES.items()}
NAMES = tuple(READ_AS)  # the general.architecture values this plug-in reads
POOLING_TYPES = {"mean": PoolingType.MEAN, "cls": PoolingType.CLS, "last": PoolingType.LAST}
POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}
KEY_QUERY_SCALAR = "bitnet_convert.query_pre_attn_scalar"
POOLING_TYPE, SLIDING_WINDOW = Keys.LLM.POOLING_TYPE, Keys.Attention.SLIDING_WINDOW
SLIDING_PATTERN, LOCAL_FREQ_BASE = Keys.Attention.SLIDING_WINDOW_PATTERN, Keys.Rope.FREQ_BASE_SWA
LLAMA_CPP_LOCAL_BASE = 10_000.0  # llama.cpp's gemma3 graph: the sliding layers' RoPE base when no key says
F32 = GGUFValueType.FLOAT32
# The model's own RMSNorms (Gemma: 1 + w); the `<proj>.norm` inside BitLinear is plain w in every model.
_MODEL_NORMS = frozenset(r.hf for r in LAYER_ROLES if r.kind == "dense" and r.needs != "use_rms_norm")


def graph_of(cfg: ModelConfig) -> Graph:
    return Graph(ARCHITECTURES[cfg.architecture], sub_norms=False, activation=cfg.hidden_act, scale_tensors=False,
                 output_tensor=False, vocab_and_rope_dims=True)


# ------------------------------------------------------------------------------------------------- names


def gguf_name(hf_name: str, cfg: ModelConfig) -> str:
    """Our name -> bitnet.cpp's: Gemma's post-attention / pre-feed-forward norms take llama.cpp's gemma3 names."""
    if cfg.sandwich_norms:
        for suffix, gguf in SANDWICH_GGUF.items():
            for layer in range(cfg.num_hidden_layers):
                if hf_name == layer_name(layer, suffix):
                    return f"blk.{layer}.{gguf}.weight"
    return hf_to_gguf(hf_name)


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """bitnet.cpp's name -> ours, for every tensor `cfg`'s model has."""
    return {gguf_name(name, cfg): name for name in expected_tensors(cfg)}


def is_unit_offset(hf_name: str, cfg: ModelConfig) -> bool:
    if not cfg.unit_offset_norms:
        return False
    if hf_name == "model.norm.weight":
        return True
    return any(hf_name.endswith(f".{suffix}.weight") and not is_projection(hf_name) for suffix in _MODEL_NORMS)


# ------------------------------------------------------------------------------------------------- writing


def writes(cfg: ModelConfig) -> bool:
    return cfg.encoder


def model(ckpt: Checkpoint, cfg: ModelConfig, where: str, *, target: str | None, outtype: str | None,
          embed_type: str | None) -> GGUFModel:
    """bitnet.cpp's embedding branch, I2_S projections: the only target and outtype these models have."""
    if target not in (None, TARGET):
        raise ConvertError(f"{where}: the {cfg.architecture} embedding model runs in {TARGET}'s embedding branch "
                           f"only ({target} has no graph with an RMSNorm inside every projection); use --target {TARGET}")
    if outtype not in (None, OUTTYPE):
        raise ConvertError(f"{where}: the {cfg.architecture} embedding model is written with {OUTTYPE} projections "
                           f"only (bitnet.cpp runs its float outtypes as plain float weights)")
    embed_type = embed_type or "f16"
    if embed_type not in EMBED_TYPES:
        raise ConvertError(f"unknown embedding type {embed_type!r} (choose from {', '.join(EMBED_TYPES)})")
    pooling, _ = pooling_of(ckpt.tokenizer_files, where)
    graph, projection_type = graph_of(cfg), OUTTYPES[OUTTYPE]

    def vocab():  # built by the writer while the first tensors are made
        found = gguf_tokenizer.vocab_from_files(ckpt.tokenizer_files, ckpt.config, cfg.vocab_size, where)
        return found if found is None else _with_end_token(found, cfg, pooling, where)

    return GGUFModel(graph, projection_type, EMBED_TYPES[embed_type], cfg, vocab,
                     record=dict(target=TARGET, outtype=OUTTYPE, embed_type=embed_type, pooling=pooling),
                     casts={"model.embed_tokens.weight": embed_type})


def plan(ckpt: Checkpoint, model: GGUFModel, where: str) -> list[StoredTensor]:
    return _plan(ckpt, model.cfg, model.projection_type, model.graph, model.embed_type, where)


def model_keys(writer, model: GGUFModel) -> None:
    """The pooling and attention keys the shared model keys lack for these models."""
    _add_encoder_keys(writer, model.graph.architecture, model.cfg, model.record["pooling"])


def _with_end_token(vocab, cfg: ModelConfig, pooling: str, where: str):
    """The vocabulary with the end token the embedder appends (bitnet_core.pooling.end_token) as EOS, added."""
    by_text = {text: i for i, text in enumerate(vocab.tokens)}
    eos = end_token(cfg.architecture, pooling, by_text.get, cfg.eos_token_id, where)
    if eos is None:
        return vocab
    return dataclasses.replace(vocab, eos_id=eos, add_eos=True)


def _add_encoder_keys(writer, arch: str, cfg: ModelConfig, pooling: str) -> None:
    """The keys writer.py's model keys lack for these models (those are written first)."""
    if cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size:  # else writer.py wrote them
        writer.add_uint32(KEY_LENGTH.format(arch=arch), cfg.head_dim)
        writer.add_uint32(VALUE_LENGTH.format(arch=arch), cfg.head_dim)
    writer.add_uint32(POOLING_TYPE.format(arch=arch), int(POOLING_TYPES[pooling]))
    if cfg.sliding_window is not None:
        writer.add_uint32(SLIDING_WINDOW.format(arch=arch), cfg.sliding_window)
        writer.add_array(SLIDING_PATTERN.format(arch=arch), [t == SLIDING_ATTENTION for t in cfg.layer_types])
        if cfg.rope_local_theta is not None:
            writer.add_float32(LOCAL_FREQ_BASE.format(arch=arch), cfg.rope_local_theta)
    if cfg.query_pre_attn_scalar is not None:
        writer.add_float32(KEY_QUERY_SCALAR, cfg.query_pre_attn_scalar)


def _plan(ckpt: Checkpoint, cfg: ModelConfig, projection_type, graph: Graph, embed_type, where: str) -> list:
    plan = []
    for entry in ckpt:
        name = gguf_name(entry.name, cfg)
        if is_projection(entry.name):
            plan += projection(entry, name, projection_type, graph, where)
        elif len(entry.shape) == 1:
            if is_unit_offset(entry.name, cfg):
                entry = dataclasses.replace(entry, load=_plus_one(entry, where))
            plan.append(float_tensor(entry, name, GGMLType.F32, where))
        else:
            plan.append(float_tensor(entry, name, embed_type, where))
    return plan


def _plus_one(entry: TensorEntry, where: str):
    """f32(1 + w), what the runtime's plain RMSNorm needs for Gemma's (1 + w); warns where w does not come back."""
    def load() -> np.ndarray:
        w = np.asarray(entry.load(), np.float32)
        stored = w + np.float32(1.0)
        lost = int(np.count_nonzero(stored - np.float32(1.0) != w))
        if lost:
            log.warning("%s: %s: %d values of w are too small for f32(1 + w) to hold them (|w| < 2^-16): they read "
                        "back rounded", where, entry.name, lost)
        return stored

    return load


# ------------------------------------------------------------------------------------------------- reading


def config(reader, arch: str, by_name) -> dict:
    """config.json from the keys (validated at once: the tensors' names follow from it)."""
    found = _config(reader, arch, by_name)
    validate.model_config(found, str(reader.path))
    return found


def tensors(reader, arch: str, config: dict, by_name, path: Path) -> dict[str, TensorEntry]:
    """The checkpoint's tensors in model order; Gemma's model norms come back as w from the stored 1 + w."""
    cfg = validate.model_config(config, str(path))
    names = hf_names(cfg)
    found: dict[str, TensorEntry] = {}
    for t in reader.tensors:
        if t.name not in names:
            raise ConvertError(f"{path}: unexpected tensor {t.name}")
        hf_name = names[t.name]
        if is_projection(hf_name):
            found[hf_name] = entries.projection(reader, t, None, hf_name, path)
        else:
            entry = entries.dense(reader, t, hf_name, path)
            if is_unit_offset(hf_name, cfg):
                entry = _minus_one(entry)
            found[hf_name] = entry
    return {n: found[n] for n in names.values() if n in found}


def side_files(reader, arch: str, config: dict) -> dict[str, bytes]:
    return _pooling_files(reader, arch, config["hidden_size"])


def _minus_one(entry: TensorEntry) -> TensorEntry:
    def load() -> np.ndarray:
        return np.asarray(entry.load(), np.float32) - np.float32(1.0)

    return dataclasses.replace(entry, dtype=np.dtype(np.float32), load=load, encoding=UNIT_OFFSET)


def _config(reader, arch: str, by_name) -> dict:
    """config.json from the keys: the backbone's class and model_type, then what our JAX model needs."""
    cls = READ_AS[arch]
    config: dict = {"architectures": [cls], "model_type": MODEL_TYPES[cls]}
    for hf_key, (template, vtype) in MODEL_KEYS.items():
        value = model_key(reader, template.format(arch=arch), vtype)
        if value is None:
            if hf_key == "num_key_value_heads":
                continue
            raise ConvertError(f"{reader.path}: missing key {template.format(arch=arch)}")
        config[hf_key] = value
    key_length = model_key(reader, KEY_LENGTH.format(arch=arch), U32)
    head_dim = key_length
    if head_dim is None:
        head_dim = model_key(reader, ROPE_DIMENSIONS.format(arch=arch), U32)
    value_length = model_key(reader, VALUE_LENGTH.format(arch=arch), U32)
    if value_length is not None and head_dim and value_length != head_dim:  # the runtime sizes V heads by it
        raise ConvertError(f"{reader.path}: key {VALUE_LENGTH.format(arch=arch)} is {value_length}, but the heads are "
                           f"{head_dim} wide (these models have one head size)")
    if head_dim is not None:  # 0 included: validation names it
        config["head_dim"] = head_dim
    config["vocab_size"] = vocab_size(reader, by_name)
    act = typed_value(reader, KEY_HIDDEN_ACT, frozenset((STRING,)), "a string") or DEFAULT_ACTIVATION[cls]
    config["hidden_activation" if cls == GEMMA3 else "hidden_act"] = act
    config["tie_word_embeddings"] = True
    for hf_key, key in (("bos_token_id", Keys.Tokenizer.BOS_ID), ("eos_token_id", Keys.Tokenizer.EOS_ID)):
        value = model_key(reader, key, U32)
        if value is not None:
            config[hf_key] = value
    window = model_key(reader, SLIDING_WINDOW.format(arch=arch), U32)
    pattern = _bools(reader, SLIDING_PATTERN.format(arch=arch))
    if cls == GEMMA3:
        local = model_key(reader, LOCAL_FREQ_BASE.format(arch=arch), F32)
        scalar = model_key(reader, KEY_QUERY_SCALAR, F32)
        config.update(rope_local_base_freq=LLAMA_CPP_LOCAL_BASE if local is None else local,
                      query_pre_attn_scalar=config.get("head_dim", 256) if scalar is None else scalar)
    elif window is not None:
        config["use_sliding_window"] = True
    if window is not None:
        config["sliding_window"] = window
    if pattern is not None:
        config["layer_types"] = [SLIDING_ATTENTION if s else FULL_ATTENTION for s in pattern]
    config.update(attention_bias=False, torch_dtype="bfloat16")
    return config


def _bools(reader, key: str) -> list[bool] | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = reader.value(key)
    if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
        raise ConvertError(f"{reader.path}: key {key} is {field.kind()}, expected an array of bools")
    return value


def _pooling_files(reader, arch: str, hidden: int) -> dict[str, bytes]:
    """sentence-transformers' modules.json + 1_Pooling/config.json saying the file's pooling_type (none without
    the key: the default, mean, applies)."""
    value = typed_value(reader, POOLING_TYPE.format(arch=arch), INTEGER_TYPES, "an integer (u32)")
    if value is None:
        return {}
    modes = {int(t): mode for mode, t in POOLING_TYPES.items()}
    if value not in modes:
        raise ConvertError(f"{reader.path}: {POOLING_TYPE.format(arch=arch)} is {value}; an embedding needs mean (1), "
                           "cls (2) or last (3)")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_CONFIG_FILE.split("/")[0],
                "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    pooling = {"word_embedding_dimension": hidden, **{key: m == modes[value] for m, key in POOLING_MODES.items()}}
    return {"modules.json": json.dumps(modules, indent=2).encode(),
            POOLING_CONFIG_FILE: json.dumps(pooling, indent=2).encode()}

