"""Checkpoint -> GGUF for llama.cpp or bitnet.cpp, under the architecture that runtime runs the model's family as
(gguf_types.TARGETS: `bitnet` / `llama` for llama.cpp; `bitnet-b1.58`, `bitnet`, `llama` for bitnet.cpp),
streamed tensor by tensor.

Multipliers travel exactly. TQ1_0/TQ2_0 blocks hold the multiplier in their f16 `d`, as llama.cpp's own
converter writes them, wherever f16 holds it; where it does not, `d` is an f16 next to it and
`blk.N.<proj>.scale` (F32, shape [1], multiplied into the projection's output by llama.cpp) the exact ratio
(block_scale). Float outtypes under a graph that applies `.scale` tensors (llama.cpp's) store the codes
(-1/0/+1) and the float32 multiplier in `.scale`. I2_S keeps the float32 multiplier in its own tail, as
bitnet.cpp reads it. bitnet.cpp's graphs know no
`.scale` tensors, so there a float projection holds codes x multiplier: exact in F32, rounded once in F16/BF16
(declared in the provenance's `multiplier_roundings`). A projection whose rows do not fit the outtype's blocks
is written in an exact float type instead, with a warning naming it.

Tensors are produced in pieces (a 2B4T embedding is 328 M values: converted 8 M at a time, it never exists in
float32), written with our own loop in place of gguf-py's `write_tensor_data` (same alignment padding), and
hashed piece by piece. HF packed projections are transcoded straight into I2_S / TQ2_0 bytes
(`PackedTernary`), never unpacked into int8 codes.

gguf-py writes the header, the key/values and every tensor's info before any data, so the content hash
(integrity.ModelHasher over the tensors as stored, in file order, and the key/values as stored) is not known
when the provenance key is written. The key holds a fixed-width placeholder that is overwritten in the
temporary file once the data is out, before atomic_path renames it into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, quants

from bitnet_convert.fileio import integrity
from bitnet_convert.fileio.atomic import atomic_path, replacing_outputs_of
from bitnet_convert.fileio.prefetch import prefetch
from bitnet_convert.fileio.progress import progress_bar
from bitnet_convert.formats import gguf_general, gguf_rope, gguf_tokenizer
from bitnet_convert.formats import gguf_tq as tq
from bitnet_convert.formats.folder import read_from
from bitnet_convert.formats.gguf_bulk import BulkGGUFWriter
from bitnet_convert.formats.gguf_read import KEY_VALUES_DOCUMENT, recorded_provenance
from bitnet_convert.formats.gguf_types import (
    DEFAULT_TARGET,
    EMBED_TYPES,
    FALLBACK_FLOAT,
    FLOAT_ROUNDING,
    I2_S,
    KEY_HIDDEN_ACT,
    KEY_LENGTH,
    KEY_MULTIPLIER_SOURCE,
    KEY_PROVENANCE,
    MODEL_KEYS,
    OUTTYPES,
    ROPE_DIMENSIONS,
    SCALE_SUFFIX,
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
HASH_PLACEHOLDER = "~" * 64  # same width as a sha256 hex digest; '~' never occurs in one
QUANTIZATION_VERSION = 2  # general.quantization_version of ggml's current block layouts
F16_MAX = float(np.finfo(np.float16).max)
F16_TINY = np.finfo(np.float16).tiny  # the least normal f16, 2^-14
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


def write(
    ckpt: Checkpoint,
    out: str,
    *,
    force: bool = False,
    quiet: bool = True,
    target: str | None = None,
    outtype: str | None = None,
    embed_type: str | None = None,
) -> Path:
    """Write `ckpt` as one GGUF file for `target` ("llama.cpp" or "bitnet.cpp").

    outtype: projections as tq1_0 | tq2_0 (llama.cpp) | i2_s (bitnet.cpp) | f16 | bf16 | f32; default tq2_0 for
        llama.cpp, i2_s for bitnet.cpp. embed_type: token embeddings as f16 | bf16 | f32 | q8_0.
    """
    where = read_from(ckpt)  # the file read, not the model it first came from: what the user gave
    cfg = validate.check_tensors(ckpt, where)
    if cfg.encoder:  # bitnet.cpp's embedding branch: its arch, norm names and pooling keys (formats.md §12)
        from bitnet_convert.formats import gguf_embedding

        return gguf_embedding.write(ckpt, out, cfg, where, force=force, quiet=quiet, target=target,
                                    outtype=outtype, embed_type=embed_type)
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
    plan = _plan(ckpt, kind, graph, EMBED_TYPES[embed_type], where)
    record = dict(target=target, outtype=outtype, embed_type=embed_type, hidden_act=cfg.hidden_act)
    if kind.ggml_type in (T.TQ1_0, T.TQ2_0):
        record["scale_corrections"] = _scale_corrections(plan, kind, where)
    vocab = functools.partial(gguf_tokenizer.vocab_from_files, ckpt.tokenizer_files, ckpt.config, cfg.vocab_size, where)
    return write_plan(ckpt, out, plan, graph, kind, cfg, vocab, force=force, quiet=quiet, record=record,
                      casts={name: embed_type for name in EMBEDDING_TABLES if name in ckpt.tensors})


def _scale_corrections(plan: list[StoredTensor], kind: OutType, where: str) -> list[str]:
    """The TQ projections whose blocks could not hold the multiplier exactly (block_scale), warned about in one
    line: readers that ignore `.scale` compute them with d alone."""
    weights = {t.name for t in plan if t.ggml_type == kind.ggml_type}
    corrected = [t.name for t in plan if t.name.endswith(SCALE_SUFFIX)
                 and t.name.removesuffix(SCALE_SUFFIX) + ".weight" in weights]
    if corrected:
        shown = ", ".join(name.removesuffix(SCALE_SUFFIX) for name in corrected[:4])
        more = f" and {len(corrected) - 4} more" if len(corrected) > 4 else ""
        log.warning("%s: %d of %d %s projections have a multiplier f16 cannot hold (%s%s): their blocks' d is the "
                    "f16 next to it and a .scale tensor holds the exact ratio (llama.cpp applies it; a reader that "
                    "ignores .scale is off by < 2^-9)", where, len(corrected), len(weights), kind.ggml_type.name,
                    shown, more)
    return corrected


def write_plan(ckpt: Checkpoint, out: str, plan: list[StoredTensor], graph: Graph, kind: OutType, cfg,
               vocab: Callable[[], gguf_tokenizer.GGUFVocab | None], extra_keys: Callable | None = None, *, force: bool, quiet: bool,
               record: dict, casts: dict[str, str]) -> Path:
    """Write the planned tensors with the model keys (then `extra_keys(writer)`), the tokenizer (`vocab()`)
    and the provenance record (`record`: the writer's settings; `casts`: tensor -> the type it was cast to)."""
    casts = {**(ckpt.provenance.get("tensor_casts") or {}), **casts}
    roundings = list(ckpt.provenance.get("multiplier_roundings") or [])
    if _multiplier_source(kind, graph) == "in_values" and kind.ggml_type in FLOAT_ROUNDING:
        roundings.append(FLOAT_ROUNDING[kind.ggml_type])
    record = integrity.provenance_record(
        dict(ckpt.provenance, tensor_casts=casts, multiplier_roundings=roundings), HASH_PLACEHOLDER, NAME, **record,
    )
    with replacing_outputs_of(NAME, recorded_provenance), atomic_path(out, force=force) as tmp, \
            contextlib.closing(integrity.ModelHasher(background=True)) as hasher:
        writer = BulkGGUFWriter(tmp, graph.architecture)
        try:
            for t in plan:
                writer.add_tensor_info(t.name, t.array_shape, t.array_dtype, t.nbytes, raw_dtype=t.ggml_type)
            # The tensors are made and hashed from here on, while this thread builds the tokenizer's keys
            # (pure Python, ~1 s of a 2B4T conversion's ~3 on the 2-core EPYC of BENCHMARKS.md).
            pieces = prefetch(_hashed_pieces(plan, _stored_dims(writer), hasher), depth=LOOKAHEAD_PIECES,
                              max_bytes=LOOKAHEAD_BYTES, weigh=lambda item: 0 if item[1] is None else item[1].nbytes)
            try:
                _add_model_keys(writer, graph, kind, cfg, ckpt, vocab(), extra_keys)
                writer.add_string(KEY_PROVENANCE, json.dumps(record, sort_keys=True))  # last key: see _patch_hash
                key_values = _write_tensors(writer, plan, pieces, f"writing {Path(out).name}", quiet)
            finally:
                pieces.close()  # a failure above: the worker stops producing
        finally:
            writer.close()
        _patch_hash(tmp, key_values, hasher)
    return Path(out)


def _hashed_pieces(plan: list[StoredTensor], dims: dict, hasher: integrity.ModelHasher):
    """(tensor, None) opens a tensor, (tensor, piece) carries its data, each piece hashed as it is made."""
    for t in plan:
        hasher.begin(t.name, t.ggml_type.name, dims[t.name], t.nbytes)
        yield t, None
        for piece in t.produce():
            raw = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
            hasher.update(raw)
            yield t, raw


def _write_tensors(writer: BulkGGUFWriter, plan: list[StoredTensor], pieces, desc: str, quiet: bool) -> range:
    """Header, key/values, tensor infos, then the data one tensor at a time from `pieces` (_hashed_pieces).
    Returns where the key/values lie in the file (they complete the content hash: _patch_hash)."""
    writer.write_header_to_file()
    kv_start = writer.fout[0].tell()
    writer.write_kv_data_to_file()
    kv_end = writer.fout[0].tell()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]

    def finish(t: StoredTensor | None, written: int) -> None:
        if t is None:
            return
        if written != t.nbytes:  # a bug here would shift every later tensor's offset
            raise AssertionError(f"{t.name}: produced {written} bytes, planned {t.nbytes}")
        writer.write_padding(fout, t.nbytes)

    with progress_bar(sum(t.nbytes for t in plan), desc, quiet) as bar:
        current, written = None, 0
        for t, raw in pieces:
            if raw is None:
                # What gguf-py's write_tensor_data does, a piece at a time: pad to the alignment, data, pad.
                finish(current, written)
                writer.write_padding(fout, fout.tell())
                current, written = t, 0
                continue
            fout.write(memoryview(raw))
            written += raw.nbytes
            bar.update(raw.nbytes)
        finish(current, written)
    return range(kv_start, kv_end)


def _stored_dims(writer: BulkGGUFWriter) -> dict[str, tuple[int, ...]]:
    """Each tensor's dims as its tensor info stores them, ne0 first (gguf-py keeps them in numpy order)."""
    return {name: tuple(int(d) for d in reversed(info.shape)) for part in writer.tensors for name, info in part.items()}


def _multiplier_source(kind: OutType, graph: Graph) -> str:
    """Where the file keeps each projection's multiplier (our KEY_MULTIPLIER_SOURCE)."""
    if kind.ggml_type == I2_S:
        return "i2_s_tail"
    if kind.ggml_type in (T.TQ1_0, T.TQ2_0):
        return "tq_block_d"  # times a `.scale` correction where the provenance's scale_corrections lists one
    return "scale_tensor" if graph.scale_tensors else "in_values"


def _add_model_keys(writer: BulkGGUFWriter, graph: Graph, kind: OutType, cfg, ckpt: Checkpoint, vocab,
                    extra_keys: Callable | None = None) -> None:
    arch = graph.architecture
    gguf_general.add_to(writer, ckpt.provenance, ckpt.config, "BitNet b1.58")
    writer.add_file_type(int(kind.file_type))
    writer.add_quantization_version(QUANTIZATION_VERSION)  # in float files too, as llama.cpp's converter does
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
    # llama.cpp assumes hidden / heads without them; its converter writes them wherever config.json has head_dim
    if "head_dim" in ckpt.config or cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
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
        planned = _planned_multiplier(entry, where)
        d, correction = block_scale(planned)

        def tq_bytes() -> list[np.ndarray]:
            from_hf2bit = tq.tq2_0_from_hf2bit if t == T.TQ2_0 else (lambda d, rows: tq.pack(hf2bit.unpack(d, rows), t))
            (data,) = stored(from_hf2bit, lambda codes: tq.pack(codes, t))
            multiplier = loaded.pop("multiplier")
            if multiplier != planned:  # the plan chose the layout for the multiplier the source said it had
                raise ConvertError(f"{where}: tensor {entry.name}: multiplier {multiplier!r} read, "
                                   f"{planned!r} when the file was planned (the source changed?)")
            return [tq.set_d(data, t, d)]

        byte_shape = quants.quant_shape_to_byte_shape(shape, t)
        weight = StoredTensor(name, t, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), tq_bytes)
        if correction is None:
            return [weight]
        return [weight, StoredTensor(name.removesuffix(".weight") + SCALE_SUFFIX, T.F32, (1,), np.dtype(np.float32),
                                     4, lambda: [np.array([correction], np.float32)])]
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


def block_scale(multiplier: np.float32) -> tuple[np.float16, np.float32 | None]:
    """(the f16 `d` of a projection's TQ blocks, the F32 `.scale` it needs or None) for an exact multiplier.

    llama.cpp's converter leaves the multiplier in `d`, and runtimes written against its files read `d` as the
    weight's magnitude and ignore `.scale`. So `d` is the multiplier wherever f16 holds it (every bf16 value in
    f16's normal range; 2B4T's are). Where it does not (Falcon3's 1/weight_scale in float32, a mean of masters),
    `d` is the f16 nearest it, or the next one up, and `.scale` the float32 ratio whose product with `d` gives
    the multiplier back exactly (llama.cpp multiplies it in; our reader takes the float32 product): those
    runtimes then compute with `d`, within 2^-9 of the multiplier, about as the converter's own file makes
    them. In f16's normal range one of the two always has such a ratio (a ratio just under 1 has float32 steps
    finer than the multiplier's); d = 1 and `.scale` = the multiplier is the last resort (outside that range)."""
    m = np.float32(multiplier)
    with np.errstate(over="ignore", under="ignore"):
        nearest = m.astype(np.float16)
    if np.float32(nearest) == m:
        return nearest, None
    for d in (nearest, np.nextafter(nearest, np.float16(np.inf))):
        if np.isfinite(d) and d >= F16_TINY:  # a subnormal d would be far from the multiplier
            ratio = np.float32(m / np.float32(d))
            if np.float32(np.float32(d) * ratio) == m:
                return d, ratio
    return np.float16(1.0), m


def _planned_multiplier(entry: TensorEntry, where: str) -> np.float32:
    """A projection's multiplier before its data is written (the layout depends on it): the one its source
    stores apart from the codes, else loaded (a GGUF source, master weights: read twice)."""
    if entry.multiplier is not None:
        return check_multiplier(entry.multiplier, f"{where}: tensor {entry.name}")
    return check_multiplier(as_ternary(entry.load()).multiplier, f"{where}: tensor {entry.name}")


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


def _patch_hash(path: Path, key_values: range, hasher: integrity.ModelHasher) -> None:
    """Complete the content hash with the key/values as stored before the provenance key (the last one; the
    same bytes gguf_read.stored_key_values finds), then overwrite the placeholder in that key with it."""
    key = KEY_PROVENANCE.encode()
    with open(path, "r+b") as fh:
        header = fh.read(key_values.stop)
        provenance_at = header.rfind(struct.pack("<Q", len(key)) + key, key_values.start)
        placeholder_at = header.rfind(HASH_PLACEHOLDER.encode())
        if not key_values.start <= provenance_at < placeholder_at:
            raise AssertionError("provenance key or its placeholder not found in the GGUF header")
        hasher.add_config(KEY_VALUES_DOCUMENT, header[key_values.start : provenance_at])
        fh.seek(placeholder_at)
        fh.write(hasher.hexdigest().encode())
