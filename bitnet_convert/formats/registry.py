"""The hub of the hub-and-spoke converter: format name -> reader/writer module, and format detection.

Every `X-to-Y` command, `convert`, `verify` and `inspect` go through this one table.
"""

from __future__ import annotations

import importlib
import os
import re
import stat
from pathlib import Path
from types import ModuleType

from bitnet_convert.fileio import atomic, output
from bitnet_convert.fileio.output import Plan
from bitnet_convert.fileio.safetensors_io import (
    has_safetensors_weights,
    no_weights,
    pickled_weights,
)
from bitnet_convert.fileio.sources import kind_of, shown
from bitnet_convert.formats import options as options_values
from bitnet_core import validate
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.errors import ConvertError

# format name -> (module, what it is, how an output path of this format looks)
FORMATS: dict[str, tuple[str, str]] = {
    "hf": ("bitnet_convert.formats.hf", "Hugging Face checkpoint folder (safetensors + config.json)"),
    "flax": ("bitnet_convert.formats.flax_dir", "Flax NNX param tree folder (params.safetensors + config.json)"),
    "npz": ("bitnet_convert.formats.npz", "packed-ternary .npz file (numpy only)"),
    "gguf": ("bitnet_convert.formats.gguf", "GGUF file for llama.cpp (TQ1_0/TQ2_0) or bitnet.cpp (I2_S)"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ConvertError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return importlib.import_module(FORMATS[name][0])


def detect_input_format(path: str) -> str:
    """Which format an existing path (or a hub repo id) holds."""
    p = Path(path)
    mode = _mode(path)
    if mode is None:
        if _HUB_ID.match(path) and not path.startswith((".", "/")):
            return "hf"  # a hub repo id, resolved by the hf reader
        raise ConvertError(f"{shown(path)}: no such file or folder")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would block the reader, /dev/zero never ends
        raise ConvertError(f"{shown(path)}: is {kind_of(mode)}, not a file or folder this tool reads")
    for name in ("gguf", "npz", "flax", "hf"):  # flax before hf: both are folders with config.json
        if format_module(name).detect(p):
            return name
    if p.is_dir() and not (p / "config.json").exists():
        raise ConvertError(f"{path}: folder has no config.json (not a checkpoint this tool reads)")
    if p.is_dir() and not has_safetensors_weights(p) and pickled_weights(p):  # torch.save's weights: say so
        raise no_weights(path)
    raise ConvertError(f"{path}: not a format this tool reads ({', '.join(FORMATS)})")


def _mode(path: str) -> int | None:
    """The st_mode of what `path` names (following links), None when nothing is there; a path the system
    cannot look up (too long, no permission) is one error naming it."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConvertError(f"{shown(path)}: cannot look it up: {exc.strerror or exc}") from None
    except ValueError:  # an embedded NUL byte
        raise ConvertError(f"{shown(path)}: not a valid path") from None


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


def writer_options(fmt: str) -> dict:
    """Options the writer of `fmt` takes beyond (ckpt, out, force, quiet): name -> formats.options.WriterOption."""
    return format_module(fmt).WRITER_OPTIONS


def plan_output(ckpt: Checkpoint, fmt: str, *, metadata=None, **options) -> Plan:
    """What writing `ckpt` as `fmt` with these writer options would store (the output pipeline's plan);
    `metadata`: the keys a user sets (`--metadata KEY=VALUE` items, or a mapping), checked here."""
    given = {k: v for k, v in options.items() if v is not None and v is not False}  # an unset flag is False
    unknown = [k for k in given if k not in writer_options(fmt)]
    if unknown:
        raise ConvertError(f"option --{unknown[0].replace('_', '-')} does not apply to {fmt} outputs")
    if ckpt.provenance.get("vocab_only") and not given.get("vocab_only"):
        raise ConvertError(f"{ckpt.provenance.get('path')}: a vocab-only GGUF (a tokenizer and hyperparameters, no "
                           "tensors): there is no model in it to convert (only another --vocab-only GGUF)")
    return format_module(fmt).plan(ckpt, metadata=options_values.metadata_values(metadata), **given)


def write_checkpoint(ckpt: Checkpoint, out: str, fmt: str, *, force: bool = False, quiet: bool = True,
                     dry_run: bool = False, metadata=None, **options) -> Path | dict:
    """Write `ckpt` to `out` as `fmt`; with `dry_run`, read and check everything and return what would be
    written (output.describe) instead."""
    plan = plan_output(ckpt, fmt, metadata=metadata, **options)
    if dry_run:
        return output.describe(plan, os.fspath(out), force=force)
    return output.write(plan, os.fspath(out), force=force, quiet=quiet)


def convert(src: str, out: str, src_format: str | None = None, dst_format: str | None = None, *,
            revision: str | None = None, force: bool = False, quiet: bool = True, **options) -> Path | dict:
    """Read `src` (any format) and write it to `out` as `dst_format` (inferred from the path when None);
    options as write_checkpoint's (`dry_run=True`: what would be written)."""
    dst_format = dst_format or infer_output_format(out)
    format_module(dst_format)  # unknown format -> error before reading anything
    atomic.refuse_output_over_input(src, out)  # before reading: OUT may be SRC, or hold it, or lie in it
    ckpt = read_checkpoint(src, src_format, revision)
    return write_checkpoint(ckpt, out, dst_format, force=force, quiet=quiet, **options)
