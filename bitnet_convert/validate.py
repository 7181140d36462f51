"""Check a checkpoint's tensors against its config before anything is written or run."""

from __future__ import annotations

import dataclasses

import numpy as np

from bitnet_model.config import ConfigError, ModelConfig

from .checkpoint import TERNARY, Checkpoint, PackedLoader, PackedTernary, TensorEntry, Ternary
from .codecs import hf2bit
from .errors import ConvertError, CorruptData
from .names import expected_tensors


# Far beyond any real model; a corrupt or hostile config.json claiming more would make `expected_tensors`
# list billions of names (it loops over the layers) before the tensors could disprove it.
MAX_LAYERS = 4096
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")


def model_config(config: dict, where: str) -> ModelConfig:
    """The model's hyper-parameters, refused with `where` named unless they can describe a real model."""
    try:
        cfg = ModelConfig.from_hf(config)
    except ConfigError as exc:
        raise ConvertError(f"{where}: {exc}") from None
    except ZeroDivisionError:  # head_dim derived as hidden_size // num_attention_heads
        raise ConvertError(f"{where}: num_attention_heads is 0") from None
    for name in _SIZES:
        if getattr(cfg, name) <= 0:
            raise ConvertError(f"{where}: {name} is {getattr(cfg, name)}, expected a positive integer")
    if cfg.num_hidden_layers > MAX_LAYERS:
        raise ConvertError(f"{where}: num_hidden_layers is {cfg.num_hidden_layers}, more than any real model "
                           f"(at most {MAX_LAYERS})")
    for name in ("rms_norm_eps", "rope_theta"):
        value = getattr(cfg, name)
        if not (np.isfinite(value) and value > 0):
            raise ConvertError(f"{where}: {name} is {value}, expected a finite positive number")
    return cfg


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


def check_packed(entry: TensorEntry, value: PackedTernary, where: str) -> None:
    """`check_loaded` for a weight handed out as stored: the multiplier, and the packed shape of its layout
    (its codes are checked by the codec that reads them)."""
    multiplier = value.multiplier
    if not (np.isfinite(multiplier) and multiplier > 0):
        raise CorruptData(f"{where}: tensor {entry.name} has the multiplier {multiplier} "
                          "(expected a finite positive number)")
    if value.layout != "hf2bit" or len(entry.shape) != 2:
        raise ConvertError(f"{where}: tensor {entry.name}: unknown packed layout {value.layout!r}")
    expected = (hf2bit.packed_rows(entry.shape[0]), entry.shape[1])
    if value.data.dtype != np.uint8 or tuple(value.data.shape) != expected:
        raise CorruptData(f"{where}: tensor {entry.name} loaded packed as {value.data.dtype}{list(value.data.shape)}, "
                          f"expected uint8{list(expected)}")


def checked(ckpt: Checkpoint, where: str) -> Checkpoint:
    """The same checkpoint, each of whose entries runs `check_loaded` on what it loads (the registry's guard)."""

    def guard(entry: TensorEntry) -> TensorEntry:
        def load():
            value = entry.load()
            check_loaded(entry, value, where)
            return value

        packed = entry.load_packed
        if packed is None:
            return dataclasses.replace(entry, load=load)

        def load_packed() -> PackedTernary:
            value = packed()
            check_packed(entry, value, where)
            return value

        return dataclasses.replace(entry, load=PackedLoader(load, load_packed))

    return dataclasses.replace(ckpt, tensors={name: guard(e) for name, e in ckpt.tensors.items()})
