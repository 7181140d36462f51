"""Check a checkpoint's tensors against its config before anything is written or run."""

from __future__ import annotations

from bitnet_model.config import ConfigError, ModelConfig

from .checkpoint import Checkpoint
from .errors import ConvertError
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
