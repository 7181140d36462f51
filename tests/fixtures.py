"""Tiny Hugging Face checkpoints written *independently* of our HF writer.

Packing uses transformers' own `pack_weights` and files are saved with safetensors' torch API, so reader
bugs cannot cancel writer bugs. Layout names as in formats.md §2.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.torch import save_file
from transformers.integrations.bitnet import pack_weights

from bitnet_convert.checkpoint import Ternary
from bitnet_convert.tiny import tiny_checkpoint

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


def write_hf_checkpoint(path, layout: str = "autobitlinear", seed: int = 0, **config_overrides) -> Path:
    """Write a tiny model in `layout` to folder `path`; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_checkpoint(seed=seed, masters=(layout == "online"), **config_overrides)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in ckpt.materialize().items():
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
