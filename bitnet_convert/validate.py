"""Check a checkpoint's tensors against its config before anything is written or run."""

from __future__ import annotations

import dataclasses

import numpy as np

from bitnet_model.config import ConfigError, ModelConfig

from .checkpoint import TERNARY, Checkpoint, TensorEntry, Ternary
from .errors import ConvertError, CorruptData
from .names import expected_tensors


def model_config(config: dict, where: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf(config)
    except ConfigError as exc:
        raise ConvertError(f"{where}: {exc}") from None


def check_tensors(ckpt: Checkpoint, where: str) -> ModelConfig:
    """Raise ConvertError naming `where` on a missing/extra tensor or a shape/kind that disagrees with config."""
    cfg = model_config(ckpt.config, where)
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        raise ConvertError(f"{where}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in ckpt.tensors if n not in expected]
    if extra:
        raise ConvertError(f"{where}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, (shape, kind) in expected.items():
        entry = ckpt.tensors[name]
        if tuple(entry.shape) != tuple(shape):
            raise ConvertError(f"{where}: tensor {name} has shape {list(entry.shape)}, config says {list(shape)}")
        if kind == "dense" and entry.kind != "dense":
            raise ConvertError(f"{where}: tensor {name} should be a plain array, found ternary")
    return cfg


def check_loaded(entry: TensorEntry, value, where: str) -> None:
    """Raise if a loaded value is not what its entry promised, or is a ternary weight no writer produces.

    A multiplier is mean|W| of the master weights: finite and positive. NaN, infinite, zero or negative ones
    are refused here, whichever reader produced them, so no command ever writes or runs them.
    """
    if entry.kind == TERNARY:
        if not isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name} should load as ternary codes, got {type(value).__name__}")
        shape, multiplier = value.shape, value.multiplier
        if not (np.isfinite(multiplier) and multiplier > 0):
            raise CorruptData(f"{where}: tensor {entry.name} has the multiplier {multiplier} "
                              "(expected a finite positive number)")
    else:
        if isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name} should load as a plain array, got ternary codes")
        shape = tuple(np.shape(value))
    if tuple(shape) != tuple(entry.shape):
        raise CorruptData(f"{where}: tensor {entry.name} loaded with shape {list(shape)}, expected {list(entry.shape)}")


def checked(ckpt: Checkpoint, where: str) -> Checkpoint:
    """The same checkpoint, each of whose entries runs `check_loaded` on what it loads (the registry's guard)."""

    def guard(entry: TensorEntry) -> TensorEntry:
        def load():
            value = entry.load()
            check_loaded(entry, value, where)
            return value

        return dataclasses.replace(entry, load=load)

    return dataclasses.replace(ckpt, tensors={name: guard(e) for name, e in ckpt.tensors.items()})
