"""Optional dependencies: import one, or say in one line which extra of the package brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from bitnet_core.errors import ConvertError

# module -> the extra of `pip install 'bitnet-convert[EXTRA]'` that installs it
EXTRAS = {"torch": "reference", "transformers": "reference", "accelerate": "reference", "optax": "train",
          "llama_cpp": "llama", "ik_llama_cpp": "ik-llama"}


def require(module: str, purpose: str) -> ModuleType:
    """`import module`, or ConvertError("<purpose> needs <module>: pip install 'bitnet-convert[<extra>]'")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module.split(".")[0]]
        raise ConvertError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'bitnet-convert[{extra}]'") from None
