"""Flax NNX param-tree folders: the state of `bitnet_model.BitNetForCausalLM`, one safetensors file.

    model-flax/
      config.json            Hugging Face-style config (no quantization_config)
      params.safetensors     NNX state path joined with '.' -> array
      tokenizer.json ...     tokenizer files, verbatim
      bitnet_convert.json    provenance: format version, source, revision, producer, content hash

Keys are the state paths of the model (`bitnet_model.state_names`), which mirror the Hugging Face names:

    model.embed_tokens.weight                 bf16 [V, H]       (stored dtype kept: bf16 stays bf16)
    model.layers.0.input_layernorm.weight     bf16 [H]
    model.layers.0.self_attn.q_proj.codes     int8 [out, in]    ternary codes in {-1, 0, +1}
    model.layers.0.self_attn.q_proj.multiplier  float32 []      y = (x_q @ codes.T) / s * multiplier
    ...
    model.norm.weight, lm_head.weight (untied models only)

A training checkpoint (float master weights) stores `...q_proj.weight` [out, in] instead of codes +
multiplier: the state of the model in "training" mode. Codes are int8, exactly as the model holds them, so
the file restores with nothing but safetensors and nnx (2-bit packing in memory measured 1.4-2x slower per
forward, see bitnet_model/bitlinear.py; the price is 4x larger codes on disk than HF's packed layout):

    import json, jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file
    from bitnet_model import BitNetForCausalLM, ModelConfig

    cfg = ModelConfig.from_hf(json.load(open("model-flax/config.json")))
    model = nnx.eval_shape(lambda: BitNetForCausalLM(cfg))          # mode="training" for master weights
    graphdef, state = nnx.split(model)
    stored = load_file("model-flax/params.safetensors")
    flat = [(path, jnp.asarray(stored[".".join(map(str, path))], var.dtype))   # bf16 -> float32, exact
            for path, var in nnx.to_flat_state(state)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))

(`bitnet_model.load("model-flax")` does the same with shape checks and error messages.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import integrity, validate
from ..atomic import atomic_path
from ..checkpoint import TERNARY, Checkpoint, TensorEntry, Ternary, dense_entry, ternary_entry
from ..errors import ConvertError, CorruptData
from ..names import is_projection
from .folder import hashing_progress, write_side_files
from ..safetensors_io import StoredTensor, TensorSpec, open_safetensors, write_safetensors
from bitnet_model.state_names import CODES, MULTIPLIER, dense_key, hf_name_of, ternary_keys

NAME = "flax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
_OWN_FILES = (CONFIG_FILE, PARAMS_FILE, integrity.PROVENANCE_FILE)
_METADATA = {"format": "flax-nnx", "bitnet_convert_format_version": str(FORMAT_VERSION)}


def detect(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / PARAMS_FILE).is_file() and (path / CONFIG_FILE).is_file()


# ------------------------------------------------------------------------------------------------ writing


def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True) -> Path:
    """Stream `ckpt` into a Flax folder at `out`: one tensor in memory at a time, all or nothing."""
    where = str(ckpt.provenance.get("source") or "checkpoint")
    validate.check_tensors(ckpt, where)
    specs, produce = _plan(ckpt, where)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    kinds = {entry.kind for entry in ckpt if is_projection(entry.name)}
    with atomic_path(out, force=force, directory=True) as tmp:
        with hashing_progress(specs, out, quiet) as (hasher, on_written):
            write_safetensors(tmp / PARAMS_FILE, specs, produce, _METADATA, on_written=on_written)
        record = integrity.provenance_record(
            ckpt.provenance,
            hasher.hexdigest(),
            NAME,
            format_version=FORMAT_VERSION,
            projections="ternary" if kinds == {TERNARY} else "master weights" if TERNARY not in kinds else "mixed",
        )
        write_side_files(tmp, config, ckpt.tokenizer_files, record, reserved=_OWN_FILES, where=where)
    return Path(out)


def _plan(ckpt: Checkpoint, where: str):
    """(specs in file order, produce(spec) -> array): a ternary entry is loaded once for its two tensors."""
    specs: list[TensorSpec] = []
    producers = {}
    for entry in ckpt:
        if entry.kind == TERNARY:
            codes_key, multiplier_key = ternary_keys(entry.name)
            pending: dict[str, Ternary] = {}
            specs += [TensorSpec(codes_key, np.int8, entry.shape), TensorSpec(multiplier_key, np.float32, ())]
            producers[codes_key] = _codes_producer(entry, pending, where)
            producers[multiplier_key] = _multiplier_producer(entry, pending, where)
        else:
            specs.append(TensorSpec(dense_key(entry.name), entry.dtype, entry.shape))
            producers[dense_key(entry.name)] = _dense_producer(entry, where)
    return specs, lambda spec: producers[spec.name]()


def _codes_producer(entry: TensorEntry, pending: dict, where: str):
    def produce() -> np.ndarray:
        value = entry.load()
        if not isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name} was listed as ternary but loaded a plain array")
        codes = np.asarray(value.codes)
        if codes.size and (codes.min() < -1 or codes.max() > 1):  # in the codes' own dtype: no wrapping cast
            raise CorruptData(f"{where}: tensor {entry.name} holds codes outside {{-1, 0, +1}}")
        pending["multiplier"] = value.multiplier
        return codes.astype(np.int8, copy=False)

    return produce


def _multiplier_producer(entry: TensorEntry, pending: dict, where: str):
    def produce() -> np.ndarray:
        multiplier = np.float32(pending.pop("multiplier"))
        if not np.isfinite(multiplier):
            raise CorruptData(f"{where}: tensor {entry.name} has a non-finite multiplier {multiplier}")
        return np.asarray(multiplier, np.float32)

    return produce


def _dense_producer(entry: TensorEntry, where: str):
    def produce() -> np.ndarray:
        value = entry.load()
        if isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name}: expected a plain array, loaded ternary codes")
        return np.asarray(value)

    return produce


# ------------------------------------------------------------------------------------------------ reading


def read(path: str, *, revision: str | None = None) -> Checkpoint:
    """Lazily read a Flax folder: tensors are memory-mapped and load on demand."""
    folder = Path(path)
    if revision is not None:
        raise ConvertError(f"{path}: --revision applies to Hugging Face hub sources only")
    if not detect(folder):
        raise ConvertError(f"{path}: not a Flax folder (needs {CONFIG_FILE} and {PARAMS_FILE})")
    config = _read_json(folder / CONFIG_FILE)
    config.pop("quantization_config", None)
    params = open_safetensors(folder / PARAMS_FILE)
    where = str(params.path)
    entries = _entries(params.tensors, where)
    provenance = integrity.reader_provenance(NAME, folder, recorded_provenance(folder), source=str(folder.resolve()))
    tokenizer = {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in _OWN_FILES and not p.name.startswith(".")
    }
    ckpt = Checkpoint(config, entries, tokenizer_files=tokenizer, provenance=provenance)
    validate.check_tensors(ckpt, where)
    return ckpt


def _entries(stored: dict[str, StoredTensor], where: str) -> dict[str, TensorEntry]:
    """HF name -> entry, in file order: `X.codes` + `X.multiplier` pairs become one Ternary entry."""
    entries: dict[str, TensorEntry] = {}
    for key, tensor in stored.items():
        name, role = hf_name_of(key)
        if role == MULTIPLIER:
            if ternary_keys(name)[0] not in stored:
                raise ConvertError(f"{where}: {key} has no {ternary_keys(name)[0]} beside it")
            continue  # read with its codes
        if name in entries:
            raise ConvertError(f"{where}: tensor {name} is stored twice (as codes and as {key})")
        if role == CODES:
            multiplier_key = ternary_keys(name)[1]
            if multiplier_key not in stored:
                raise ConvertError(f"{where}: {key} has no {multiplier_key} beside it")
            entries[name] = _ternary_entry(name, tensor, stored[multiplier_key], where)
        else:
            entries[name] = dense_entry(name, tensor.shape, tensor.dtype, tensor.array)
    return entries


def _ternary_entry(name: str, codes: StoredTensor, multiplier: StoredTensor, where: str) -> TensorEntry:
    if codes.dtype != np.int8 or len(codes.shape) != 2:
        raise ConvertError(f"{where}: {codes.name} is {codes.dtype}{list(codes.shape)}, expected int8 [out, in]")
    if multiplier.dtype != np.float32 or multiplier.shape != ():
        raise ConvertError(f"{where}: {multiplier.name} is {multiplier.dtype}{list(multiplier.shape)}, expected float32 []")
    value = np.float32(multiplier.array())
    if not (np.isfinite(value) and value > 0):
        raise CorruptData(f"{where}: {multiplier.name} is not a finite positive number ({value})")

    def load() -> Ternary:
        array = codes.array()
        if array.size and (array.min() < -1 or array.max() > 1):
            raise CorruptData(f"{where}: {codes.name} holds codes outside {{-1, 0, +1}}")
        return Ternary(array, value)

    return ternary_entry(name, codes.shape, load)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return value


# ------------------------------------------------------------------------------------------- inspection


def stored_tensor_bytes(path) -> Iterator[tuple[str, memoryview]]:
    """Each tensor's stored bytes in file order (what `write` hashed)."""
    for tensor in open_safetensors(Path(path) / PARAMS_FILE):
        yield tensor.name, tensor.raw()


def recorded_provenance(path) -> dict | None:
    record = Path(path) / integrity.PROVENANCE_FILE
    return _read_json(record) if record.is_file() else None
