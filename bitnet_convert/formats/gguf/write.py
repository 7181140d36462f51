"""Checkpoint -> GGUF for llama.cpp or bitnet.cpp, under the architecture that runtime runs the model's family as
(gguf_types.TARGETS: `bitnet` / `llama` for llama.cpp; `bitnet-b1.58`, `bitnet`, `llama` for bitnet.cpp),
streamed tensor by tensor.

Multipliers travel exactly where the file can hold them: for TQ1_0/TQ2_0, and for float outtypes under a graph
that applies `.scale` tensors (llama.cpp's), the codes are stored with unit scale (TQ blocks get d = 1.0, floats
hold -1/0/+1) and the float32 multiplier goes into `blk.N.<proj>.scale` (F32, shape [1]), which llama.cpp
multiplies into the projection's output. Folding it into the TQ blocks' f16 `d` instead would round it to 11
bits. I2_S keeps the float32 multiplier in its own tail, as bitnet.cpp reads it. bitnet.cpp's graphs know no
`.scale` tensors, so there a float projection holds codes x multiplier: exact in F32, rounded once in F16/BF16
(declared in the provenance's `multiplier_roundings`). A projection whose rows do not fit the outtype's blocks
is written in an exact float type instead, with a warning naming it.

Tensors are produced in pieces (a 2B4T embedding is 328 M values: converted 8 M at a time, it never exists in
float32), written with our own loop in place of gguf-py's `write_tensor_data` (same alignment padding), and
hashed piece by piece. HF packed projections are transcoded straight into I2_S / TQ2_0 bytes
(`PackedTernary`), never unpacked into int8 codes.

This module says what a GGUF stores (`plan`: the tensors, their producers, the model keys) and how (the
layout: gguf-py's header, key/values and tensor infos, then the data with its alignment padding); the output
pipeline (fileio/output.py) publishes, hashes and reads ahead. The header comes before any data, so the
provenance key, stored last among the key/values, holds a placeholder the pipeline overwrites with the
content hash once the data is out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, quants
from gguf.gguf_writer import GGUFValue

from bitnet_convert.fileio import output
from bitnet_convert.fileio.output import HASH_PLACEHOLDER, Output, Plan, PlannedTensor
from bitnet_convert.formats.gguf import rope as gguf_rope, tokenizer as gguf_tokenizer
from bitnet_convert.formats.gguf import tq as tq
from bitnet_convert.formats.folder import read_from
from bitnet_convert.formats.gguf.bulk import BulkGGUFWriter
from bitnet_convert.formats.gguf.read import KEY_VALUES_DOCUMENT, recorded_provenance
from bitnet_convert.formats.options import count_value, size_value
from bitnet_convert.formats.gguf.types import (
    DEFAULT_TARGET,
    EMBED_TYPES,
    FALLBACK_FLOAT,
    FLOAT_ROUNDING,
    I2_S,
    KEY_HIDDEN_ACT,
    KEY_LENGTH,
    KEY_MULTIPLIER_SOURCE,
    KEY_PROVENANCE,
    KEY_SPLIT_COUNT,
    KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS,
    MODEL_KEYS,
    OUTTYPES,
    ROPE_DIMENSIONS,
    SCALE_SUFFIX,
    SPLIT_NAME,
    TARGETS,
    VALUE_LENGTH,
    VOCAB_SIZE,
    Graph,
    OutType,
    graph_for,
)
from bitnet_core import validate
from bitnet_core.checkpoint import TERNARY, Checkpoint, TensorEntry, Ternary, row_blocks
from bitnet_core import parallel
from bitnet_core.codecs import hf2bit, i2s
from bitnet_core.errors import ConvertError
from bitnet_core.names import hf_to_gguf, is_projection
from bitnet_core.quantize import as_ternary, check_multiplier, projection_bytes

log = logging.getLogger("bitnet_convert")
EMBEDDING_TABLES = ("model.embed_tokens.weight", "lm_head.weight")  # stored as --embed-type
T = GGMLQuantizationType
NAME = "gguf"
QUANTIZATION_VERSION = 2  # general.quantization_version of ggml's current block layouts
F16_MAX = float(np.finfo(np.float16).max)
# Tensors made ahead of the writer while it builds the header: bounded in bytes (the 2B4T embedding comes
# first, 40 pieces of 16 MB), so peak memory stays ~0.5 GiB.
LOOKAHEAD_BYTES = 256 << 20
LOOKAHEAD_PIECES = 64
CHUNK_VALUES = 1 << 23  # values of a float tensor converted at a time: 32 MiB as float32
BF16 = np.dtype(ml_dtypes.bfloat16)
# bf16 bit patterns (sign cleared) below this are finite and at most 65280 in magnitude; the next bf16 value,
# 65536, is beyond float16's 65504, and it, infinities and NaNs take the checked float32 way.
_BF16_F16_SAFE = 0x4780


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One GGUF tensor as gguf-py's add_tensor_info wants it, and how to make its bytes."""

    name: str
    ggml_type: GGMLQuantizationType
    array_shape: tuple[int, ...]  # shape of the array handed to gguf-py (bytes for block types)
    array_dtype: np.dtype
    nbytes: int
    produce: Callable[[], Iterable[np.ndarray]] = dataclasses.field(repr=False, compare=False)  # the bytes, in pieces


def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True, **options) -> Path:
    """`plan` written to `out` by the output pipeline (fileio/output.py)."""
    return output.write(plan(ckpt, **options), out, force=force, quiet=quiet)


def plan(
    ckpt: Checkpoint,
    *,
    target: str | None = None,
    outtype: str | None = None,
    embed_type: str | None = None,
    vocab_only: bool | None = None,
    split_max_size: int | str | None = None,
    split_max_tensors: int | str | None = None,
    metadata: dict | None = None,
) -> Plan:
    """`ckpt` as one GGUF file for `target` ("llama.cpp" or "bitnet.cpp").

    outtype: projections as tq1_0 | tq2_0 (llama.cpp) | i2_s (bitnet.cpp) | f16 | bf16 | f32; default tq2_0 for
        llama.cpp, i2_s for bitnet.cpp. embed_type: token embeddings as f16 | bf16 | f32 | q8_0.
    vocab_only: the keys alone (no tensors). split_max_size / split_max_tensors: llama.cpp's split layout.
    metadata: general.* keys a user sets ({"general.author": "..."}), stored and recorded in the provenance.
    """
    files = GGUFFiles.of(vocab_only, split_max_size, split_max_tensors, metadata)
    where = read_from(ckpt)  # the file read, not the model it first came from: what the user gave
    # a vocabulary needs the hyperparameters only; a model all of its tensors, checked
    cfg = validate.model_config(ckpt.config, where) if files.vocab_only else validate.check_tensors(ckpt, where)
    if cfg.encoder:  # bitnet.cpp's embedding branch: its arch, norm names and pooling keys (formats.md §12)
        from bitnet_convert.formats.gguf import embedding as gguf_embedding

        return gguf_embedding.plan(ckpt, cfg, where, files, target=target, outtype=outtype, embed_type=embed_type)
    target = target or DEFAULT_TARGET
    if target not in TARGETS:
        raise ConvertError(f"unknown GGUF target {target!r} (choose from {', '.join(TARGETS)})")
    tgt = TARGETS[target]
    outtype = outtype or tgt.default_outtype
    embed_type = embed_type or tgt.default_embed_type
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown GGUF outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    kind = OUTTYPES[outtype]
    if target not in kind.targets:
        raise ConvertError(f"outtype {outtype} is for {' and '.join(kind.targets)}, not {target}")
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
    stored = [] if files.vocab_only else _plan(ckpt, kind, graph, EMBED_TYPES[embed_type], where)
    vocab = functools.partial(gguf_tokenizer.vocab_from_files, ckpt.tokenizer_files, ckpt.config, cfg.vocab_size, where)
    return gguf_plan(ckpt, stored, GGUFModel(graph, kind, cfg, vocab),
                     record=dict(target=target, outtype=outtype, embed_type=embed_type, hidden_act=cfg.hidden_act),
                     casts={name: embed_type for name in EMBEDDING_TABLES if name in ckpt.tensors}, files=files)


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """What a GGUF's keys say about the model: the runtime's graph, the outtype, the config, the tokenizer (built
    while the first tensors are made) and any keys of the architecture beyond the common ones."""

    graph: Graph
    kind: OutType
    cfg: object
    vocab: Callable[[], gguf_tokenizer.GGUFVocab | None]
    extra_keys: Callable | None = None


@dataclasses.dataclass(frozen=True)
class GGUFFiles:
    """How the GGUF is laid out in files, and the keys a user sets (the output options of every architecture)."""

    vocab_only: bool = False  # the keys alone: tokenizer and hyperparameters, no tensors
    split_max_size: int = 0  # llama.cpp's split layout: tensor data per file (0: no bound)
    split_max_tensors: int = 0  # ... tensors per file (0: no bound)
    metadata: dict = dataclasses.field(default_factory=dict)  # general.* keys (options.metadata_values)

    @classmethod
    def of(cls, vocab_only=None, split_max_size=None, split_max_tensors=None, metadata=None) -> GGUFFiles:
        """From the writer options as given (CLI strings or API values), each checked."""
        if vocab_only and (split_max_size or split_max_tensors):
            raise ConvertError("--vocab-only writes no tensors: there is nothing to split")
        return cls(bool(vocab_only),
                   size_value(split_max_size, "--split-max-size") if split_max_size is not None else 0,
                   count_value(split_max_tensors, "--split-max-tensors") if split_max_tensors is not None else 0,
                   dict(metadata or {}))

    def shards(self, tensors: list[PlannedTensor]) -> list[list[PlannedTensor]]:
        """The tensors file by file: a new file when the next tensor would pass a bound (a file holds at least one
        tensor), as gguf-py's writer splits."""
        shards: list[list[PlannedTensor]] = [[]]
        for t in tensors:
            current = shards[-1]
            if current and ((self.split_max_tensors and len(current) >= self.split_max_tensors) or (
                    self.split_max_size and sum(c.nbytes for c in current) + t.nbytes > self.split_max_size)):
                shards.append([])
            shards[-1].append(t)
        return shards


def split_paths(out: Path, count: int) -> list[Path]:
    """The files of a split GGUF written to `out` (NAME.gguf -> NAME-00001-of-0000N.gguf, ...)."""
    prefix = out.name[: -len(".gguf")] if out.name.lower().endswith(".gguf") else out.name
    return [out.with_name(SPLIT_NAME.format(prefix=prefix, number=i, count=count)) for i in range(1, count + 1)]


def gguf_plan(ckpt: Checkpoint, stored: list[StoredTensor], model: GGUFModel, *, record: dict,
              casts: dict[str, str], files: GGUFFiles = GGUFFiles()) -> Plan:
    """The planned tensors under the model keys (then `model.extra_keys(writer)`), the tokenizer and the
    provenance record (`record`: the writer's settings; `casts`: tensor -> the type it was cast to), in one
    file or in llama.cpp's split layout (`files`)."""
    casts = {**(ckpt.provenance.get("tensor_casts") or {}), **casts}
    roundings = list(ckpt.provenance.get("multiplier_roundings") or [])
    if _multiplier_source(model.kind, model.graph) == "in_values" and model.kind.ggml_type in FLOAT_ROUNDING:
        roundings.append(FLOAT_ROUNDING[model.kind.ggml_type])
    provenance = dict(ckpt.provenance, tensor_casts=casts, multiplier_roundings=roundings)
    if files.vocab_only:
        stored, record = [], dict(record, vocab_only=True)
    tensors = [_planned(t) for t in stored]
    shards = files.shards(tensors)
    arch = model.graph.architecture

    def keys(writer: BulkGGUFWriter) -> None:
        _add_model_keys(writer, model.graph, model.kind, model.cfg, ckpt, model.vocab(), model.extra_keys)
        for key, value in files.metadata.items():  # in place of ours (general.name), else after them
            writer.kv_data[0][key] = GGUFValue(value, GGUFValueType.STRING)
        if len(shards) > 1:
            _add_split_keys(writer, 0, len(shards), len(tensors))

    def layout(out: Output) -> None:
        first = _declared(BulkGGUFWriter(None, arch), shards[0])
        # The tensors are made and hashed from here on, while this thread builds the tokenizer's keys
        # (pure Python: a third of a 2B4T conversion, BENCHMARKS.md).
        out.start()
        keys(first)
        record_value = json.dumps(out.provisional_record(), sort_keys=True)
        first.add_string(KEY_PROVENANCE, record_value)  # the last key: the hash patched into it covers the rest
        kv_start, kv_end = _write_file(out, 0, first, shards[0])
        for number, shard in enumerate(shards[1:], start=1):
            writer = _declared(BulkGGUFWriter(None, arch), shard)
            writer.kv_data = [{}]  # the first file holds the model's keys, the others only their place in the set
            _add_split_keys(writer, number, len(shards), len(tensors))
            _write_file(out, number, writer, shard)
        value = record_value.encode()
        key_at = kv_end - len(value) - _string_entry_head(KEY_PROVENANCE)
        placeholder_at = kv_end - len(value) + value.rindex(HASH_PLACEHOLDER.encode())
        out.patch_hash_at(0, placeholder_at, covers=(KEY_VALUES_DOCUMENT, kv_start, key_at))

    def description() -> dict:
        writer = BulkGGUFWriter(None, arch)
        keys(writer)
        return {"architecture": arch, "keys": {key: _shown_value(v.value) for key, v in writer.kv_data[0].items()}}

    return Plan(NAME, tensors, layout, provenance, record, recorded_provenance, metadata=files.metadata,
                parts=(lambda out: split_paths(out, len(shards))) if len(shards) > 1 else None,
                lookahead=LOOKAHEAD_PIECES, lookahead_bytes=LOOKAHEAD_BYTES, description=description)


def _declared(writer: BulkGGUFWriter, tensors: list[PlannedTensor]) -> BulkGGUFWriter:
    for t in tensors:
        s = t.info
        writer.add_tensor_info(s.name, s.array_shape, s.array_dtype, s.nbytes, raw_dtype=s.ggml_type)
    return writer


def _add_split_keys(writer: BulkGGUFWriter, number: int, count: int, tensors: int) -> None:
    """The file's place in a split set, typed as llama.cpp's loader reads them (u16, u16, i32)."""
    writer.add_uint16(KEY_SPLIT_NO, number)
    writer.add_uint16(KEY_SPLIT_COUNT, count)
    writer.add_int32(KEY_SPLIT_TENSORS, tensors)


def _write_file(out: Output, number: int, writer: BulkGGUFWriter, tensors: list[PlannedTensor]) -> tuple[int, int]:
    """Header, key/values, tensor infos, then each tensor's data as gguf-py's write_tensor_data pads it (to the
    alignment before, and after); returns where the key/values lie."""
    fh = out.open(number)
    writer.use_file(fh)
    writer.write_header_to_file()
    kv_start = fh.tell()
    writer.write_kv_data_to_file()
    kv_end = fh.tell()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_padding(fh, fh.tell())
        out.write_tensor(fh, t)
        writer.write_padding(fh, t.nbytes)
    return kv_start, kv_end


def _shown_value(value):
    """A key's value as a dry run shows it: arrays by their length (a tokenizer's are 100k items long)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"[{len(value)} items]"
    return value.item() if isinstance(value, np.generic) else value


def _string_entry_head(key: str) -> int:
    """Bytes of a string key/value entry before its value's text: key length, key, value type, value length."""
    return 8 + len(key.encode()) + 4 + 8


def _planned(t: StoredTensor) -> PlannedTensor:
    """The tensor as the pipeline hashes it: GGML type name, dims ne0 first (as its tensor info stores them)."""
    shape = t.array_shape
    if t.array_dtype == np.uint8:  # gguf-py takes the bytes' shape of a block type
        shape = quants.quant_shape_from_byte_shape(shape, t.ggml_type)
    return PlannedTensor(t.name, t.ggml_type.name, tuple(int(d) for d in reversed(shape)), t.nbytes, t.produce, t)


def _multiplier_source(kind: OutType, graph: Graph) -> str:
    """Where the file keeps each projection's multiplier (our KEY_MULTIPLIER_SOURCE)."""
    if kind.ggml_type == I2_S:
        return "i2_s_tail"
    return "scale_tensor" if graph.scale_tensors else "in_values"


def _add_model_keys(writer: BulkGGUFWriter, graph: Graph, kind: OutType, cfg, ckpt: Checkpoint, vocab,
                    extra_keys: Callable | None = None) -> None:
    arch = graph.architecture
    writer.add_name(str(ckpt.provenance.get("source") or "BitNet b1.58").split("/")[-1])
    writer.add_file_type(int(kind.file_type))
    if kind.ggml_type not in (T.F16, T.BF16, T.F32):
        writer.add_quantization_version(QUANTIZATION_VERSION)
    values = {
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
    }
    for field, (key, vtype) in MODEL_KEYS.items():
        writer.add_key_value(key.format(arch=arch), values[field], vtype)
    if graph.vocab_and_rope_dims:
        writer.add_uint32(VOCAB_SIZE.format(arch=arch), cfg.vocab_size)
        writer.add_uint32(ROPE_DIMENSIONS.format(arch=arch), cfg.head_dim)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        writer.add_uint32(KEY_LENGTH.format(arch=arch), cfg.head_dim)
        writer.add_uint32(VALUE_LENGTH.format(arch=arch), cfg.head_dim)
    writer.add_string(KEY_HIDDEN_ACT, cfg.hidden_act)
    writer.add_string(KEY_MULTIPLIER_SOURCE, _multiplier_source(kind, graph))
    if extra_keys is not None:
        extra_keys(writer)
    if vocab is not None:
        vocab.add_to(writer)


def _plan(ckpt: Checkpoint, kind: OutType, graph: Graph, embed_type, where: str) -> list[StoredTensor]:
    """Every stored tensor in file order; each checkpoint entry is loaded once, when its first tensor is due."""
    plan: list[StoredTensor] = []
    for entry in ckpt:
        name = hf_to_gguf(entry.name)
        heads = gguf_rope.heads_of(entry.name, ckpt.config) if graph.interleaved_rope else None
        if heads is not None:
            entry = _rows_interleaved(entry, heads)
        if is_projection(entry.name):
            plan += _projection(entry, name, kind, graph, where)
        elif len(entry.shape) == 1:
            plan.append(_float_tensor(entry, name, T.F32, where))
        else:
            plan.append(_float_tensor(entry, name, embed_type, where))
    return plan


def _rows_interleaved(entry: TensorEntry, heads: int) -> TensorEntry:
    """The projection with its rows in the interleaved-RoPE order (its codes moved, none changed; the stored HF
    bytes are not transcoded directly then)."""
    def load() -> Ternary:
        value = as_ternary(entry.load())
        return Ternary(gguf_rope.to_interleaved(value.codes, heads), value.multiplier)

    return dataclasses.replace(entry, kind=TERNARY, dtype=None, load=load)


def _float_tensor(entry: TensorEntry, name: str, ggml_type, where: str) -> StoredTensor:
    shape = tuple(entry.shape)
    if ggml_type in (T.F32, T.F16):
        dtype = np.dtype(np.float32 if ggml_type == T.F32 else np.float16)
        array_shape, nbytes = shape, int(np.prod(shape)) * dtype.itemsize
    else:
        _check_blocks(shape, ggml_type, name, where)
        dtype = np.dtype(np.uint8)
        array_shape = quants.quant_shape_to_byte_shape(shape, ggml_type)
        nbytes = int(np.prod(array_shape))

    def produce() -> Iterable[np.ndarray]:
        # Whole rows at a time (block types quantize each row on its own), about CHUNK_VALUES values; read a
        # block at a time too where the source offers it (a whole copy of a 2B4T embedding is 0.66 GB more).
        blocks = row_blocks(entry, CHUNK_VALUES * np.dtype(entry.dtype or np.float32).itemsize)
        if blocks is not None:
            for block in blocks.blocks:
                yield _encode_float(block, ggml_type, name, where)
            return
        rows = max(1, CHUNK_VALUES // max(1, int(np.prod(shape[1:]))))
        value = entry.load()
        if isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name} should be a plain array, found ternary")
        value = np.asarray(value)
        if value.ndim < 2:
            yield _encode_float(value, ggml_type, name, where)
            return
        for start in range(0, value.shape[0], rows):
            yield _encode_float(value[start : start + rows], ggml_type, name, where)

    return StoredTensor(name, ggml_type, array_shape, dtype, nbytes, produce)


def _encode_float(values: np.ndarray, ggml_type, name: str, where: str) -> np.ndarray:
    if ggml_type == T.F16 and values.dtype == BF16:
        # bf16 -> f16 directly: ml_dtypes rounds exactly as bf16 -> f32 -> f16 does (bf16 -> f32 is exact)
        # for every value whose magnitude bits are under _BF16_F16_SAFE; the rest (too large, inf, NaN) take
        # the checked float32 way below.
        if values.size == 0 or int((values.view(np.uint16) & 0x7FFF).max()) < _BF16_F16_SAFE:
            out = np.empty(values.shape, np.float16)
            parallel.for_row_ranges(len(values), out.nbytes, lambda a, b: np.copyto(out[a:b], values[a:b],
                                                                                   casting="unsafe"))
            return out
    values = np.asarray(values, np.float32)
    if ggml_type == T.F16 and np.abs(values).max(initial=0) > F16_MAX:
        raise ConvertError(f"{where}: {name} has values beyond the float16 range; use an embedding type of bf16 or f32")
    return quants.quantize(values, ggml_type)  # BF16 rounds to nearest even like ggml: bf16 sources pass unchanged


def _fits_blocks(shape, ggml_type) -> bool:
    return shape[-1] % quants.GGML_QUANT_SIZES[ggml_type][0] == 0


def _check_blocks(shape, ggml_type, name: str, where: str) -> None:
    if not _fits_blocks(shape, ggml_type):
        raise ConvertError(
            f"{where}: {name} has rows of {shape[-1]} values; {ggml_type.name} needs a multiple of "
            f"{quants.GGML_QUANT_SIZES[ggml_type][0]} (choose a float type)"
        )


def _projection(entry: TensorEntry, name: str, kind: OutType, graph: Graph, where: str) -> list[StoredTensor]:
    """The weight and, where the multiplier is neither in an I2_S tail nor in the values, its `.scale` tensor."""
    shape = tuple(entry.shape)
    t = kind.ggml_type
    if t not in (T.F16, T.BF16, T.F32) and not _fits_blocks(shape, t):
        fallback = FALLBACK_FLOAT[graph.scale_tensors]
        log.warning("%s: %s has rows of %d values, which %s blocks (%d values) do not fit: written as %s, exactly",
                    where, name, shape[-1], t.name, quants.GGML_QUANT_SIZES[t][0], fallback.name)
        t = fallback
    loaded: dict[str, np.float32] = {}  # the weight's producer loads; the scale's producer (next in file) reads

    def stored(from_hf2bit, pack) -> list[np.ndarray]:
        data, loaded["multiplier"] = projection_bytes(entry, from_hf2bit, pack, where)
        return [data]

    if t == I2_S:
        def i2s_bytes() -> list[np.ndarray]:  # the multiplier goes into the tail: pack with a unit one, then set it
            (data,) = stored(lambda d, rows: i2s.from_hf2bit(d, rows, 1.0), lambda c: i2s.pack(c, 1.0))
            i2s.set_multiplier(data, loaded["multiplier"])
            return [data]

        byte_shape = quants.quant_shape_to_byte_shape(shape, t)
        return [StoredTensor(name, t, byte_shape, np.dtype(np.uint8), i2s.nbytes(int(np.prod(shape))), i2s_bytes)]
    if t in (T.TQ1_0, T.TQ2_0):
        def tq_bytes() -> list[np.ndarray]:
            from_hf2bit = tq.tq2_0_from_hf2bit if t == T.TQ2_0 else (lambda d, rows: tq.pack(hf2bit.unpack(d, rows), t))
            return stored(from_hf2bit, lambda codes: tq.pack(codes, t))

        byte_shape = quants.quant_shape_to_byte_shape(shape, t)
        weight = StoredTensor(name, t, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), tq_bytes)
    elif graph.scale_tensors:
        def codes() -> np.ndarray:
            value = as_ternary(entry.load())
            loaded["multiplier"] = value.multiplier
            return value.codes

        weight = _float_tensor(dataclasses.replace(entry, load=codes), name, t, where)
    else:
        return [_float_tensor(dataclasses.replace(entry, load=lambda: _weights_in_values(entry, t, where)),
                              name, t, where)]
    scale = StoredTensor(
        name.removesuffix(".weight") + SCALE_SUFFIX, T.F32, (1,), np.dtype(np.float32), 4,
        lambda: [np.array([loaded.pop("multiplier")], np.float32)],
    )
    return [weight, scale]


def _weights_in_values(entry: TensorEntry, ggml_type, where: str) -> np.ndarray:
    """codes x multiplier, for a graph that applies no `.scale` tensor: every value is 0 or +-m, with m rounded
    once to the stored float type (nothing is rounded in F32). Refused where that rounding loses m."""
    value = as_ternary(entry.load())
    multiplier = check_multiplier(value.multiplier, f"{where}: tensor {entry.name}")
    stored = {T.F16: np.float16, T.BF16: BF16}.get(ggml_type, np.float32)
    with np.errstate(over="ignore", under="ignore"):
        rounded = np.float32(np.asarray(multiplier).astype(stored))
    if not np.isfinite(rounded) or rounded == 0:
        raise ConvertError(f"{where}: tensor {entry.name} has multiplier {multiplier!r}, which {ggml_type.name} "
                           "cannot hold; choose outtype f32")
    return value.codes.astype(stored) * np.asarray(rounded).astype(stored)
