"""Small valid files of every format, and the ways the robustness tests damage them.

Valid files come from our writers (a one-layer tiny model: 0.3-2.5 MB per file, read in milliseconds).
Damage is done at offsets found by parsing the files here, independently of the readers under test (the
safetensors JSON header, the zip local headers, gguf-py's reader on the *valid* file), so a reader bug cannot
hide the damage it is meant to find.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from bitnet_convert import cli
from bitnet_convert.formats import npz, registry
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core import validate

# One layer is the smallest model every format accepts (TQ blocks need rows of 256, I2_S blocks of 128).
SMALL = {"num_hidden_layers": 1}

# GGUF variants: one file per projection type, plus a Q8_0 embedding.
GGUF_VARIANTS: dict[str, dict[str, str]] = {
    "tq2_0": {"outtype": "tq2_0"},
    "tq1_0": {"outtype": "tq1_0"},
    "i2_s": {"target": "bitnet.cpp", "outtype": "i2_s"},
    "f16": {"outtype": "f16"},
    "bf16": {"outtype": "bf16"},
    "f32": {"outtype": "f32"},
    "q8_0-embed": {"outtype": "tq2_0", "embed_type": "q8_0"},
}

PROJ = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.0.post_attention_layernorm.weight"
GGUF_PROJ = "blk.0.ffn_up.weight"
GGUF_NORM = "blk.0.ffn_norm.weight"


def small_checkpoint(seed: int = 0, **overrides):
    return tiny_checkpoint(seed=seed, **{**SMALL, **overrides})


def small_sources(root: Path) -> dict[str, Path]:
    """Sources for the overwrite tests: an npz and an HF folder of one model (seed 11), an npz of another (12)."""
    return {
        "npz": write(small_checkpoint(seed=11), root / "a.npz", "npz"),
        "other": write(small_checkpoint(seed=12), root / "b.npz", "npz"),
        "hf": write(small_checkpoint(seed=11), root / "a-hf", "hf"),
    }


def write(ckpt, path, fmt: str, **options) -> Path:
    return registry.write_checkpoint(ckpt, str(path), fmt, quiet=True, **options)


@contextlib.contextmanager
def lenient_writers():
    """Writers that skip the tensor-vs-config check, to produce files with missing/extra/misshapen tensors."""

    def lenient(ckpt, where):
        return validate.model_config(ckpt.config, where)

    saved = validate.check_tensors, npz.check_tensors
    validate.check_tensors = npz.check_tensors = lenient
    try:
        yield
    finally:
        validate.check_tensors, npz.check_tensors = saved


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself): to prove something was left untouched."""
    path = Path(path)
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ----------------------------------------------------------------------------------------------- raw bytes


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def xor_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ mask]))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


# ----------------------------------------------------------------------------------------------- safetensors


def safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> absolute (start, end) of its bytes, from the JSON header."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {name: (8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1]) for name, info in header.items()}


def patch_tensor(path: Path, name: str, data: bytes, at: int = 0) -> None:
    start, end = safetensors_offsets(path)[name]
    assert start + at + len(data) <= end, f"{name}: patch does not fit"
    patch(path, start + at, data)


def safetensors_header(path: Path) -> tuple[dict, int]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), n


def rewrite_safetensors_header(path: Path, edit) -> None:
    """Re-emit the file with `edit(header_dict)` applied (data bytes unchanged, length prefix recomputed)."""
    raw = Path(path).read_bytes()
    header, n = safetensors_header(path)
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


# ---------------------------------------------------------------------------------------------------- npz


def npz_rewrite(src: Path, dst: Path, replace: dict | None = None, drop: tuple = (), pickled: dict | None = None,
                raw: dict | None = None) -> Path:
    """Copy an .npz member by member: `replace` key -> new array, `drop` keys, `pickled` key -> object array
    (added), `raw` key -> the member's bytes as given (replaced in place)."""
    replace, pickled, raw = replace or {}, pickled or {}, raw or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            key = info.filename[: -len(".npy")]
            if key in drop:
                continue
            if key in raw:
                zout.writestr(info.filename, raw[key])
            elif key in replace:
                with zout.open(info.filename, "w") as fh:
                    np.lib.format.write_array(fh, np.asarray(replace[key]), allow_pickle=False)
            else:
                zout.writestr(info, zin.read(info))
        for key, value in pickled.items():  # written, never read back by us
            with zout.open(key + ".npy", "w") as fh:
                np.lib.format.write_array(fh, value, allow_pickle=True)
    return dst


def npy_bytes(header: dict, data: bytes) -> bytes:
    """A .npy member with any header (e.g. a shape its data does not have)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def npz_array(path: Path, key: str) -> np.ndarray:
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def npz_data_offset(path: Path, key: str) -> int:
    """Absolute offset of the first array byte of member `key` (a stored member: local header, npy header)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    raw = Path(path).read_bytes()
    local = info.header_offset
    assert raw[local : local + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", raw[local + 26 : local + 30])
    member = local + 30 + name_len + extra_len
    assert raw[member : member + 6] == b"\x93NUMPY"
    major = raw[member + 6]
    if major == 1:
        (hlen,) = struct.unpack("<H", raw[member + 8 : member + 10])
        return member + 10 + hlen
    (hlen,) = struct.unpack("<I", raw[member + 8 : member + 12])
    return member + 12 + hlen


# --------------------------------------------------------------------------------------------------- gguf


def gguf_tensor_offsets(path: Path) -> dict[str, int]:
    """GGUF tensor name -> absolute offset of its data (read with gguf-py from the valid file)."""
    from gguf import GGUFReader

    import bitnet_convert.formats.gguf.types  # noqa: F401  (registers I2_S with gguf-py)

    return {t.name: int(t.data_offset) for t in GGUFReader(path).tensors}


def gguf_kv_value_offset(path: Path, key: str) -> tuple[int, int]:
    """(offset of the value type u32, offset of the value) of metadata `key`."""
    raw = Path(path).read_bytes()
    needle = struct.pack("<Q", len(key)) + key.encode()
    at = raw.find(needle)
    assert at > 0, key
    type_at = at + len(needle)
    return type_at, type_at + 4


def gguf_tensor_info_type_offset(path: Path, name: str) -> int:
    """Offset of the u32 GGML type in tensor `name`'s info record."""
    raw = Path(path).read_bytes()
    needle = struct.pack("<Q", len(name)) + name.encode()
    at = raw.find(needle)
    assert at > 0, name
    n_dims_at = at + len(needle)
    (n_dims,) = struct.unpack("<I", raw[n_dims_at : n_dims_at + 4])
    return n_dims_at + 4 + 8 * n_dims


def run_cli(argv):
    """`bitnet-convert ARGV` in-process; the result has separate .stdout and .stderr (click >= 8.2)."""
    return CliRunner().invoke(cli.main, [str(a) for a in argv])
