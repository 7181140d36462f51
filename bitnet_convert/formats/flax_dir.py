"""Flax NNX param-tree folders: the state of `bitnet_model.BitNetForCausalLM`, one safetensors file.

    model-flax/
      config.json            Hugging Face-style config (no quantization_config)
      params.safetensors     NNX state path joined with '.' -> array
      tokenizer.json ...     tokenizer files, verbatim
      bitnet_convert.json    provenance: format version, source, revision, producer, content hash

Keys are the state paths of the model (`bitnet_model.state_names`), which mirror the Hugging Face names:

    model.embed_tokens.weight                   bf16 [V, H]       (stored dtype kept: bf16 stays bf16)
    model.layers.0.input_layernorm.weight       bf16 [H]
    model.layers.0.self_attn.q_proj.packed      uint8 [out/4, in] ternary codes, 2-bit packed (below)
    model.layers.0.self_attn.q_proj.multiplier  float32 []        y = (x_q @ T.T) / s * multiplier
    ...
    model.norm.weight, lm_head.weight (untied models only)

`packed` is exactly what the model holds (bitnet_model/bitlinear.py, packed.py): byte (r, i) holds code
`T[4r + k, i] + 1` in bits 2k..2k+1, four consecutive output rows per byte; codes 0, 1, 2 mean -1, 0, +1 and
code 3 is invalid (the reader refuses it). The same size as HF's packing, with a different row grouping (HF:
rows k*R + r share a byte); writing from HF regroups the bytes (codecs/rows4.py) without making int8 codes.
Projections need out % 4 == 0 (every BitNet shape); other widths are refused.

A training checkpoint (float master weights) stores `...q_proj.weight` [out, in] instead of packed codes +
multiplier: the state of the model in "training" mode. The file restores with nothing but safetensors and nnx:

    import json, jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file
    from bitnet_core.config import ModelConfig
    from bitnet_model import BitNetForCausalLM

    cfg = ModelConfig.from_hf(json.load(open("model-flax/config.json")))
    model = nnx.eval_shape(lambda: BitNetForCausalLM(cfg))          # mode="training" for master weights
    graphdef, state = nnx.split(model)
    stored = load_file("model-flax/params.safetensors")
    flat = [(path, jnp.asarray(stored[".".join(map(str, path))], var.dtype))   # bf16 -> float32, exact
            for path, var in nnx.to_flat_state(state)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))

(`bitnet_convert.load_model("model-flax")` does the same with shape checks, code checks and error messages.)

Format version 2 (this one) stores packed codes; version 1 stored int8 `...codes` [out, in] (4x larger) and is
refused with a message saying to convert again from the source: a version-1 folder is a derived file, and
its int8 codes match no state of the current model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bitnet_convert.fileio import integrity, output
from bitnet_convert.fileio.output import Plan
from bitnet_convert.fileio.safetensors_io import (
    StoredTensor,
    TensorSpec,
    open_safetensors,
)
from bitnet_convert.fileio.sources import SourceWatch, read_json_file
from bitnet_convert.formats import tokenizer_files
from bitnet_convert.formats.folder import (
    dense_producer,
    is_tokenizer_file,
    read_from,
    recorded_provenance,
    safetensors_folder,
    side_files,
    stored_folder_model,
    warn_not_carried,
)
from bitnet_core import validate
from bitnet_core.checkpoint import (
    TERNARY,
    Checkpoint,
    PackedLoader,
    PackedTernary,
    TensorEntry,
    Ternary,
    dense_entry,
    ternary_entry,
)
from bitnet_core.codecs import hf2bit, rows4
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_core.names import (
    MULTIPLIER,
    PACKED,
    POOLING_CONFIG_FILE,
    dense_key,
    hf_name_of,
    is_projection,
    ternary_keys,
)
from bitnet_core.quantize import check_multiplier, projection_bytes

NAME = "flax"
FORMAT_VERSION = 2  # 1: int8 `...codes` [out, in] (refused on read, see the module docstring)
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
_OWN_FILES = (CONFIG_FILE, PARAMS_FILE, integrity.PROVENANCE_FILE)
_VERSION_KEY = "bitnet_convert_format_version"
_METADATA = {"format": "flax-nnx", _VERSION_KEY: str(FORMAT_VERSION)}
_V1_CODES = ".codes"  # version 1's projection leaf


def detect(path: Path) -> bool:
    path = Path(path)
    # lexists, not is_file: a FIFO named params.safetensors is refused by the reader, by name
    return path.is_dir() and os.path.lexists(path / PARAMS_FILE) and os.path.lexists(path / CONFIG_FILE)


# ------------------------------------------------------------------------------------------------ writing


WRITER_OPTIONS = {}  # nothing to choose: one layout


def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True) -> Path:
    """`plan` written to `out` by the output pipeline (fileio/output.py)."""
    return output.write(plan(ckpt), out, force=force, quiet=quiet)


def plan(ckpt: Checkpoint, *, metadata: dict | None = None) -> Plan:
    """A Flax folder: one params.safetensors, streamed one tensor at a time; `metadata` as hf.plan's."""
    where = read_from(ckpt)  # the file read, not the model it first came from: what the user gave
    validate.check_tensors(ckpt, where)
    specs, produce = _plan(ckpt, where)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    kinds = {entry.kind for entry in ckpt if is_projection(entry.name)}
    side = side_files(config, ckpt.tokenizer_files, reserved=_OWN_FILES, where=where)
    record = dict(format_version=FORMAT_VERSION,
                  projections="ternary" if kinds == {TERNARY} else "master weights" if TERNARY not in kinds else "mixed")
    return safetensors_folder(NAME, [(PARAMS_FILE, specs)], produce, _METADATA, side, ckpt.provenance, record,
                              metadata)


def _plan(ckpt: Checkpoint, where: str):
    """(specs in file order, produce(spec) -> array): a ternary entry is loaded once for its two tensors."""
    specs: list[TensorSpec] = []
    producers = {}
    for entry in ckpt:
        if entry.kind == TERNARY:
            if len(entry.shape) != 2 or not rows4.packable(entry.shape[0]):
                raise ConvertError(f"{where}: tensor {entry.name} has shape {list(entry.shape)}: the Flax format packs "
                                   "4 output rows per byte and needs [out, in] with out a multiple of 4")
            packed_key, multiplier_key = ternary_keys(entry.name)
            pending: dict[str, np.float32] = {}
            packed_shape = (entry.shape[0] // rows4.VALUES_PER_BYTE, entry.shape[1])
            specs += [TensorSpec(packed_key, np.uint8, packed_shape), TensorSpec(multiplier_key, np.float32, ())]
            producers[packed_key] = _packed_producer(entry, pending, where)
            producers[multiplier_key] = _multiplier_producer(entry, pending, where)
        else:
            specs.append(TensorSpec(dense_key(entry.name), entry.dtype, entry.shape))
            producers[dense_key(entry.name)] = dense_producer(entry, where)
    return specs, lambda spec: producers[spec.name]()


def _packed_producer(entry: TensorEntry, pending: dict, where: str):
    def produce() -> np.ndarray:
        packed, pending["multiplier"] = projection_bytes(entry, rows4.from_hf2bit, rows4.pack, where)
        return packed

    return produce


def _multiplier_producer(entry: TensorEntry, pending: dict, where: str):
    return lambda: np.asarray(pending.pop("multiplier"), np.float32)  # checked by projection_bytes


# ------------------------------------------------------------------------------------------------ reading


def read(path: str, *, revision: str | None = None) -> Checkpoint:
    """Lazily read a Flax folder: each tensor is read on demand, through the one descriptor held for the file."""
    folder = Path(path)
    if revision is not None:
        raise ConvertError(f"{path}: --revision applies to Hugging Face hub sources only")
    if not detect(folder):
        raise ConvertError(f"{path}: not a Flax folder (needs {CONFIG_FILE} and {PARAMS_FILE})")
    watch = SourceWatch()  # every file read below, checked again after each tensor load
    config = read_json_file(watch, folder / CONFIG_FILE, "config file")
    config.pop("quantization_config", None)
    params = open_safetensors(folder / PARAMS_FILE, watch)
    where = str(params.path)
    _check_version(params.metadata, params.tensors, where)
    entries = watch.guard(_entries(params.tensors, where))
    provenance = integrity.reader_provenance(NAME, folder, recorded_provenance(folder), source=str(folder.resolve()))
    # Only the known tokenizer files are read (each bounded); any other file stays behind unread, named in a
    # warning: a stray 256 MiB file is neither loaded nor a reason to refuse the model.
    others = [p for p in sorted(folder.iterdir())
              if p.is_file() and p.name not in _OWN_FILES and not p.name.startswith(".")]
    tokenizer = {p.name: watch.read_side_file(p, "tokenizer file") for p in others if is_tokenizer_file(p.name)}
    warn_not_carried(folder, [p.name for p in others if not is_tokenizer_file(p.name)])
    if (folder / POOLING_CONFIG_FILE).is_file():  # sentence-transformers' pooling config, in its own folder
        tokenizer[POOLING_CONFIG_FILE] = watch.read_side_file(folder / POOLING_CONFIG_FILE, "pooling config")
    tokenizer_files.check(tokenizer, lambda name: str(folder / name))
    ckpt = Checkpoint(config, entries, tokenizer_files=tokenizer, provenance=provenance)
    validate.check_tensors(ckpt, where)
    return ckpt


def _check_version(metadata: dict[str, str], stored: dict[str, StoredTensor], where: str) -> None:
    """Refuse folders of another format version (a missing version, as from the plain-safetensors recipe, is
    read as this one; version 1 is also recognized by its `.codes` leaves)."""
    version = metadata.get(_VERSION_KEY, str(FORMAT_VERSION))
    if version == "1" or any(key.endswith(_V1_CODES) for key in stored):
        raise ConvertError(
            f"{where}: a version-1 Flax folder (int8 `...codes` [out, in]); this bitnet-convert reads version "
            f"{FORMAT_VERSION} (2-bit `...packed` [out/4, in]). Convert the model again from its source "
            "(e.g. `bitnet-convert hf-to-flax SRC OUT`), or read it with a bitnet-convert older than format 2"
        )
    if version != str(FORMAT_VERSION):
        raise ConvertError(f"{where}: Flax format version {version!r}; this bitnet-convert reads version {FORMAT_VERSION}")


def _entries(stored: dict[str, StoredTensor], where: str) -> dict[str, TensorEntry]:
    """HF name -> entry, in file order: `X.packed` + `X.multiplier` pairs become one Ternary entry."""
    entries: dict[str, TensorEntry] = {}
    for key, tensor in stored.items():
        name, role = hf_name_of(key)
        if role == MULTIPLIER:
            if ternary_keys(name)[0] not in stored:
                raise ConvertError(f"{where}: {key} has no {ternary_keys(name)[0]} beside it")
            continue  # read with its packed codes
        if name in entries:
            raise ConvertError(f"{where}: tensor {name} is stored twice (as packed codes and as {key})")
        if role == PACKED:
            multiplier_key = ternary_keys(name)[1]
            if multiplier_key not in stored:
                raise ConvertError(f"{where}: {key} has no {multiplier_key} beside it")
            entries[name] = _ternary_entry(name, tensor, stored[multiplier_key], where)
        else:
            entries[name] = dense_entry(name, tensor.shape, tensor.dtype, tensor.read)  # a copy: see SourceWatch
    return entries


def _ternary_entry(name: str, packed: StoredTensor, multiplier: StoredTensor, where: str) -> TensorEntry:
    if packed.dtype != np.uint8 or len(packed.shape) != 2 or 0 in packed.shape:
        raise ConvertError(f"{where}: {packed.name} is {packed.dtype}{list(packed.shape)}, expected uint8 [out/4, in]")
    if multiplier.dtype != np.float32 or multiplier.shape != ():
        raise ConvertError(f"{where}: {multiplier.name} is {multiplier.dtype}{list(multiplier.shape)}, expected float32 []")
    value = check_multiplier(multiplier.read(), f"{where}: {multiplier.name}")
    label = f"{where}: tensor {packed.name}"

    def load() -> Ternary:
        try:
            return Ternary(rows4.unpack(packed.read()), value)
        except CorruptData as exc:  # code 3
            raise CorruptData(f"{label}: {exc}") from None

    def load_packed() -> PackedTernary:
        # Offered in HF's layout, the packed form the npz and GGUF writers (and the model loader) transcode from:
        # regrouping the fields is cheaper than unpacking to int8 codes, and it checks for code 3 on the way.
        try:
            data = rows4.to_hf2bit(packed.read())
        except CorruptData as exc:
            raise CorruptData(f"{label}: {exc}") from None
        return PackedTernary(hf2bit.LAYOUT, data, value, label)

    out_features = packed.shape[0] * rows4.VALUES_PER_BYTE
    return ternary_entry(name, (out_features, packed.shape[1]), PackedLoader(load, load_packed), value)


# ------------------------------------------------------------------------------------------- inspection


def stored_tensor_bytes(path) -> integrity.StoredModel:
    """What the content hash covers: each tensor as stored, in file order, config.json and the tokenizer files."""
    return stored_folder_model(Path(path), [open_safetensors(Path(path) / PARAMS_FILE)])


