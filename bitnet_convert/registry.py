"""The hub of the hub-and-spoke converter: format name -> reader/writer module, and format detection.

Every `X-to-Y` command, `convert`, `verify` and `inspect` go through this one table.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from types import ModuleType

from . import validate
from .checkpoint import Checkpoint
from .errors import ConvertError

# format name -> (module, what it is, how an output path of this format looks)
FORMATS: dict[str, tuple[str, str]] = {
    "hf": ("bitnet_convert.formats.hf", "Hugging Face checkpoint folder (safetensors + config.json)"),
    "flax": ("bitnet_convert.formats.flax_dir", "Flax NNX param tree folder (params.safetensors + config.json)"),
    "npz": ("bitnet_convert.formats.npz", "packed-ternary .npz file (numpy only)"),
    "gguf": ("bitnet_convert.formats.gguf", "GGUF file for llama.cpp (TQ1_0/TQ2_0) or bitnet.cpp (I2_S)"),
}

# Options each writer takes beyond (ckpt, out, force, quiet): name -> (choices, default, help).
WRITER_OPTIONS: dict[str, dict[str, tuple[tuple[str, ...] | None, str | None, str]]] = {
    "hf": {"layout": (("autobitlinear", "bitlinear", "online"), "autobitlinear",
                      "projection layout: packed 2B4T (default), packed bitlinear (inverse weight_scale), or bf16 masters"),
           "scale_dtype": (("bf16", "f32"), "bf16",
                           "dtype of weight_scale: bf16 as in 2B4T, or f32 to keep any multiplier exactly")},
    "flax": {},
    "npz": {},
    "gguf": {
        "target": (("llama.cpp", "bitnet.cpp"), "llama.cpp", "runtime the file is for"),
        "outtype": (("tq1_0", "tq2_0", "i2_s", "f16", "bf16", "f32"), None,
                    "projection type (default: tq2_0 for llama.cpp, i2_s for bitnet.cpp)"),
        "embed_type": (("f16", "bf16", "f32", "q8_0"), "f16", "token embedding type"),
    },
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ConvertError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return importlib.import_module(FORMATS[name][0])


def detect_input_format(path: str) -> str:
    """Which format an existing path (or a hub repo id) holds."""
    p = Path(path)
    if not p.exists():
        if _HUB_ID.match(path) and not path.startswith((".", "/")):
            return "hf"  # a hub repo id, resolved by the hf reader
        raise ConvertError(f"{path}: no such file or folder")
    for name in ("gguf", "npz", "flax", "hf"):  # flax before hf: both are folders with config.json
        if format_module(name).detect(p):
            return name
    if p.is_dir() and not (p / "config.json").exists():
        raise ConvertError(f"{path}: folder has no config.json (not a checkpoint this tool reads)")
    raise ConvertError(f"{path}: not a format this tool reads ({', '.join(FORMATS)})")


def infer_output_format(path: str) -> str:
    """Format of an output path by its name: *.gguf, *.npz, *.flax / *-flax / *_flax folders; other folders hf."""
    name = Path(path).name.lower()
    if name.endswith(".gguf"):
        return "gguf"
    if name.endswith(".npz"):
        return "npz"
    if re.search(r"[._-]flax$", name):
        return "flax"
    if "." in name and not re.search(r"[._-]hf$", name):
        raise ConvertError(f"{path}: cannot tell the output format from the name (use --to {'|'.join(FORMATS)})")
    return "hf"


def read_checkpoint(src: str, fmt: str | None = None, revision: str | None = None) -> Checkpoint:
    fmt = fmt or detect_input_format(src)
    module = format_module(fmt)
    if revision is not None and fmt != "hf":
        raise ConvertError(f"{src}: --revision applies to Hugging Face hub sources only")
    ckpt = module.read(src, revision=revision) if fmt == "hf" else module.read(src)
    return validate.checked(ckpt, src)  # every loaded tensor is checked, whichever reader made it


def write_checkpoint(ckpt: Checkpoint, out: str, fmt: str, *, force: bool = False, quiet: bool = True, **options) -> Path:
    allowed = WRITER_OPTIONS[fmt]
    unknown = [k for k, v in options.items() if v is not None and k not in allowed]
    if unknown:
        raise ConvertError(f"option --{unknown[0].replace('_', '-')} does not apply to {fmt} outputs")
    options = {k: v for k, v in options.items() if k in allowed and v is not None}
    return format_module(fmt).write(ckpt, os.fspath(out), force=force, quiet=quiet, **options)


def convert(src: str, out: str, src_format: str | None = None, dst_format: str | None = None, *,
            revision: str | None = None, force: bool = False, quiet: bool = True, **options) -> Path:
    """Read `src` (any format) and write it to `out` as `dst_format` (inferred from the path when None)."""
    dst_format = dst_format or infer_output_format(out)
    format_module(dst_format)  # unknown format -> error before reading anything
    ckpt = read_checkpoint(src, src_format, revision)
    return write_checkpoint(ckpt, out, dst_format, force=force, quiet=quiet, **options)
