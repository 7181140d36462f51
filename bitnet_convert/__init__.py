"""bitnet-convert: move BitNet b1.58 checkpoints between formats and prove nothing was lost.

The Python API (bitnet_convert/api.py) is the CLI's arguments as functions:
`convert`, `read`, `write`, `verify`, `inspect`, `load_model`, `generate`, `embed`. They are imported on first use, so
`import bitnet_convert` stays cheap and pulls in neither JAX nor torch.
"""

from __future__ import annotations

import importlib

from bitnet_core import __version__

_API = ("ConvertError", "Generated", "convert", "embed", "generate", "inspect", "load_model", "read", "verify", "write")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("bitnet_convert.api"), name)
    raise AttributeError(f"module 'bitnet_convert' has no attribute {name!r}")
