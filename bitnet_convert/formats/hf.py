"""Hugging Face folders (config.json + safetensors + tokenizer files) in the three BitNet layouts.

| layout          | quantization_config                               | projection tensors                        |
|-----------------|---------------------------------------------------|-------------------------------------------|
| "autobitlinear" | linear_class autobitlinear, mode offline (2B4T)   | uint8 [out/4, in] + bf16 weight_scale = w |
| "bitlinear"     | linear_class bitlinear (the default)              | same, but weight_scale = 1 / w            |
| "online"        | linear_class autobitlinear, mode online           | bf16 master weights [out, in]             |

(formats.md §2.) The reader turns packed projections into `Ternary` entries whose multiplier is always w, and
keeps online masters as DENSE entries: quantizing them is the model's job, and `ternarize_master` does it
exactly as transformers' AutoBitLinear does when a writer needs ternary codes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .. import integrity, validate
from ..atomic import atomic_path
from ..checkpoint import (
    TERNARY, Checkpoint, PackedLoader, PackedTernary, TensorEntry, Ternary, dense_entry, ternary_entry,
)
from ..codecs import hf2bit
from ..errors import ConvertError, CorruptData
from ..hub import looks_like_repo_id, resolve_source, snapshot_revision
from ..names import expected_tensors, is_projection
from .folder import dense_producer, hashing_progress, read_json_object, recorded_provenance, write_side_files
from ..safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    StoredTensor,
    TensorFiles,
    TensorSpec,
    open_model_files,
    write_sharded_safetensors,
)

NAME = "hf"
CONFIG_FILE = "config.json"
BF16 = np.dtype(ml_dtypes.bfloat16)
SCALE_SUFFIX = ".weight_scale"
SCALE_DTYPES = {"bf16": BF16, "f32": np.dtype(np.float32)}

# Files copied verbatim between formats (whatever of them a checkpoint has), besides any *.jinja template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)

# Buffers some exporters save that the model recomputes; never part of a checkpoint.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    quantization_config: dict[str, str]  # what the writer puts in config.json
    packed: bool  # uint8 codes + weight_scale; otherwise float master weights
    inverse_scale: bool  # weight_scale holds 1/w (transformers' BitLinear divides by it)


LAYOUTS = {
    "autobitlinear": Layout(
        "autobitlinear",
        {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
        packed=True,
        inverse_scale=False,
    ),
    "bitlinear": Layout(
        "bitlinear",
        {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
        packed=True,
        inverse_scale=True,
    ),
    "online": Layout(
        "online",
        {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
        packed=False,
        inverse_scale=False,
    ),
}


# ------------------------------------------------------------------------------------------- quantization


def ternarize_master(w: np.ndarray) -> Ternary:
    """Quantize master weights the way transformers' AutoBitLinear (online) does in its forward.

    transformers: ``scale = 1 / max(mean|W|, 1e-5)``, ``T = clamp(round(W * scale), -1, 1)``, effective weight
    ``T / scale``, all in float32 with round-half-to-even. So T comes from ``W * scale`` (not ``W / m``, which
    can round differently) and the multiplier is ``1 / scale``. The mean is accumulated in float64 and rounded
    once: a correctly rounded, order-independent value; torch's float32 reduction can land one ulp away.
    """
    w32 = np.asarray(w, dtype=np.float32)
    mean = np.float32(np.mean(np.abs(w32), dtype=np.float64))
    scale = np.float32(1.0) / max(mean, np.float32(1e-5))
    codes = np.clip(np.rint(w32 * scale), -1, 1).astype(np.int8)
    return Ternary(codes, np.float32(1.0) / scale)


def as_ternary(value: Ternary | np.ndarray) -> Ternary:
    """A projection as codes + multiplier, quantizing float master weights if that is what it holds."""
    return value if isinstance(value, Ternary) else ternarize_master(value)


# ------------------------------------------------------------------------------------------------ reading


def detect(path: Path) -> bool:
    """A folder with config.json and safetensors weights, or a hub repo id only this format resolves."""
    path = Path(path)
    if path.is_dir():
        has_weights = (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()
        return (path / CONFIG_FILE).is_file() and has_weights
    return not path.exists() and looks_like_repo_id(str(path))


def layout_of(quant: dict | None, where: str | os.PathLike) -> Layout:
    """The layout a config's quantization_config describes, as transformers would build its layers."""
    if not quant:
        raise ConvertError(
            f"{where}: no quantization_config: transformers would run plain Linear layers, not BitNet "
            "(expected quant_method 'bitnet')"
        )
    if not isinstance(quant, dict):
        raise ConvertError(f"{where}: quantization_config is not a JSON object")
    if quant.get("quant_method") != "bitnet":
        raise ConvertError(f"{where}: quantization_config quant_method {quant.get('quant_method')!r} is not 'bitnet'")
    linear_class = quant.get("linear_class", "bitlinear")
    mode = quant.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear") or mode not in ("offline", "online"):
        raise ConvertError(f"{where}: unknown BitNet linear_class {linear_class!r} / quantization_mode {mode!r}")
    if quant.get("use_rms_norm"):
        raise ConvertError(f"{where}: use_rms_norm (an extra RMSNorm inside every BitLinear) is not supported")
    if linear_class == "bitlinear":  # transformers' BitLinear is always packed, whatever the mode says
        return LAYOUTS["bitlinear"]
    return LAYOUTS["online" if mode == "online" else "autobitlinear"]


def _unquantized_projection(patterns: list[str], cfg) -> str | None:
    """A projection module that a modules_to_not_convert entry leaves as plain Linear, if any.

    transformers skips a module when an entry matches its full name from the start up to a module boundary
    (plain or as a regex) or is a suffix of it.
    """
    modules = [name[: -len(".weight")] for name, (_, kind) in expected_tensors(cfg).items() if kind == TERNARY]
    if isinstance(patterns, str):
        patterns = [patterns]
    for pattern in (p for p in patterns if isinstance(p, str) and p):
        try:
            prefix = re.compile(rf"(?:{pattern})(?=\.|$)")
        except re.error:
            prefix = re.compile(rf"{re.escape(pattern)}(?=\.|$)")
        for module in modules:
            if module.endswith(pattern) or prefix.match(module) or (pattern.endswith(".") and module.startswith(pattern)):
                return module
    return None


def read(path: str, *, revision: str | None = None) -> Checkpoint:
    """Lazily read a Hugging Face BitNet folder or hub repo (resolved through the local cache)."""
    folder = resolve_source(str(path), revision)
    config = _read_config(folder)
    quant = config.pop("quantization_config", None)
    layout = layout_of(quant, folder / CONFIG_FILE)
    cfg = validate.model_config(config, str(folder / CONFIG_FILE))
    plain = _unquantized_projection(quant.get("modules_to_not_convert") or [], cfg)
    if plain:
        raise ConvertError(f"{folder / CONFIG_FILE}: modules_to_not_convert leaves {plain} unquantized; not supported")
    files = open_model_files(folder)
    entries = _entries(files, layout, expected_tensors(cfg))
    local = Path(path).expanduser().is_dir()
    # A hub repo is its own source (id + commit); a local folder we wrote names the source it came from.
    provenance = integrity.reader_provenance(
        NAME, folder, recorded_provenance(folder) if local else None,
        source=str(folder.resolve()) if local else str(path),
        revision=snapshot_revision(folder), layout=layout.name, quantization_config=quant,
    )
    ckpt = Checkpoint(config, entries, tokenizer_files=_tokenizer_files(folder), provenance=provenance)
    validate.check_tensors(ckpt, str(files.where))
    return ckpt


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConvertError(f"{path}: missing (a Hugging Face model folder needs its config.json)")
    return read_json_object(path)


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    names += sorted(p.name for p in folder.glob("*.jinja") if p.is_file())
    return {name: (folder / name).read_bytes() for name in names}


def _entries(files: TensorFiles, layout: Layout, expected: dict) -> dict[str, TensorEntry]:
    """Checkpoint entries in model order (then anything unexpected, which validation reports)."""
    stored = {n: t for n, t in files.tensors.items() if not n.endswith(_DERIVED_SUFFIXES)}
    entries: dict[str, TensorEntry] = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE_SUFFIX) and layout.packed and is_projection(name[: -len("_scale")]):
            continue  # read together with its weight
        if is_projection(name):
            expected_shape = expected.get(name, ((0, 0), TERNARY))[0]
            if layout.packed:
                scale = stored.get(name[: -len(".weight")] + SCALE_SUFFIX)
                if scale is None:
                    raise ConvertError(f"{files.where}: missing tensor {name[: -len('.weight')] + SCALE_SUFFIX}")
                entries[name] = _packed_entry(tensor, scale, layout, expected_shape[0])
            else:
                entries[name] = _master_entry(tensor)
        else:
            entries[name] = _dense_entry(tensor)
    ordered = {n: entries[n] for n in expected if n in entries}
    ordered.update((n, e) for n, e in entries.items() if n not in ordered)
    return ordered


def _dense_entry(tensor: StoredTensor) -> TensorEntry:
    if tensor.dtype.kind != "f" and tensor.dtype != BF16:
        raise ConvertError(f"{tensor.path}: tensor {tensor.name} is {tensor.dtype}, expected floating point")
    return dense_entry(tensor.name, tensor.shape, tensor.dtype, tensor.array)


def _master_entry(tensor: StoredTensor) -> TensorEntry:
    if len(tensor.shape) != 2:
        raise ConvertError(f"{tensor.path}: tensor {tensor.name} has shape {list(tensor.shape)}, expected [out, in]")
    if tensor.dtype == np.uint8:
        raise ConvertError(
            f"{tensor.path}: tensor {tensor.name} holds packed uint8 codes but config.json says online "
            "(float master weights)"
        )
    return _dense_entry(tensor)


def _packed_entry(weight: StoredTensor, scale: StoredTensor, layout: Layout, out_features: int) -> TensorEntry:
    if weight.dtype != np.uint8 or len(weight.shape) != 2:
        raise ConvertError(
            f"{weight.path}: tensor {weight.name} is {weight.dtype}{list(weight.shape)}, expected 2-D packed uint8 "
            f"codes for the {layout.name} layout of config.json"
        )
    rows, in_features = weight.shape
    if hf2bit.packed_rows(out_features) != rows:
        out_features = rows * hf2bit.VALUES_PER_BYTE  # disagrees with the config: validation names it
    multiplier = _multiplier(scale, layout)

    # read(), not array(): pages touched through the mapping stay resident until the end (1.1 GB of them for
    # 2B4T), while a streaming writer needs one tensor at a time.
    def packed() -> PackedTernary:
        return PackedTernary("hf2bit", weight.read(), multiplier, f"{weight.path}: tensor {weight.name}")

    def load() -> Ternary:
        return Ternary(packed().transcode(hf2bit.unpack, out_features), multiplier)

    return ternary_entry(weight.name, (out_features, in_features), PackedLoader(load, packed))


def _multiplier(scale: StoredTensor, layout: Layout) -> np.float32:
    """The float32 multiplier w from a stored weight_scale (w itself, or 1/w in the bitlinear layout)."""
    if scale.dtype.kind != "f" and scale.dtype != BF16 or int(np.prod(scale.shape)) != 1:
        raise ConvertError(
            f"{scale.path}: tensor {scale.name} is {scale.dtype}{list(scale.shape)}, expected one float"
        )
    value = np.float32(scale.array().reshape(()).astype(np.float32))
    if not np.isfinite(value) or value <= 0:
        raise CorruptData(f"{scale.path}: tensor {scale.name} is {value}, expected a finite positive scale")
    with np.errstate(over="ignore"):  # a subnormal inverse scale overflows: reported just below
        multiplier = np.float32(1.0) / value if layout.inverse_scale else value
    if not np.isfinite(multiplier):
        raise CorruptData(f"{scale.path}: tensor {scale.name} = {value} has no finite inverse")
    return multiplier


# ------------------------------------------------------------------------------------------------ writing


def write(
    ckpt: Checkpoint,
    out: str,
    *,
    force: bool = False,
    quiet: bool = True,
    layout: str = "autobitlinear",
    scale_dtype: str = "bf16",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a folder transformers loads with `AutoModelForCausalLM.from_pretrained`.

    layout: "autobitlinear" (2B4T's), "bitlinear" or "online" (bf16 masters; needs master weights).
    scale_dtype: "bf16" stores weight_scale as 2B4T does (a multiplier that is not bf16-exact, e.g. one
        computed from master weights, is rounded: at most 2^-9 relative); "f32" keeps every multiplier exactly
        (transformers reads it in float32 mode, and rounds it to bf16 itself when run in bf16).
    max_shard_bytes: split model.safetensors into shards plus an index beyond this size (default: one file).
    """
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown Hugging Face layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if scale_dtype not in SCALE_DTYPES:
        raise ConvertError(f"unknown weight_scale dtype {scale_dtype!r} (choose from {', '.join(SCALE_DTYPES)})")
    target = LAYOUTS[layout]
    where = str(ckpt.provenance.get("source") or "checkpoint")
    validate.check_tensors(ckpt, where)
    specs, produce = _plan(ckpt, target, SCALE_DTYPES[scale_dtype], where)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config["quantization_config"] = dict(target.quantization_config)

    with atomic_path(out, force=force, directory=True) as tmp:
        with hashing_progress(specs, out, quiet) as (hasher, on_written):
            files = write_sharded_safetensors(
                tmp, specs, produce, {"format": "pt"},
                max_shard_bytes=max_shard_bytes or 2**63, on_written=on_written,
            )
        record = integrity.provenance_record(
            ckpt.provenance, hasher.hexdigest(), NAME, layout=layout, scale_dtype=scale_dtype,
            files=[f.name for f in files],
        )
        write_side_files(tmp, config, ckpt.tokenizer_files, record, reserved=[f.name for f in files], where=where)
    return Path(out)


def _plan(ckpt: Checkpoint, target: Layout, scale_dtype: np.dtype, where: str) -> tuple[list[TensorSpec], Callable]:
    """The stored tensors in file order and the function producing each one's data."""
    producers: dict[str, Callable[[], np.ndarray]] = {}
    specs: list[TensorSpec] = []
    multipliers: dict[str, np.float32] = {}  # set when a weight is produced, read by its weight_scale next

    for entry in ckpt:
        if not is_projection(entry.name):
            specs.append(TensorSpec(entry.name, entry.dtype, entry.shape))
            producers[entry.name] = dense_producer(entry, where)
        elif not target.packed:
            if entry.kind == TERNARY:
                raise ConvertError(
                    f"{where}: cannot write the online layout from ternary weights ({entry.name}): transformers "
                    "recomputes the multiplier as mean|W| of the stored weights, which ternary codes times one "
                    "scale do not reproduce; write 'autobitlinear' or 'bitlinear' instead"
                )
            specs.append(TensorSpec(entry.name, entry.dtype, entry.shape))
            producers[entry.name] = dense_producer(entry, where)
        else:
            out_features, in_features = entry.shape
            scale_name = entry.name[: -len(".weight")] + SCALE_SUFFIX
            specs.append(TensorSpec(entry.name, np.uint8, (hf2bit.packed_rows(out_features), in_features)))
            specs.append(TensorSpec(scale_name, scale_dtype, (1,)))
            producers[entry.name] = _packed_producer(entry, multipliers)
            producers[scale_name] = _scale_producer(entry.name, target, scale_dtype, multipliers)

    return specs, lambda spec: producers[spec.name]()


def _packed_producer(entry: TensorEntry, multipliers: dict) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        ternary = as_ternary(entry.load())
        multipliers[entry.name] = ternary.multiplier
        return hf2bit.pack(ternary.codes)

    return produce


def _scale_producer(weight_name: str, target: Layout, dtype: np.dtype, multipliers: dict) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        multiplier = multipliers.pop(weight_name)
        scale = np.float32(1.0) / multiplier if target.inverse_scale else multiplier
        return np.array([scale], np.float32).astype(dtype)  # float32 -> bf16 rounds to nearest even

    return produce


# ------------------------------------------------------------------------------------------- inspection


def stored_tensor_bytes(path) -> Iterator[tuple[str, memoryview]]:
    """Every stored tensor's bytes (weight_scale included), shard by shard in file order."""
    yield from open_model_files(resolve_source(str(path))).stored_bytes()


