"""Check a checkpoint's tensors against its config before anything is written or run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from bitnet_core.checkpoint import (
    TERNARY,
    Checkpoint,
    PackedLoader,
    PackedTernary,
    RowsLoader,
    TensorEntry,
    Ternary,
)
from bitnet_core.codecs import hf2bit
from bitnet_core.config import ConfigError, ModelConfig
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_core.names import expected_tensors
from bitnet_core.quantize import check_multiplier

# Far beyond any real model; a corrupt or hostile config.json claiming more would make `expected_tensors`
# list billions of names (it loops over the layers) before the tensors could disprove it.
MAX_LAYERS = 4096
# Every size must fit the JAX model's int32 shapes and GGUF's u32 keys (a context of 2^33 fits neither).
MAX_SIZE = 2**31 - 1
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")
_REALS = ("rms_norm_eps", "rope_theta")  # float32 in the model and in GGUF
_F32_MAX = float(np.finfo(np.float32).max)


def unicode_text(text: str, what: str) -> str:
    """`text` when it is Unicode a tokenizer can take; a lone surrogate (a byte of the command line the locale
    could not decode) is one error naming `what` and where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConvertError(f"{what} is not Unicode text (character {exc.start} is {text[exc.start]!r}: a byte the "
                           "locale's encoding could not decode?)") from None
    return text


def model_config(config: dict, where: str) -> ModelConfig:
    """The model's hyper-parameters, refused with `where` named unless they can describe a real model.

    The one place that says which values a config may hold: every reader calls it at read time, so a bad
    field stops the command before anything is converted or run, naming the file it came from."""
    try:
        cfg = ModelConfig.from_hf(config)
    except ConfigError as exc:
        raise ConvertError(f"{where}: {exc}") from None
    for name in _SIZES:
        _check_size(name, getattr(cfg, name), where)
    if cfg.num_hidden_layers > MAX_LAYERS:
        raise ConvertError(f"{where}: num_hidden_layers is {cfg.num_hidden_layers}, more than any real model "
                           f"(at most {MAX_LAYERS})")
    _check_attention(cfg, where)
    for name in _REALS:
        _check_real(name, getattr(cfg, name), where)
    _check_token_ids(cfg, where)
    for name in ("query_pre_attn_scalar", "rope_local_theta"):
        if getattr(cfg, name) is not None:
            _check_real(name, getattr(cfg, name), where)
    if cfg.sliding_window is not None:
        _check_size("sliding_window", cfg.sliding_window, where)
    return cfg


def _check_size(name: str, value: int, where: str) -> None:
    if value <= 0:
        raise ConvertError(f"{where}: {name} is {value}, expected a positive integer")
    if value > MAX_SIZE:
        raise ConvertError(f"{where}: {name} is {value}, more than fits a 32-bit size (at most {MAX_SIZE})")


def _check_attention(cfg: ModelConfig, where: str) -> None:
    """Grouped-query attention shares each K/V head among a whole number of query heads, and rotate-half RoPE
    pairs the two halves of a head: both fail deep inside a run (a JaxRuntimeError in generate) otherwise."""
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConvertError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                           f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.head_dim % 2:
        raise ConvertError(f"{where}: head_dim is {cfg.head_dim}; rotary embeddings need an even head_dim")


def _check_real(name: str, value: float, where: str) -> None:
    if not (np.isfinite(value) and value > 0):
        raise ConvertError(f"{where}: {name} is {value}, expected a finite positive number")
    if value > _F32_MAX:
        raise ConvertError(f"{where}: {name} is {value}, beyond the float32 range the model computes in")
    if np.float32(value) == 0:
        raise ConvertError(f"{where}: {name} is {value}, which is 0 in the float32 the model computes in")


def _check_token_ids(cfg: ModelConfig, where: str) -> None:
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else [cfg.eos_token_id]
    for name, ids in (("bos_token_id", [cfg.bos_token_id]), ("eos_token_id", eos)):
        for token in ids:
            if token is not None and not 0 <= token < cfg.vocab_size:
                raise ConvertError(f"{where}: {name} is {token}, outside the vocabulary (ids 0.."
                                   f"{cfg.vocab_size - 1})")


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
        shape = value.shape
        check_multiplier(value.multiplier, f"{where}: tensor {entry.name}")
    else:
        if isinstance(value, Ternary):
            raise ConvertError(f"{where}: tensor {entry.name} should load as a plain array, got ternary codes")
        shape = tuple(np.shape(value))
    if tuple(shape) != tuple(entry.shape):
        raise CorruptData(f"{where}: tensor {entry.name} loaded with shape {list(shape)}, expected {list(entry.shape)}")


def check_rows(entry: TensorEntry, value: np.ndarray, start: int, stop: int, where: str) -> None:
    """`check_loaded` for rows [start, stop) of a DENSE entry."""
    shape = tuple(np.shape(value))
    expected = (stop - start, *entry.shape[1:])
    if not 0 <= start <= stop <= (entry.shape[0] if entry.shape else 0) or shape != expected:
        raise CorruptData(f"{where}: tensor {entry.name} rows {start}:{stop} loaded with shape {list(shape)}, "
                          f"expected {list(expected)}")


def check_packed(entry: TensorEntry, value: PackedTernary, where: str) -> None:
    """`check_loaded` for a weight handed out as stored: the multiplier, and the packed shape of its layout
    (its codes are checked by the codec that reads them)."""
    check_multiplier(value.multiplier, f"{where}: tensor {entry.name}")
    if value.layout != "hf2bit" or len(entry.shape) != 2:
        raise ConvertError(f"{where}: tensor {entry.name}: unknown packed layout {value.layout!r}")
    expected = (hf2bit.packed_rows(entry.shape[0]), entry.shape[1])
    if value.data.dtype != np.uint8 or tuple(value.data.shape) != expected:
        raise CorruptData(f"{where}: tensor {entry.name} loaded packed as {value.data.dtype}{list(value.data.shape)}, "
                          f"expected uint8{list(expected)}")


def checked(ckpt: Checkpoint, where: str) -> Checkpoint:
    """The same checkpoint, each of whose entries runs `check_loaded` on what it loads (the registry's guard)."""

    def guard(entry: TensorEntry) -> TensorEntry:
        return after_each_load(entry, lambda value: check_loaded(entry, value, where),
                               lambda value: check_packed(entry, value, where),
                               lambda value, start, stop: check_rows(entry, value, start, stop, where))

    return dataclasses.replace(ckpt, tensors={name: guard(e) for name, e in ckpt.tensors.items()})


def after_each_load(entry: TensorEntry, after_load: Callable[[Any], None],
                    after_packed: Callable[[PackedTernary], None],
                    after_rows: Callable[[np.ndarray, int, int], None] | None = None) -> TensorEntry:
    """The same entry, whose `load` runs `after_load(value)` before returning, whose packed form (if it offers
    one) runs `after_packed(value)` and whose rows (if it offers them) `after_rows(value, start, stop)`: the one
    way to wrap loads without losing `load_packed` / `load_rows` (without `after_rows` the rows are dropped)."""

    def load():
        value = entry.load()
        after_load(value)
        return value

    rows, mapped = entry.load_rows, entry.load_mapped
    if rows is not None and after_rows is not None:
        def load_rows(start: int, stop: int) -> np.ndarray:
            value = rows(start, stop)
            after_rows(value, start, stop)
            return value

        def load_mapped() -> np.ndarray:  # the whole tensor: checked as a load is
            value = mapped()
            after_load(value)
            return value

        return dataclasses.replace(entry, load=RowsLoader(load, load_rows, load_mapped if mapped else None))
    packed = entry.load_packed
    if packed is None:
        return dataclasses.replace(entry, load=load)

    def load_packed() -> PackedTernary:
        value = packed()
        after_packed(value)
        return value

    return dataclasses.replace(entry, load=PackedLoader(load, load_packed))
