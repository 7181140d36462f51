"""Hugging Face folders (config.json + safetensors + tokenizer files) in the four BitNet layouts.

| layout          | quantization_config                               | projection tensors                        |
|-----------------|---------------------------------------------------|-------------------------------------------|
| "autobitlinear" | linear_class autobitlinear, mode offline (2B4T)   | uint8 [out/4, in] + bf16 weight_scale = w |
| "bitlinear"     | linear_class bitlinear (the default; Falcon3)     | same, but weight_scale = 1 / w            |
| "online"        | linear_class autobitlinear, mode online           | bf16 master weights [out, in]             |
| "latent"        | none: 1bitLLM's BitnetForCausalLM (remote code)   | fp16 latent weights [out, in]             |
| "embedding"     | none needed: BitNet-embedding (qwen3, gemma3_text)| bf16 masters [out, in], names without     |
|                 |                                                   | `model.`, `<proj>.norm.weight` per proj.  |

(docs/formats.md §2, §7.) The reader turns packed projections into `Ternary` entries whose multiplier is always w,
and keeps online and latent masters as DENSE entries: quantizing them is the model's job, and `ternarize_master`
does it exactly as transformers' AutoBitLinear and 1bitLLM's BitLinear do (one rule) when a writer needs codes.
The latent layout names the sub-norms `inner_attn_ln` / `ffn_layernorm`; they are renamed to 2B4T's names on
reading and back on writing.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bitnet_convert.fileio import integrity, output
from bitnet_convert.fileio.output import Plan
from bitnet_convert.fileio.hub import (
    looks_like_repo_id,
    resolve_source,
    snapshot_revision,
)
from bitnet_convert.fileio.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    StoredTensor,
    TensorFiles,
    TensorSpec,
    open_model_files,
    shard_files,
)
from bitnet_convert.fileio.sources import SourceWatch, read_json_file
from bitnet_convert.formats import model_card, tokenizer_files
from bitnet_convert.formats.folder import (
    dense_producer,
    read_from,
    recorded_provenance,
    safetensors_folder,
    side_files,
    stored_folder_model,
)
from bitnet_convert.formats.options import WriterOption
from bitnet_core import validate
from bitnet_core.checkpoint import (
    TERNARY,
    Checkpoint,
    PackedLoader,
    PackedTernary,
    RowsLoader,
    TensorEntry,
    Ternary,
    dense_entry,
    ternary_entry,
)
from bitnet_core.codecs import hf2bit
from bitnet_core.config import GEMMA3, LATENT_ARCHITECTURE, QWEN3
from bitnet_core.errors import ConvertError, CorruptData
from bitnet_core.names import TOKENIZER_FILES, expected_tensors, is_projection
from bitnet_core.quantize import projection_bytes

NAME = "hf"
CONFIG_FILE = "config.json"
BF16 = np.dtype(ml_dtypes.bfloat16)
SCALE_SUFFIX = ".weight_scale"
SCALE_DTYPES = {"bf16": BF16, "f32": np.dtype(np.float32)}
DEFAULT_LAYOUT = "autobitlinear"

# Buffers some exporters save that the model recomputes; never part of a checkpoint.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    quantization_config: dict[str, str] | None  # what the writer puts in config.json (None: no key)
    packed: bool  # uint8 codes + weight_scale; otherwise float master weights
    inverse_scale: bool  # weight_scale holds 1/w (transformers' BitLinear divides by it)
    renames: tuple[tuple[str, str], ...] = ()  # (name part in the files, our name part)
    unprefixed: bool = False  # the files name tensors without our "model." prefix (`layers.0....`, `norm.weight`)
    summary: str = ""  # what it is, for --layout's help and `bitnet-convert list`

    def our_name(self, stored: str) -> str:
        for theirs, ours in self.renames:
            stored = stored.replace(theirs, ours)
        if self.unprefixed and not stored.startswith(MODEL_PREFIX):  # bitnet.cpp's converter accepts both
            stored = MODEL_PREFIX + stored
        return stored

    def stored_name(self, ours: str) -> str:
        for theirs, canonical in self.renames:
            ours = ours.replace(canonical, theirs)
        return ours.removeprefix(MODEL_PREFIX) if self.unprefixed else ours


MODEL_PREFIX = "model."


LAYOUTS = {
    "autobitlinear": Layout(
        "autobitlinear",
        {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
        packed=True,
        inverse_scale=False,
        summary="packed codes + weight_scale (2B4T)",
    ),
    "bitlinear": Layout(
        "bitlinear",
        {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
        packed=True,
        inverse_scale=True,
        summary="packed codes + inverse weight_scale (Falcon3, Falcon-E, Llama3-8B-1.58)",
    ),
    "online": Layout(
        "online",
        {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
        packed=False,
        inverse_scale=False,
        summary="bf16 master weights, quantized on the fly (2B4T-bf16)",
    ),
    "latent": Layout(
        "latent", None, packed=False, inverse_scale=False,
        renames=((".self_attn.inner_attn_ln.", ".self_attn.attn_sub_norm."), (".mlp.ffn_layernorm.", ".mlp.ffn_sub_norm.")),
        summary="fp16 latent weights, no quantization_config (1bitLLM bitnet_b1_58)",
    ),
    "embedding": Layout("embedding", None, packed=False, inverse_scale=False, unprefixed=True,
                        summary="bf16 masters under the backbone's own names (BitNet-embedding)"),
}
# The architectures whose folders need no quantization_config: their classes quantize at run time.
LATENT_LAYOUT = {LATENT_ARCHITECTURE: "latent", QWEN3: "embedding", GEMMA3: "embedding"}
EMBEDDING_ARCHITECTURES = (QWEN3, GEMMA3)


# ------------------------------------------------------------------------------------------------ reading


def detect(path: Path) -> bool:
    """A folder with config.json and safetensors weights, or a hub repo id only this format resolves."""
    path = Path(path)
    if path.is_dir():  # lexists, not is_file: a FIFO named model.safetensors is refused by the reader, by name
        has_weights = os.path.lexists(path / SINGLE_FILE) or os.path.lexists(path / INDEX_FILE)
        return os.path.lexists(path / CONFIG_FILE) and has_weights
    return not path.exists() and looks_like_repo_id(str(path))


def layout_of(quant: dict | None, where: str | os.PathLike, architecture: str = "BitNetForCausalLM") -> Layout:
    """The layout a config's quantization_config describes, as transformers would build its layers (or the
    latent layout of an architecture that quantizes without one)."""
    if architecture in EMBEDDING_ARCHITECTURES:
        # bf16 masters under the backbone's own names, whatever quantization_config (kept as it is) says
        if quant and (not isinstance(quant, dict) or quant.get("quant_method") != "bitnet"):
            raise ConvertError(f"{where}: quantization_config is not BitNet's (quant_method 'bitnet')")
        return LAYOUTS["embedding"]
    if not quant and architecture in LATENT_LAYOUT:
        return LAYOUTS[LATENT_LAYOUT[architecture]]
    if not quant:
        raise ConvertError(
            f"{where}: no quantization_config: transformers would run plain Linear layers, not BitNet "
            "(expected quant_method 'bitnet')"
        )
    if not isinstance(quant, dict):
        raise ConvertError(f"{where}: quantization_config is not a JSON object")
    if quant.get("quant_method") != "bitnet":
        raise ConvertError(f"{where}: quantization_config quant_method {quant.get('quant_method')!r:.60} is not "
                           "'bitnet'")
    linear_class = quant.get("linear_class", "bitlinear")
    mode = quant.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear") or mode not in ("offline", "online"):
        raise ConvertError(f"{where}: unknown BitNet linear_class {linear_class!r:.60} / quantization_mode "
                           f"{mode!r:.60}")
    if quant.get("use_rms_norm"):
        raise ConvertError(f"{where}: use_rms_norm (an extra RMSNorm inside every BitLinear) is not supported")
    if linear_class == "bitlinear":  # transformers' BitLinear is always packed, whatever the mode says
        return LAYOUTS["bitlinear"]
    return LAYOUTS["online" if mode == "online" else "autobitlinear"]


# A modules_to_not_convert entry made of these is a module name (where '.' also matches any one character, as
# in transformers' regex match); any other character makes it a regex we do not run: a crafted one can
# backtrack for hours, and a name match cannot tell what it would leave unquantized.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.-]*")


def _unquantized_projection(patterns, cfg, where) -> str | None:
    """A projection module that a modules_to_not_convert entry leaves as plain Linear, if any.

    transformers skips a module when an entry matches its full name from the start up to a module boundary
    or is a suffix of it (quantizers_utils.should_convert_module). Entries are matched as names, in time linear
    in their length; an entry that needs a regex engine is refused (see _MODULE_NAME).
    """
    modules = [name[: -len(".weight")] for name, (_, kind) in expected_tensors(cfg).items() if kind == TERNARY]
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list):
        raise ConvertError(f"{where}: quantization_config.modules_to_not_convert is not a list of module names")
    for pattern in patterns:
        if not isinstance(pattern, str) or not _MODULE_NAME.fullmatch(pattern):
            raise ConvertError(f"{where}: quantization_config.modules_to_not_convert entry {pattern!r:.60} is not a "
                               "module name (regular expressions are not supported)")
        for module in modules:
            if pattern and (module.endswith(pattern) or _prefix_match(pattern, module)):
                return module
    return None


def _prefix_match(pattern: str, module: str) -> bool:
    r"""transformers' `re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module)` for a pattern of name characters:
    '.' matches any one character, and the match ends at a module boundary."""
    if len(pattern) > len(module):
        return False
    if not all(p == "." or p == m for p, m in zip(pattern, module[: len(pattern)], strict=True)):
        return False
    rest = module[len(pattern):]
    return module[len(pattern) - 1] == "." or rest == "" or rest.startswith(".")


def read(path: str, *, revision: str | None = None) -> Checkpoint:
    """Lazily read a Hugging Face BitNet folder or hub repo (resolved through the local cache)."""
    folder = resolve_source(str(path), revision)
    watch = SourceWatch()  # every file read below, checked again after each tensor load
    config = _read_config(folder, watch)
    quant = config.pop("quantization_config", None)
    cfg = validate.model_config(config, str(folder / CONFIG_FILE))
    layout = layout_of(quant, folder / CONFIG_FILE, cfg.architecture)
    plain = _unquantized_projection((quant or {}).get("modules_to_not_convert") or [], cfg, folder / CONFIG_FILE)
    if plain:
        raise ConvertError(f"{folder / CONFIG_FILE}: modules_to_not_convert leaves {plain} unquantized; not supported")
    files = open_model_files(folder, watch)
    entries = watch.guard(_entries(files, layout, expected_tensors(cfg)))
    local = Path(path).expanduser().is_dir()
    # A hub repo is its own source (id + commit); a local folder we wrote names the source it came from.
    provenance = integrity.reader_provenance(
        NAME, folder, recorded_provenance(folder) if local else None,
        source=str(folder.resolve()) if local else str(path),
        revision=snapshot_revision(folder), layout=layout.name, quantization_config=quant,
        multiplier_roundings=_stored_roundings(files, layout), model_card=model_card.read(folder),
    )
    ckpt = Checkpoint(config, entries, tokenizer_files=_tokenizer_files(folder, watch), provenance=provenance)
    validate.check_tensors(ckpt, str(files.where))
    return ckpt


def _stored_roundings(files: TensorFiles, layout: Layout) -> list[str]:
    """The rounding this folder's weight_scale dtype imposes on multipliers (for a folder that records none)."""
    scale = next((t for n, t in files.tensors.items() if n.endswith(SCALE_SUFFIX)), None)
    rounding = scale_rounding(layout, scale.dtype) if scale is not None else None
    return [rounding] if rounding else []


def _read_config(folder: Path, watch: SourceWatch) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not os.path.lexists(path):
        raise ConvertError(f"{path}: missing (a Hugging Face model folder needs its config.json)")
    return read_json_file(watch, path, "config file")


def _tokenizer_files(folder: Path, watch: SourceWatch) -> dict[str, bytes]:
    """The tokenizer files present (by name: a FIFO or folder under one of the names is refused), checked."""
    names = [n for n in TOKENIZER_FILES if os.path.lexists(folder / n)]
    names += sorted(p.name for p in folder.glob("*.jinja"))
    files = {name: watch.read_side_file(folder / name, "tokenizer file") for name in names}
    tokenizer_files.check(files, lambda name: str(folder / name))
    return files


def _entries(files: TensorFiles, layout: Layout, expected: dict) -> dict[str, TensorEntry]:
    """Checkpoint entries in model order (then anything unexpected, which validation reports)."""
    stored = {layout.our_name(n): t for n, t in files.tensors.items() if not n.endswith(_DERIVED_SUFFIXES)}
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
                entries[name] = _master_entry(tensor, name)
        else:
            entries[name] = _dense_entry(tensor, name)
    ordered = {n: entries[n] for n in expected if n in entries}
    ordered.update((n, e) for n, e in entries.items() if n not in ordered)
    return ordered


def _dense_entry(tensor: StoredTensor, name: str) -> TensorEntry:
    if tensor.dtype.kind != "f" and tensor.dtype != BF16:
        raise ConvertError(f"{tensor.path}: tensor {tensor.name} is {tensor.dtype}, expected floating point")
    load = tensor.read  # a copy: see SourceWatch
    if len(tensor.shape) >= 2:  # a table: streaming writers may read it a block of rows at a time, and the
        load = RowsLoader(tensor.read, tensor.read_rows, tensor.array)  # engine in place, from the mapping
    return dense_entry(name, tensor.shape, tensor.dtype, load)


def _master_entry(tensor: StoredTensor, name: str) -> TensorEntry:
    if len(tensor.shape) != 2:
        raise ConvertError(f"{tensor.path}: tensor {tensor.name} has shape {list(tensor.shape)}, expected [out, in]")
    if tensor.dtype == np.uint8:
        raise ConvertError(
            f"{tensor.path}: tensor {tensor.name} holds packed uint8 codes but config.json says online "
            "(float master weights)"
        )
    return _dense_entry(tensor, name)


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

    return ternary_entry(weight.name, (out_features, in_features), PackedLoader(load, packed), multiplier)


def _multiplier(scale: StoredTensor, layout: Layout) -> np.float32:
    """The float32 multiplier w from a stored weight_scale (w itself, or 1/w in the bitlinear layout)."""
    if scale.dtype.kind != "f" and scale.dtype != BF16 or int(np.prod(scale.shape)) != 1:
        raise ConvertError(
            f"{scale.path}: tensor {scale.name} is {scale.dtype}{list(scale.shape)}, expected one float"
        )
    value = np.float32(scale.read().reshape(()).astype(np.float32))
    if not np.isfinite(value) or value <= 0:
        raise CorruptData(f"{scale.path}: tensor {scale.name} is {value}, expected a finite positive scale")
    with np.errstate(over="ignore"):  # a subnormal inverse scale overflows: reported just below
        multiplier = np.float32(1.0) / value if layout.inverse_scale else value
    if not np.isfinite(multiplier):
        raise CorruptData(f"{scale.path}: tensor {scale.name} = {value} has no finite inverse")
    return multiplier


# ------------------------------------------------------------------------------------------------ writing

WRITER_OPTIONS = {
    # No default here: the writer's is the layout the model came in (default_layout), which a CLI default of its
    # own would override (a bitlinear model coming back autobitlinear, an online one losing its masters).
    "layout": WriterOption(tuple(LAYOUTS), None, "projection layout (default: the source's layout, else its "
                           "family's, else autobitlinear): " + "; ".join(f"{name}: {layout.summary}"
                                                                          for name, layout in LAYOUTS.items())),
    "scale_dtype": WriterOption(tuple(SCALE_DTYPES), "bf16",
                                "dtype of weight_scale: bf16 as in 2B4T, or f32 to keep any multiplier exactly"),
}


def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True, **options) -> Path:
    """`plan` written to `out` by the output pipeline (fileio/output.py)."""
    return output.write(plan(ckpt, **options), out, force=force, quiet=quiet)


def plan(ckpt: Checkpoint, *, layout: str | None = None, scale_dtype: str = "bf16",
         max_shard_bytes: int | None = None, metadata: dict | None = None) -> Plan:
    """A folder transformers loads with `AutoModelForCausalLM.from_pretrained`.

    layout: "autobitlinear" (2B4T's), "bitlinear" or "online" (bf16 masters; needs master weights); by
        default the layout the model first came in (its provenance), so a round trip keeps it, else autobitlinear.
    scale_dtype: "bf16" stores weight_scale as 2B4T does (a multiplier that is not bf16-exact, e.g. one
        computed from master weights, is rounded: at most 2^-8 relative); "f32" keeps every multiplier exactly
        (transformers reads it in float32 mode, and rounds it to bf16 itself when run in bf16).
    max_shard_bytes: split model.safetensors into shards plus an index beyond this size (default: one file).
    metadata: keys a user sets (general.*), recorded in the provenance and covered by the content hash.
    """
    layout = layout or default_layout(ckpt)
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown Hugging Face layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if scale_dtype not in SCALE_DTYPES:
        raise ConvertError(f"unknown weight_scale dtype {scale_dtype!r} (choose from {', '.join(SCALE_DTYPES)})")
    target = LAYOUTS[layout]
    where = read_from(ckpt)  # the file read, not the model it first came from: what the user gave
    cfg = validate.check_tensors(ckpt, where)
    own = LATENT_LAYOUT.get(cfg.architecture)
    if cfg.architecture in EMBEDDING_ARCHITECTURES and layout != own:
        raise ConvertError(f"{where}: a {cfg.architecture} embedding model is written in the {own} layout only "
                           f"(bf16 masters under its own names), not {layout}")
    if target.quantization_config is None and own != layout:
        raise ConvertError(f"{where}: the {layout} layout is {', '.join(a for a, l in LATENT_LAYOUT.items() if l == layout)}'s; "
                           f"a {cfg.architecture} folder without quantization_config would run as a plain (not BitNet) model")
    specs, produce = _plan(ckpt, target, SCALE_DTYPES[scale_dtype], where)
    files = shard_files(specs, max_shard_bytes or 2**63)
    config = _config_for(ckpt.config, target, ckpt.provenance)
    side = side_files(config, ckpt.tokenizer_files, reserved=[name for name, _ in files], where=where)
    provenance = dict(ckpt.provenance, multiplier_roundings=_roundings_after(ckpt.provenance, target, scale_dtype))
    record = dict(layout=layout, scale_dtype=scale_dtype, files=[name for name, _ in files])
    return safetensors_folder(NAME, files, produce, {"format": "pt"}, side, provenance, record, metadata)


def _config_for(config: dict, target: Layout, provenance: dict | None = None) -> dict:
    """config.json for `target`: its quantization_config, and a class that runs that layout. The latent layout
    is 1bitLLM's own class; any other layout of a 1bitLLM model is transformers' BitNetForCausalLM, which
    computes the same function (same quantizers, sub-norms and SiLU) from 2B4T's tensor names."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    architecture = (config.get("architectures") or [None])[0]
    if target.name == "embedding":  # back as it came: its own quantization_config, if it had one
        quant = (provenance or {}).get("quantization_config")
        return dict(config, quantization_config=quant) if isinstance(quant, dict) else config
    if target.quantization_config is None:
        return config
    if architecture in LATENT_LAYOUT:
        config.update(architectures=["BitNetForCausalLM"], model_type="bitnet")
        config.pop("auto_map", None)
    config["quantization_config"] = dict(target.quantization_config)
    return config


# The layout a family's own folders have, for a checkpoint that records none (one read from GGUF).
FAMILY_LAYOUTS = {"LlamaForCausalLM": "bitlinear"}


def default_layout(ckpt: Checkpoint) -> str:
    """The layout the model first came in (provenance) or its family's own, when the checkpoint can still be
    written in it (the online and latent layouts need master weights), else DEFAULT_LAYOUT."""
    layout = ckpt.provenance.get("source_layout")
    architecture = validate.model_config(ckpt.config, read_from(ckpt)).architecture
    if architecture in EMBEDDING_ARCHITECTURES:
        return LATENT_LAYOUT[architecture]
    if layout not in LAYOUTS:
        architecture = (ckpt.config.get("architectures") or [None])[0]
        layout = FAMILY_LAYOUTS.get(architecture, DEFAULT_LAYOUT)
    if not LAYOUTS[layout].packed and any(e.kind == TERNARY for e in ckpt if is_projection(e.name)):
        return DEFAULT_LAYOUT
    return layout


def scale_rounding(layout: Layout, scale_dtype: np.dtype) -> str | None:
    """How storing a multiplier as this layout's weight_scale rounds it (docs/formats.md §2), or None (exact)."""
    if not layout.packed or scale_dtype != BF16:
        return None
    return "bf16-inverse" if layout.inverse_scale else "bf16"


def _roundings_after(provenance: dict, layout: Layout, scale_dtype: str) -> list[str]:
    rounding = scale_rounding(layout, SCALE_DTYPES[scale_dtype])
    return list(provenance.get("multiplier_roundings") or []) + ([rounding] if rounding else [])


def _plan(ckpt: Checkpoint, target: Layout, scale_dtype: np.dtype, where: str) -> tuple[list[TensorSpec], Callable]:
    """The stored tensors in file order and the function producing each one's data."""
    producers: dict[str, Callable[[], np.ndarray]] = {}
    specs: list[TensorSpec] = []
    multipliers: dict[str, np.float32] = {}  # set when a weight is produced, read by its weight_scale next

    for entry in ckpt:
        if not is_projection(entry.name):
            specs.append(TensorSpec(target.stored_name(entry.name), entry.dtype, entry.shape))
            producers[specs[-1].name] = dense_producer(entry, where)
        elif not target.packed:
            if entry.kind == TERNARY and target.name == "embedding":
                raise ConvertError(
                    f"{where}: cannot write the embedding layout from ternary weights ({entry.name}): it stores bf16 "
                    "master weights, which a file holding codes and one multiplier (GGUF, npz, Flax) no longer "
                    "has; convert from the Hugging Face folder, or keep flax, npz or gguf"
                )
            if entry.kind == TERNARY:
                raise ConvertError(
                    f"{where}: cannot write the {target.name} layout from ternary weights ({entry.name}): the model "
                    "recomputes the multiplier as mean|W| of the stored weights, which ternary codes times one "
                    "scale do not reproduce; write 'autobitlinear' or 'bitlinear' instead"
                )
            specs.append(TensorSpec(target.stored_name(entry.name), entry.dtype, entry.shape))
            producers[specs[-1].name] = dense_producer(entry, where)
        else:
            out_features, in_features = entry.shape
            scale_name = entry.name[: -len(".weight")] + SCALE_SUFFIX
            specs.append(TensorSpec(entry.name, np.uint8, (hf2bit.packed_rows(out_features), in_features)))
            specs.append(TensorSpec(scale_name, scale_dtype, (1,)))
            producers[entry.name] = _packed_producer(entry, multipliers, where)
            producers[scale_name] = _scale_producer(entry.name, target, scale_dtype, multipliers)

    return specs, lambda spec: producers[spec.name]()


def _packed_producer(entry: TensorEntry, multipliers: dict, where: str) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:  # stored HF bytes pass through (checked for code 3), others are packed
        packed, multipliers[entry.name] = projection_bytes(entry, hf2bit.check, hf2bit.pack, where)
        return packed

    return produce


def _scale_producer(weight_name: str, target: Layout, dtype: np.dtype, multipliers: dict) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        multiplier = multipliers.pop(weight_name)
        scale = np.float32(1.0) / multiplier if target.inverse_scale else multiplier
        return np.array([scale], np.float32).astype(dtype)  # float32 -> bf16 rounds to nearest even

    return produce


# ------------------------------------------------------------------------------------------- inspection


def stored_tensor_bytes(path) -> integrity.StoredModel:
    """What the content hash covers: every stored tensor (weight_scale included), shard by shard in file order,
    config.json and the tokenizer files."""
    folder = resolve_source(str(path))
    files = open_model_files(folder)
    return stored_folder_model(folder, files.files)


