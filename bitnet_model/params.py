"""Checkpoint (bitnet_convert.checkpoint) <-> BitNetForCausalLM.

Loading builds an *abstract* model (`nnx.eval_shape`, nothing allocated), fills each leaf from the checkpoint
by the name table in `state_names`, checks every shape, collects all errors and raises them together, then
merges. Dense tensors become float32 in the model; their checkpoint dtypes are remembered on the model
(`stored_dtypes`) so that export casts them back (bf16 -> f32 -> bf16 is exact): HF -> model -> HF is bit-exact.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so np.dtype("bfloat16") works)
import numpy as np
from flax import nnx

from bitnet_core.checkpoint import (
    DENSE,
    Checkpoint,
    PackedLoader,
    PackedTernary,
    Ternary,
    dense_entry,
    ternary_entry,
)
from bitnet_core.codecs import hf2bit, rows4
from bitnet_core.errors import ConvertError
from bitnet_core.names import (
    dense_key,
    expected_tensors,
    is_projection,
    key_path,
    path_key,
    ternary_keys,
)
from bitnet_core.quantize import masters_from_ternary, packed_projection
from bitnet_core.validate import check_tensors, model_config
from bitnet_model.bitlinear import INFERENCE, MODES, TRAINING
from bitnet_model.modeling import (
    BitNetForCausalLM,
    logits,  # noqa: F401  (the jitted forward, beside the loader that makes models)
)

MAX_ERRORS_SHOWN = 5


def _where(ckpt: Checkpoint) -> str:
    prov = ckpt.provenance
    return str(prov.get("path") or prov.get("source") or "checkpoint")


def _leaves(entry, mode: str) -> dict[str, np.ndarray]:
    """State key -> host array for one checkpoint tensor, in the form `mode` holds it."""
    if not is_projection(entry.name):
        return {dense_key(entry.name): np.asarray(entry.load())}
    if mode == TRAINING:
        value = entry.load()
        master = masters_from_ternary(value) if isinstance(value, Ternary) else np.asarray(value, np.float32)
        return {dense_key(entry.name): master}
    packed_key, multiplier_key = ternary_keys(entry.name)
    packed, multiplier = packed_projection(entry)
    return {packed_key: packed, multiplier_key: np.asarray(multiplier, np.float32)}


def _nest(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def model_from_checkpoint(ckpt: Checkpoint, *, mode: str = INFERENCE) -> BitNetForCausalLM:
    """A ready model from any Checkpoint; raises ConvertError listing every missing or mis-shaped tensor.

    mode "inference": ternary projections as packed codes (uint8 [out/4, in]) + multiplier (dense master
    projections are ternarized on load, like transformers' online mode; HF and Flax sources' packed bytes are
    transcoded without int8 codes). mode "training": float32 master weights (ternary projections
    become masters that ternarize back to the same codes and multiplier, see `masters_from_ternary`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    where = _where(ckpt)
    cfg = check_tensors(ckpt, where)
    try:
        abstract = nnx.eval_shape(lambda: BitNetForCausalLM(cfg, mode=mode))
    except ValueError as exc:  # a shape the model cannot hold (BitLinear: out_features not a multiple of 4)
        raise ConvertError(f"{where}: {exc}") from None
    graphdef, state = nnx.split(abstract)
    leaves = {path: var.get_value() for path, var in nnx.to_flat_state(state)}  # path -> ShapeDtypeStruct
    filled: dict[tuple, jnp.ndarray] = {}
    errors: list[str] = []
    stored_dtypes: list[tuple[str, str]] = []
    for entry in ckpt:
        try:
            arrays = _leaves(entry, mode)
        except ConvertError as exc:
            errors.append(str(exc))
            continue
        if entry.kind == DENSE:
            stored_dtypes.append((entry.name, np.dtype(entry.dtype).name))
        for key, array in arrays.items():
            path = key_path(key)
            if path not in leaves:
                errors.append(f"tensor {entry.name}: the model has no parameter {key}")
                continue
            want = leaves[path]
            if tuple(array.shape) != tuple(want.shape):
                errors.append(f"{key} has shape {list(array.shape)}, the model expects {list(want.shape)}")
                continue
            filled[path] = jnp.asarray(array, dtype=want.dtype)  # bf16 -> f32 is exact
    if not errors:  # a missing leaf is worth reporting only when no error above already explains it
        errors = [f"nothing fills model parameter {path_key(p)}" for p in leaves if p not in filled]
    if errors:
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise ConvertError(f"{where}: " + "; ".join(errors[:MAX_ERRORS_SHOWN]) + more)
    nnx.replace_by_pure_dict(state, _nest(filled))
    model = nnx.merge(graphdef, state)
    model.stored_dtypes = tuple(stored_dtypes)
    model.hf_config_json = json.dumps(ckpt.config, sort_keys=True)
    return model


def checkpoint_from_model(
    model: BitNetForCausalLM,
    *,
    config: dict | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
    provenance: dict | None = None,
    keep_stored_dtypes: bool = True,
) -> Checkpoint:
    """The model as a lazy Checkpoint: inference models give Ternary projections, training models their dense
    float32 masters. Each tensor is copied off the device only when a writer loads it.

    Dense tensors go back to the dtype they were loaded from (`keep_stored_dtypes`, exact for a model that was
    not trained); float32 for tensors the model did not load, or for all of them when `keep_stored_dtypes` is
    False (use that after training, so updates smaller than a bf16 step survive).
    """
    if config is None:
        config = json.loads(model.hf_config_json) if model.hf_config_json else model.config.to_hf()
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg = model_config(config, "model config")
    state = {path_key(path): var for path, var in nnx.to_flat_state(nnx.state(model))}
    dtypes = dict(model.stored_dtypes) if keep_stored_dtypes else {}
    entries = {}
    for name, (shape, _kind) in expected_tensors(cfg).items():
        if is_projection(name) and model.mode == INFERENCE:
            packed_key, multiplier_key = ternary_keys(name)
            entries[name] = ternary_entry(name, shape, _ternary_loader(state[packed_key], state[multiplier_key], name))
        else:
            dtype = np.dtype(dtypes.get(name, "float32"))
            entries[name] = dense_entry(name, shape, dtype, _dense_loader(state[dense_key(name)], dtype))
    return Checkpoint(
        config,
        entries,
        tokenizer_files=dict(tokenizer_files or {}),
        provenance=dict(provenance or {"format": "bitnet_model", "source": "bitnet_model"}),
    )


def _ternary_loader(packed_var, multiplier_var, name: str) -> PackedLoader:
    """Ternary codes on demand, or 2-bit bytes in HF's layout (`load_packed`), the packed form every writer
    transcodes from: regrouping the fields costs a fraction of unpacking to int8 codes and packing again."""

    def packed() -> PackedTernary:
        data = rows4.to_hf2bit(np.asarray(packed_var.get_value(), np.uint8))
        return PackedTernary(hf2bit.LAYOUT, data, np.float32(multiplier_var.get_value()), f"model state {name}")

    def load() -> Ternary:
        data = np.asarray(packed_var.get_value(), np.uint8)
        return Ternary(rows4.unpack(data), np.float32(multiplier_var.get_value()))

    return PackedLoader(load, packed)


def _dense_loader(var, dtype):
    return lambda: np.asarray(var.get_value(), np.float32).astype(dtype)
