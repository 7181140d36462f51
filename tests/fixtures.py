"""Tiny Hugging Face checkpoints written *independently* of our HF writer.

Packing uses transformers' own `pack_weights` and files are saved with safetensors' torch API, so reader
bugs cannot cancel writer bugs. Layout names as in docs/formats.md §2.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.torch import save_file
from transformers.integrations.bitnet import pack_weights

from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Ternary

QUANT_CONFIGS = {
    "autobitlinear": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
    "bitlinear": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
    "online": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
}
LAYOUTS = tuple(QUANT_CONFIGS)


def _torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


# Multipliers of 2B4T's size (mean|W| of its masters is ~1.5): a random model with them is chaotic, and one
# int8 rounding tie moves its logits by percents (docs/formats.md §11). tiny_checkpoint's ~1/sqrt(fan-in) is stable.
CHAOTIC_MULTIPLIERS = (1.3, 1.7)


def chaotic(values: dict, seed: int) -> dict:
    """The same model with 2B4T-sized multipliers (bf16-exact) or master weights of that mean |W|."""
    rng = np.random.default_rng(seed + 1000)
    out = {}
    for name, value in values.items():
        target = np.float32(np.float32(rng.uniform(*CHAOTIC_MULTIPLIERS)).astype(ml_dtypes.bfloat16))
        if isinstance(value, Ternary):
            out[name] = Ternary(value.codes, target)
        elif name.endswith("_proj.weight"):  # bf16 masters
            masters = value.astype(np.float32)
            out[name] = (masters * (target / np.mean(np.abs(masters)))).astype(ml_dtypes.bfloat16)
        else:
            out[name] = value
    return out


def write_hf_checkpoint(path, layout: str = "autobitlinear", seed: int = 0, *, is_chaotic: bool = False,
                        **config_overrides) -> Path:
    """Write a tiny model in `layout` to folder `path` (2B4T-sized multipliers with `is_chaotic`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_checkpoint(seed=seed, masters=(layout == "online"), **config_overrides)
    values = ckpt.materialize()
    if is_chaotic:
        values = chaotic(values, seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        if isinstance(value, Ternary):
            tensors[name] = pack_weights(torch.from_numpy(value.codes.astype(np.float32)))
            scale = value.multiplier if layout == "autobitlinear" else np.float32(1.0) / value.multiplier
            tensors[name.replace(".weight", ".weight_scale")] = torch.tensor([float(scale)], dtype=torch.bfloat16)
        else:
            tensors[name] = _torch(value)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = dict(ckpt.config, quantization_config=QUANT_CONFIGS[layout])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for fname, data in ckpt.tokenizer_files.items():
        (path / fname).write_bytes(data)
    return path
