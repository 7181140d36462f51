"""Checkpoint -> GGUF for llama.cpp or bitnet.cpp, under the architecture that runtime runs the model's family as
(types.TARGETS: `bitnet` / `llama` for llama.cpp; `bitnet-b1.58`, `bitnet`, `llama` for bitnet.cpp; the
embedding models' `qwen3` / `gemma3` for bitnet.cpp), streamed tensor by tensor.

The model's architecture plug-in (architectures.py) decides the graph, the stored tensors and its own keys
(stored.py says how tensors are stored and produced); this module lays them out: gguf-py's header, key/values
(the model keys every architecture shares, then the plug-in's, then the tokenizer's) and tensor infos, then the
data with its alignment padding, in one file or llama.cpp's split layout. The output pipeline
(fileio/output.py) publishes, hashes and reads ahead. The header comes before any data, so the provenance key,
stored last among the key/values, holds a placeholder the pipeline overwrites with the content hash once the
data is out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, quants
from gguf.gguf_writer import GGUFValue

from bitnet_convert.fileio import output
from bitnet_convert.fileio.output import HASH_PLACEHOLDER, Output, Plan, PlannedTensor
from bitnet_convert.formats.folder import read_from
from bitnet_convert.formats.gguf import architectures as gguf_architectures
from bitnet_convert.formats.gguf import general
from bitnet_convert.formats.gguf.bulk import BulkGGUFWriter
from bitnet_convert.formats.gguf.reader import KEY_VALUES_DOCUMENT, recorded_provenance
from bitnet_convert.formats.gguf.stored import GGUFModel, StoredTensor
from bitnet_convert.formats.gguf.types import (
    GGMLType,
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
    ROPE_DIMENSIONS,
    SPLIT_NAME,
    VALUE_LENGTH,
    VOCAB_SIZE,
    Graph,
    OutType,
)
from bitnet_convert.formats.options import count_value, size_value
from bitnet_core import validate
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.errors import ConvertError

log = logging.getLogger("bitnet_convert")
NAME = "gguf"
QUANTIZATION_VERSION = 2  # general.quantization_version of ggml's current block layouts
# Tensors made ahead of the writer while it builds the header: bounded in bytes (the 2B4T embedding comes
# first, 40 pieces of 16 MB), so peak memory stays ~0.5 GiB.
LOOKAHEAD_BYTES = 256 << 20
LOOKAHEAD_PIECES = 64


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
    plugin = gguf_architectures.writing(cfg)
    model = plugin.model(ckpt, cfg, where, target=target, outtype=outtype, embed_type=embed_type)
    stored = [] if files.vocab_only else plugin.plan(ckpt, model, where)
    return gguf_plan(ckpt, stored, model, lambda writer: plugin.model_keys(writer, model), files=files)


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


def gguf_plan(ckpt: Checkpoint, stored: list[StoredTensor], model: GGUFModel,
              own_keys: Callable[[BulkGGUFWriter], None], *, files: GGUFFiles = GGUFFiles()) -> Plan:
    """The planned tensors under the model keys (then the architecture's `own_keys(writer)`), the tokenizer and
    the provenance record (`model.record`: the writer's settings; `model.casts`: tensor -> the type it was cast
    to), in one file or in llama.cpp's split layout (`files`)."""
    record = model.record
    casts = {**(ckpt.provenance.get("tensor_casts") or {}), **model.casts}
    roundings = list(ckpt.provenance.get("multiplier_roundings") or [])
    stored_type = model.projection_type.ggml_type
    if _multiplier_source(model.projection_type, model.graph) == "in_values" and stored_type in FLOAT_ROUNDING:
        roundings.append(FLOAT_ROUNDING[stored_type])
    provenance = dict(ckpt.provenance, tensor_casts=casts, multiplier_roundings=roundings)
    if files.vocab_only:
        stored, record = [], dict(record, vocab_only=True)
    tensors = [_planned(t) for t in stored]
    shards = files.shards(tensors)
    arch = model.graph.architecture
    parameters = general.parameter_count(tensors, model.cfg)

    def keys(writer: BulkGGUFWriter) -> None:
        _add_model_keys(writer, model.graph, model.projection_type, model.cfg, ckpt, model.vocab(), own_keys,
                        parameters)
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


def _multiplier_source(projection_type: OutType, graph: Graph) -> str:
    """Where the file keeps each projection's multiplier (our KEY_MULTIPLIER_SOURCE)."""
    if projection_type.ggml_type == I2_S:
        return "i2_s_tail"
    if projection_type.ggml_type in (GGMLType.TQ1_0, GGMLType.TQ2_0):
        return "tq_block_d"  # times a `.scale` correction where the provenance's scale_corrections lists one
    return "scale_tensor" if graph.scale_tensors else "in_values"


def _add_model_keys(writer: BulkGGUFWriter, graph: Graph, projection_type: OutType, cfg, ckpt: Checkpoint, vocab,
                    extra_keys: Callable | None = None, parameters: int = 0) -> None:
    arch = graph.architecture
    general.add_to(writer, ckpt.provenance, ckpt.config, "BitNet b1.58", parameters)
    writer.add_file_type(int(projection_type.file_type))
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
    writer.add_string(KEY_MULTIPLIER_SOURCE, _multiplier_source(projection_type, graph))
    if extra_keys is not None:
        extra_keys(writer)
    if vocab is not None:
        vocab.add_to(writer)


