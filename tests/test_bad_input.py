"""Bad input gets one clear error, from every command, on every format (issue #5, part 1).

Each case below builds one damaged or wrong input; `test_bad_input_is_refused_cleanly` runs it through the
real command line (click's CliRunner, in process) with every command that reads a source:

    convert SRC to each of the four formats (and GGUF for bitnet.cpp), the SRC-to-X pair command of the
    format it claims to be, inspect, inspect --check and verify

and asserts, for each: a non-zero exit, exactly one `error:` line on stderr that names the file and says what
is wrong (the case's `why`), no traceback, nothing at the output path (no target, no `.partial-` leftover),
and the input left byte-identical.

THE LIST GROWS: every new failure found (by a user, the fuzzer, a review) becomes one more `Case` here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from damage import (
    GGUF_NORM,
    GGUF_PROJ,
    NORM,
    PROJ,
    copy,
    gguf_kv_value_offset,
    gguf_tensor_info_type_offset,
    gguf_tensor_offsets,
    lenient_writers,
    npy_bytes,
    npz_array,
    npz_rewrite,
    patch,
    patch_tensor,
    rewrite_safetensors_header,
    run_cli,
    safetensors_offsets,
    small_checkpoint,
    tree_digest,
    truncate,
    write,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16_bytes(value: float) -> bytes:
    return np.array([value], np.float32).astype(BF16).tobytes()


def f32_bytes(value: float) -> bytes:
    return np.array([value], "<f4").tobytes()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """Valid inputs of every format, written once; cases copy what they damage."""
    root = tmp_path_factory.mktemp("good")
    ckpt = small_checkpoint(seed=5)
    files = {
        "hf": write(ckpt, root / "m-hf", "hf"),
        "hf-bitlinear": write(ckpt, root / "m-bitlinear-hf", "hf", layout="bitlinear"),
        "flax": write(ckpt, root / "m-flax", "flax"),
        "npz": write(ckpt, root / "m.npz", "npz"),
        "tq2_0": write(ckpt, root / "m-tq2.gguf", "gguf", outtype="tq2_0"),
        "i2_s": write(ckpt, root / "m-i2s.gguf", "gguf", target="bitnet.cpp"),
        "f16": write(ckpt, root / "m-f16.gguf", "gguf", outtype="f16"),
    }
    return files


# ----------------------------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fmt: str | None  # the format the damaged source claims to be (for its SRC-to-X command); None: not a format
    make: Callable[[dict[str, Path], Path], Path]  # (good files, scratch dir) -> the bad source
    why: str  # regex the error line must match (case-insensitive): says what is wrong
    marks: tuple = ()
    pair_only: bool = False  # bad only for its format's own command (convert/inspect detect by content)


def _in(tmp: Path, good: Path, name: str | None = None) -> Path:
    return copy(good, tmp / (name or good.name))


# --- paths that are not a checkpoint at all


def missing_path(good, tmp):
    return tmp / "does-not-exist"


def missing_file_with_suffix(good, tmp):
    return tmp / "nothing-here.gguf"


def hub_id_not_cached(good, tmp):
    return Path("bitnet-convert-tests/no-such-model-anywhere")


def folder_without_config(good, tmp):
    folder = _in(tmp, good["hf"])
    (folder / "config.json").unlink()
    return folder


def empty_folder(good, tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def random_bytes_npz(good, tmp):
    path = tmp / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def random_bytes_gguf(good, tmp):
    path = tmp / "noise.gguf"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def empty_file_gguf(good, tmp):
    path = tmp / "empty.gguf"
    path.write_bytes(b"")
    return path


def text_file(good, tmp):
    path = tmp / "notes.txt"
    path.write_text("not a model\n")
    return path


# --- Hugging Face folders


def hf_config_not_json(good, tmp):
    folder = _in(tmp, good["hf"])
    (folder / "config.json").write_text('{"hidden_size": 256,')
    return folder


def hf_config_without_quantization(good, tmp):
    folder = _in(tmp, good["hf"])
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hf_config_sizes_disagree(good, tmp):
    folder = _in(tmp, good["hf"])
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 768
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _hf_config(**changes):
    def make(good, tmp):
        folder = _in(tmp, good["hf"])
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


def gguf_block_count_huge(good, tmp):
    path = _in(tmp, good["tq2_0"])
    _, value_at = gguf_kv_value_offset(path, "bitnet.block_count")
    patch(path, value_at, struct.pack("<I", 2**32 - 1))
    return path


def hf_config_more_layers(good, tmp):
    folder = _in(tmp, good["hf"])
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _rename(header: dict, name: str, new: str) -> None:
    """Rename one tensor in a safetensors header (its bytes stay: the data remains contiguous)."""
    header[new] = header.pop(name)


def hf_missing_tensor(good, tmp):  # renamed away: the expected name is missing, and an unexpected one is there
    folder = _in(tmp, good["hf"])
    rewrite_safetensors_header(folder / "model.safetensors",
                               lambda h: _rename(h, NORM, NORM.replace("post_attention_layernorm", "renamed")))
    return folder


def hf_missing_weight_scale(good, tmp):
    folder = _in(tmp, good["hf"])
    scale = PROJ.replace(".weight", ".weight_scale")
    rewrite_safetensors_header(folder / "model.safetensors", lambda h: _rename(h, scale, scale + "_gone"))
    return folder


def written_with(path, fmt, edit):
    """`good`'s checkpoint with its tensors edited by `edit(arrays)`, written as `fmt` past the writers' checks."""
    ckpt = small_checkpoint(seed=5)
    arrays = ckpt.materialize()
    edit(arrays)
    with lenient_writers():
        write(type(ckpt).from_arrays(ckpt.config, arrays, tokenizer_files=ckpt.tokenizer_files), path, fmt)
    return path


def add_extra_tensor(arrays):
    arrays["model.layers.1.input_layernorm.weight"] = arrays[NORM]


def hf_extra_tensor(good, tmp):
    return written_with(tmp / "extra-hf", "hf", add_extra_tensor)


def hf_truncated_safetensors(good, tmp):
    folder = _in(tmp, good["hf"])
    path = folder / "model.safetensors"
    truncate(path, path.stat().st_size - 1000)
    return folder


def hf_safetensors_header_garbage(good, tmp):
    folder = _in(tmp, good["hf"])
    patch(folder / "model.safetensors", 8, b"\xff\xfe not json")
    return folder


def hf_safetensors_header_length_huge(good, tmp):
    folder = _in(tmp, good["hf"])
    patch(folder / "model.safetensors", 0, struct.pack("<Q", 2**62))
    return folder


def hf_safetensors_offsets_outside(good, tmp):
    folder = _in(tmp, good["hf"])

    def edit(header):
        begin, end = header[NORM]["data_offsets"]
        header[NORM]["data_offsets"] = [begin + 2**40, end + 2**40]

    rewrite_safetensors_header(folder / "model.safetensors", edit)
    return folder


def hf_code_3(good, tmp):
    folder = _in(tmp, good["hf"])
    patch_tensor(folder / "model.safetensors", PROJ, b"\xff")
    return folder


def _hf_scale(value: float, layout: str = "hf"):
    def make(good, tmp):
        folder = _in(tmp, good[layout])
        patch_tensor(folder / "model.safetensors", PROJ.replace(".weight", ".weight_scale"), bf16_bytes(value))
        return folder

    return make


def hf_index_points_outside(good, tmp):
    folder = _in(tmp, good["hf"])
    names = list(safetensors_offsets(folder / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {n: "../../etc/model.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def hf_tensor_wrong_dtype(good, tmp):
    folder = _in(tmp, good["hf"])

    def edit(header):  # same bytes, read as int16 instead of bf16
        header[NORM]["dtype"] = "I16"

    rewrite_safetensors_header(folder / "model.safetensors", edit)
    return folder


# --- Flax folders


def flax_missing_params(good, tmp):
    folder = _in(tmp, good["flax"])
    (folder / "params.safetensors").unlink()
    return folder


def flax_truncated(good, tmp):
    folder = _in(tmp, good["flax"])
    path = folder / "params.safetensors"
    truncate(path, path.stat().st_size // 2)
    return folder


def flax_packed_code_3(good, tmp):
    folder = _in(tmp, good["flax"])
    patch_tensor(folder / "params.safetensors", PROJ.replace(".weight", ".packed"), b"\xc1")  # field 3 = 3
    return folder


def _flax_multiplier(value: float):
    def make(good, tmp):
        folder = _in(tmp, good["flax"])
        patch_tensor(folder / "params.safetensors", PROJ.replace(".weight", ".multiplier"), f32_bytes(value))
        return folder

    return make


def flax_config_sizes_disagree(good, tmp):
    folder = _in(tmp, good["flax"])
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def flax_missing_multiplier(good, tmp):
    folder = _in(tmp, good["flax"])
    key = PROJ.replace(".weight", ".multiplier")
    rewrite_safetensors_header(folder / "params.safetensors", lambda h: _rename(h, key, key + "_gone"))
    return folder


# --- .npz files


def npz_truncated(good, tmp):
    path = _in(tmp, good["npz"])
    truncate(path, path.stat().st_size - 100)
    return path


def npz_pickled_member(good, tmp):
    return npz_rewrite(good["npz"], tmp / "pickle.npz", pickled={"tensor/evil/data": np.array([{"a": 1}], object)})


def npz_missing_format_member(good, tmp):
    return npz_rewrite(good["npz"], tmp / "nofmt.npz", drop=("meta/format.json",))


def npz_missing_config_member(good, tmp):
    return npz_rewrite(good["npz"], tmp / "nocfg.npz", drop=("meta/config.json",))


def npz_missing_codes_member(good, tmp):
    return npz_rewrite(good["npz"], tmp / "nocodes.npz", drop=(f"tensor/{PROJ}/codes",))


def npz_missing_tensor(good, tmp):  # member and index entry both gone: only the config can tell
    index = json.loads(bytes(npz_array(good["npz"], "meta/tensors.json")))
    index = [r for r in index if r["name"] != NORM]
    return npz_rewrite(good["npz"], tmp / "notensor.npz", drop=(f"tensor/{NORM}/data",),
                       replace={"meta/tensors.json": np.frombuffer(json.dumps(index).encode(), np.uint8)})


def npz_invalid_trit_byte(good, tmp):
    codes = npz_array(good["npz"], f"tensor/{PROJ}/codes").copy()
    codes[7] = 250
    return npz_rewrite(good["npz"], tmp / "trit.npz", replace={f"tensor/{PROJ}/codes": codes})


def _npz_multiplier(value: float):
    def make(good, tmp):
        return npz_rewrite(good["npz"], tmp / "mult.npz",
                           replace={f"tensor/{PROJ}/multiplier": np.array([value], "<f4")})

    return make


def npz_config_sizes_disagree(good, tmp):
    config = json.loads(bytes(npz_array(good["npz"], "meta/config.json")))
    config["intermediate_size"] = 1024
    return npz_rewrite(good["npz"], tmp / "cfg.npz",
                       replace={"meta/config.json": np.frombuffer(json.dumps(config).encode(), np.uint8)})


def npz_member_larger_than_file(good, tmp):
    """meta/config.json whose .npy header declares 2^40 bytes: refused from the header, not by allocating it."""
    member = npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (2**40,)}, b"{}")
    return npz_rewrite(good["npz"], tmp / "huge.npz", raw={"meta/config.json": member})


# --- GGUF files


def gguf_truncated(good, tmp):
    path = _in(tmp, good["tq2_0"])
    truncate(path, path.stat().st_size // 2)
    return path


def gguf_truncated_in_header(good, tmp):
    path = _in(tmp, good["tq2_0"])
    truncate(path, 100)
    return path


def gguf_tensor_count_huge(good, tmp):
    path = _in(tmp, good["tq2_0"])
    patch(path, 8, struct.pack("<Q", 2**62))  # magic, version u32, then tensor count u64
    return path


def gguf_kv_count_huge(good, tmp):
    path = _in(tmp, good["tq2_0"])
    patch(path, 16, struct.pack("<Q", 2**62))
    return path


def gguf_wrong_version(good, tmp):
    path = _in(tmp, good["tq2_0"])
    patch(path, 4, struct.pack("<I", 99))
    return path


def gguf_unsupported_architecture(good, tmp):
    path = _in(tmp, good["tq2_0"])
    _, value_at = gguf_kv_value_offset(path, "general.architecture")
    patch(path, value_at + 8, b"falcon")  # u64 length 6, then "bitnet"
    return path


def gguf_unknown_tensor_type(good, tmp):
    path = _in(tmp, good["tq2_0"])
    patch(path, gguf_tensor_info_type_offset(path, GGUF_PROJ), struct.pack("<I", 99))
    return path


def gguf_unsupported_projection_type(good, tmp):
    path = _in(tmp, good["f16"])
    # F16 -> Q4_0: a real GGML type, but not ternary storage (and half the bytes: fits in the file)
    patch(path, gguf_tensor_info_type_offset(path, GGUF_PROJ), struct.pack("<I", 2))
    return path


def gguf_unsupported_norm_type(good, tmp):
    path = _in(tmp, good["tq2_0"])
    patch(path, gguf_tensor_info_type_offset(path, GGUF_NORM), struct.pack("<I", 24))  # F32 -> I8 (same size/4)
    return path


def gguf_alignment_zero(good, tmp):
    """general.alignment = 0 (a u32 key gguf-py divides by)."""
    from gguf import GGUFReader, GGUFWriter

    import bitnet_convert.formats.gguf.types  # noqa: F401

    src = GGUFReader(good["tq2_0"])
    path = tmp / "align0.gguf"
    writer = GGUFWriter(path, "bitnet")
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        _copy_field(writer, field)
    writer.add_uint32("general.alignment", 0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def _copy_field(writer, field):
    from gguf import GGUFValueType

    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        return  # tokenizer arrays are not needed to trigger the bug
    value = field.contents()
    writer.add_key_value(field.name, value, kind)


def gguf_i2s_code_3(good, tmp):
    path = _in(tmp, good["i2_s"])
    patch(path, gguf_tensor_offsets(path)[GGUF_PROJ], b"\xff")
    return path


def gguf_tq2_code_3(good, tmp):
    path = _in(tmp, good["tq2_0"])
    patch(path, gguf_tensor_offsets(path)[GGUF_PROJ], b"\xff")
    return path


def gguf_f16_not_ternary(good, tmp):
    path = _in(tmp, good["f16"])
    patch(path, gguf_tensor_offsets(path)[GGUF_PROJ], np.array([2.5], "<f2").tobytes())
    return path


def _gguf_i2s_multiplier(value: float):
    def make(good, tmp):
        path = _in(tmp, good["i2_s"])
        offset = gguf_tensor_offsets(path)[GGUF_PROJ]
        n_values = 512 * 256  # ffn_up of the small model: [intermediate 512, hidden 256]
        patch(path, offset + n_values // 4, f32_bytes(value))
        return path

    return make


def _gguf_scale_tensor(value: float):
    def make(good, tmp):
        path = _in(tmp, good["f16"])  # float outtypes keep the multiplier in `.scale` (TQ blocks hold it in d)
        patch(path, gguf_tensor_offsets(path)["blk.0.ffn_up.scale"], f32_bytes(value))
        return path

    return make


def gguf_string_not_utf8(good, tmp):
    path = _in(tmp, good["tq2_0"])
    _, value_at = gguf_kv_value_offset(path, "tokenizer.ggml.pre")
    patch(path, value_at + 8, b"\xff")  # u64 length, then the string's first byte
    return path


def gguf_config_key_disagrees(good, tmp):
    path = _in(tmp, good["tq2_0"])
    type_at, value_at = gguf_kv_value_offset(path, "bitnet.feed_forward_length")
    patch(path, value_at, struct.pack("<I", 768))
    return path


def gguf_missing_tensor(good, tmp):
    return written_with(tmp / "missing.gguf", "gguf", lambda arrays: arrays.pop(NORM))


def gguf_extra_tensor(good, tmp):
    return written_with(tmp / "extra.gguf", "gguf", add_extra_tensor)


def gguf_npz_in_disguise(good, tmp):
    return copy(good["npz"], tmp / "really-an-npz.gguf")


# --- issue 15 §3 and §5: bounded work and named errors for every field a reader takes in


def _hf_config_text(edit):
    """An HF folder whose config.json text is `edit(text)` (for JSON json.dumps cannot write: 1e999, NaN ...)."""
    def make(good, tmp):
        folder = _in(tmp, good["hf"])
        path = folder / "config.json"
        path.write_text(edit(path.read_text()))
        return folder

    return make


def hf_config_not_utf8(good, tmp):
    folder = _in(tmp, good["hf"])
    path = folder / "config.json"
    path.write_bytes(path.read_bytes().replace(b'"bitnet"', b'"bit\xffnet"', 1))
    return folder


def _json_field(name: str, raw: str):
    """Replace the value of top-level field `name` (or add it) with the raw JSON text `raw`."""
    def edit(text):
        config = json.loads(text)
        config[name] = "@@RAW@@"
        return json.dumps(config).replace('"@@RAW@@"', raw)

    return edit


def _hf_quantization(**changes):
    def make(good, tmp):
        folder = _in(tmp, good["hf"])
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"].update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _hf_fifo(name: str):
    def make(good, tmp):
        folder = _in(tmp, good["hf"])
        _replace_with_fifo(folder / name)
        return folder

    return make


def hf_only_pickled_weights(good, tmp):
    folder = _in(tmp, good["hf"])
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


def hf_folder_as_weights(good, tmp):
    folder = _in(tmp, good["hf"])
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    return folder


def _sharded(good, tmp):
    """good["hf"] as one shard listed by an index (a valid sharded folder)."""
    folder = _in(tmp, good["hf"])
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = list(safetensors_offsets(folder / "model-00001-of-00001.safetensors"))
    return folder, {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}


def _hf_index(edit):
    def make(good, tmp):
        folder, index = _sharded(good, tmp)
        text = edit(index)
        (folder / "model.safetensors.index.json").write_text(text if isinstance(text, str) else json.dumps(index))
        return folder

    return make


def _index_value(value):
    def edit(index):
        index["weight_map"][NORM] = value

    return edit


def hf_shard_is_fifo(good, tmp):
    folder, index = _sharded(good, tmp)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _replace_with_fifo(folder / "model-00001-of-00001.safetensors")
    return folder


def _hf_tokenizer_bytes(name: str, data: bytes):
    """An HF folder whose tokenizer file `name` holds `data`."""
    def make(good, tmp):
        folder = _in(tmp, good["hf"])
        (folder / name).write_bytes(data)
        return folder

    return make


def _hf_tokenizer_field(name: str, dotted: str, value):
    """An HF folder whose JSON tokenizer file `name` has field `dotted` (a.b.c) set to `value`."""
    def make(good, tmp):
        folder = _in(tmp, good["hf"])
        path = folder / name
        document = json.loads(path.read_bytes()) if path.exists() else {}
        _set(document, dotted, value)
        path.write_text(json.dumps(document))
        return folder

    return make


def _set(document: dict, dotted: str, value):
    parts = dotted.split(".")
    for part in parts[:-1]:
        document = document[part]
    document[parts[-1]] = value


def _huge_side_file(fmt: str, name: str):
    """A 65 MiB file `name` in a folder source (sparse: no disk used): refused by its size, never read."""
    def make(good, tmp):
        folder = _in(tmp, good[fmt])
        with open(folder / name, "wb") as fh:
            fh.truncate(65 << 20)
        return folder

    return make


def flax_params_fifo(good, tmp):
    folder = _in(tmp, good["flax"])
    _replace_with_fifo(folder / "params.safetensors")
    return folder


def _flax_config(**changes):
    def make(good, tmp):
        folder = _in(tmp, good["flax"])
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


def npz_deflated_tokenizer_member(good, tmp):
    """tokenizer/tokenizer.json claiming 100 MiB, deflated to ~100 kB: refused from its header, never inflated."""
    path = npz_rewrite(good["npz"], tmp / "bomb.npz", drop=("tokenizer/tokenizer.json",))
    member = npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (100 << 20,)}, bytes(100 << 20))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("tokenizer/tokenizer.json.npy", member)
    return path


def _npz_json_member(key: str, text: str):
    def make(good, tmp):
        return npz_rewrite(good["npz"], tmp / "member.npz", replace={key: np.frombuffer(text.encode(), np.uint8)})

    return make


def _npz_config(**changes):
    def make(good, tmp):
        config = json.loads(bytes(npz_array(good["npz"], "meta/config.json")))
        config.update(changes)
        return _npz_json_member("meta/config.json", json.dumps(config))(good, tmp)

    return make


def npz_index_shape_float(good, tmp):
    index = json.loads(bytes(npz_array(good["npz"], "meta/tensors.json")))
    index[0]["shape"] = [float(d) for d in index[0]["shape"]]
    return _npz_json_member("meta/tensors.json", json.dumps(index))(good, tmp)


def npz_tokenizer_config_wrong_shape(good, tmp):
    return _npz_json_member("tokenizer/tokenizer_config.json", json.dumps({"bos_token": ["<s>"]}))(good, tmp)


def npz_fifo(good, tmp):
    path = tmp / "m.npz"
    os.mkfifo(path)
    return path


def dev_zero(good, tmp):
    return Path("/dev/zero")


# GGUF key/values rebuilt from the valid file (gguf-py finds the entries): change, drop or add one entry.

GGUF_TYPES = {"u8": 0, "i8": 1, "u32": 4, "i32": 5, "f32": 6, "bool": 7, "string": 8, "array": 9, "u64": 10,
              "f64": 12}
_PACK = {"u8": "<B", "i8": "<b", "u32": "<I", "i32": "<i", "f32": "<f", "bool": "<?", "u64": "<Q", "f64": "<d"}


def gguf_value(kind: str, value, item: str | None = None) -> bytes:
    """A GGUF value's type id and bytes (arrays: of `item`)."""
    if kind == "string":
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<I", 8) + struct.pack("<Q", len(raw)) + raw
    if kind == "array":
        items = b"".join(gguf_value(item, v)[4:] for v in value)
        return struct.pack("<IIQ", 9, GGUF_TYPES[item], len(value)) + items
    return struct.pack("<I", GGUF_TYPES[kind]) + struct.pack(_PACK[kind], value)


def gguf_entry(key: str, kind: str, value, item: str | None = None) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + gguf_value(kind, value, item)


def gguf_rebuilt(src: Path, dst: Path, *, changes: dict[str, bytes | None] | None = None, add: tuple = ()) -> Path:
    """`src` with `changes` (key -> its new entry's bytes, None to drop it; a key `src` lacks is added) and `add`
    (entries' bytes, duplicates allowed) applied: the tensor infos and data are copied, the data re-aligned
    (their offsets are relative to it)."""
    from gguf import GGUFReader

    import bitnet_convert.formats.gguf.types  # noqa: F401  (registers I2_S)

    changes = changes or {}
    raw = src.read_bytes()
    reader = GGUFReader(src)
    entries = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        entry = raw[field.offset : field.offset + sum(int(p.nbytes) for p in field.parts)]
        entries.append(changes.get(field.name, entry))
    missing = [entry for key, entry in changes.items() if key not in reader.fields]
    entries = [e for e in entries + missing if e is not None] + list(add)
    infos = [t.field for t in reader.tensors]
    tensor_infos = raw[infos[0].offset : infos[-1].offset + sum(int(p.nbytes) for p in infos[-1].parts)]
    head = raw[:8] + struct.pack("<QQ", len(reader.tensors), len(entries)) + b"".join(entries) + tensor_infos
    dst.write_bytes(head + bytes(-len(head) % 32) + raw[reader.data_offset :])
    return dst


def _gguf_key(key: str, kind: str | None, value=None, item: str | None = None, *, variant: str = "tq2_0"):
    """A GGUF file whose key `key` holds `value` of `kind` (None: the key removed)."""
    def make(good, tmp):
        entry = None if kind is None else gguf_entry(key, kind, value, item)
        return gguf_rebuilt(good[variant], tmp / "key.gguf", changes={key: entry})

    return make


def _gguf_added(*entries: bytes):
    def make(good, tmp):
        return gguf_rebuilt(good["tq2_0"], tmp / "added.gguf", add=entries)

    return make


def _gguf_tokens(edit):
    """A GGUF file whose token list / token types are edited: edit(tokens, types) -> (tokens, types)."""
    def make(good, tmp):
        from gguf import GGUFReader

        reader = GGUFReader(good["tq2_0"])
        tokens = reader.get_field("tokenizer.ggml.tokens").contents()
        types = reader.get_field("tokenizer.ggml.token_type").contents()
        tokens, types = edit(tokens, types)
        return gguf_rebuilt(good["tq2_0"], tmp / "tokens.gguf", changes={
            "tokenizer.ggml.tokens": gguf_entry("tokenizer.ggml.tokens", "array", tokens, "string"),
            "tokenizer.ggml.token_type": gguf_entry("tokenizer.ggml.token_type", "array", types, "i32"),
        })

    return make


def gguf_version_big_endian(good, tmp):
    path = _in(tmp, good["tq2_0"])
    patch(path, 4, struct.pack(">I", 3))
    return path


def gguf_too_many_strings(good, tmp):
    """2.2 M empty strings in one key (17.6 MB): more than any tokenizer holds, refused before they are walked."""
    count = (1 << 21) + 1
    entry = struct.pack("<Q", 5) + b"x.big" + struct.pack("<IIQ", 9, 8, count) + bytes(8 * count)
    return gguf_rebuilt(good["tq2_0"], tmp / "strings.gguf", add=(entry,))


def gguf_fifo(good, tmp):
    path = tmp / "m.gguf"
    os.mkfifo(path)
    return path


# --- issue 24 §3: records and archives no reader may leave to the catch-all

_DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100k deep: Python's parser ends in RecursionError


def _gguf_provenance(value, kind: str = "string"):
    """A GGUF file whose provenance key (bitnet_convert.provenance) holds `value`."""
    return _gguf_key("bitnet_convert.provenance", kind, value)


def _npz_provenance(text: str):
    return _npz_json_member("meta/provenance.json", text)


def _folder_provenance(fmt: str, text: str):
    """A folder of ours whose provenance record (bitnet_convert.json) holds `text`."""
    def make(good, tmp):
        folder = _in(tmp, good[fmt])
        (folder / "bitnet_convert.json").write_text(text)
        return folder

    return make


def _npz_zip_flags(*, method: int | None = None, encrypted: bool = False):
    """The .npz with every member's compression method set to `method` and/or its encryption bit set, in both the
    local and the central headers (found by their signatures: our writer stores members uncompressed)."""
    def make(good, tmp):
        data = bytearray(good["npz"].read_bytes())
        for signature, flags, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
            at = data.find(signature)
            while at >= 0:
                if method is not None:
                    data[at + method_at : at + method_at + 2] = struct.pack("<H", method)
                if encrypted:
                    data[at + flags] |= 1
                at = data.find(signature, at + 4)
        path = tmp / "flags.npz"
        path.write_bytes(bytes(data))
        return path

    return make


_GGUF_OWNER = "formats/gguf/reader.py (owner still editing)"

CASES = [
    # not a checkpoint at all
    Case("missing-path", None, missing_path, r"no such"),
    Case("missing-file-with-gguf-suffix", None, missing_file_with_suffix, r"no such"),
    Case("hub-id-not-cached-offline", "hf", hub_id_not_cached, r"not in the local .*cache.*offline"),
    Case("folder-without-config", None, folder_without_config, r"config\.json"),
    Case("empty-folder", None, empty_folder, r"config\.json"),
    Case("text-file", None, text_file, r"not a format"),
    Case("random-bytes-npz", "npz", random_bytes_npz, r"not a zip|truncated"),
    Case("random-bytes-gguf", "gguf", random_bytes_gguf, r"not a format|not a gguf"),
    Case("empty-gguf", "gguf", empty_file_gguf, r"not a format|not a gguf"),
    # Hugging Face folders
    Case("hf-config-not-json", "hf", hf_config_not_json, r"config\.json.*JSON"),
    Case("hf-config-without-quantization", "hf", hf_config_without_quantization, r"quantization_config"),
    Case("hf-config-sizes-disagree", "hf", hf_config_sizes_disagree, r"shape .* config says"),
    Case("hf-config-more-layers", "hf", hf_config_more_layers, r"missing tensor model\.layers\.1"),
    Case("hf-config-a-billion-layers", "hf", _hf_config(num_hidden_layers=10**9), r"num_hidden_layers"),
    Case("hf-config-zero-heads", "hf", _hf_config(num_attention_heads=0, head_dim=None), r"num_attention_heads"),
    Case("hf-config-negative-size", "hf", _hf_config(intermediate_size=-512), r"intermediate_size is -512"),
    Case("hf-config-negative-eps", "hf", _hf_config(rms_norm_eps=-1e-5), r"rms_norm_eps"),
    Case("hf-config-string-size", "hf", _hf_config(hidden_size="big"), r"config\.json: hidden_size is a string.*integer"),
    Case("hf-missing-tensor", "hf", hf_missing_tensor, r"missing tensor " + re.escape(NORM)),
    Case("hf-missing-weight-scale", "hf", hf_missing_weight_scale, r"missing tensor .*weight_scale"),
    Case("hf-extra-tensor", "hf", hf_extra_tensor, r"unexpected tensor model\.layers\.1"),
    Case("hf-truncated-safetensors", "hf", hf_truncated_safetensors, r"model\.safetensors.*truncated"),
    Case("hf-safetensors-header-garbage", "hf", hf_safetensors_header_garbage, r"model\.safetensors.*not JSON"),
    Case("hf-safetensors-header-length-huge", "hf", hf_safetensors_header_length_huge,
         r"model\.safetensors.*header length"),
    Case("hf-safetensors-offsets-outside-file", "hf", hf_safetensors_offsets_outside, r"model\.safetensors"),
    Case("hf-index-points-outside-folder", "hf", hf_index_points_outside, r"index\.json.*not a plain file name"),
    Case("hf-tensor-wrong-dtype", "hf", hf_tensor_wrong_dtype, r"int16.*floating point"),
    Case("hf-packed-code-3", "hf", hf_code_3, r"code 3"),
    Case("hf-weight-scale-nan", "hf", _hf_scale(float("nan")), r"weight_scale.*(nan|finite)"),
    Case("hf-weight-scale-inf", "hf", _hf_scale(float("inf")), r"weight_scale.*(inf|finite)"),
    Case("hf-weight-scale-zero", "hf", _hf_scale(0.0), r"weight_scale.*positive"),
    Case("hf-weight-scale-negative", "hf", _hf_scale(-1.5), r"weight_scale.*positive"),
    Case("hf-bitlinear-weight-scale-zero", "hf", _hf_scale(0.0, "hf-bitlinear"), r"weight_scale.*positive"),
    Case("hf-bitlinear-weight-scale-tiny", "hf", _hf_scale(1e-39, "hf-bitlinear"), r"weight_scale.*(inverse|positive)"),
    # Flax folders
    Case("flax-missing-params", None, flax_missing_params, r"config\.json|not a format"),
    Case("flax-truncated-params", "flax", flax_truncated, r"params\.safetensors.*truncated"),
    Case("flax-config-sizes-disagree", "flax", flax_config_sizes_disagree, r"config says|head_dim|hidden"),
    Case("flax-missing-multiplier", "flax", flax_missing_multiplier, r"multiplier"),
    Case("flax-packed-code-3", "flax", flax_packed_code_3, r"up_proj\.packed.*code 3"),
    Case("flax-multiplier-nan", "flax", _flax_multiplier(float("nan")), r"multiplier.*(nan|finite)"),
    Case("flax-multiplier-inf", "flax", _flax_multiplier(float("inf")), r"multiplier.*(inf|finite)"),
    Case("flax-multiplier-zero", "flax", _flax_multiplier(0.0), r"multiplier.*positive"),
    Case("flax-multiplier-negative", "flax", _flax_multiplier(-1.5), r"multiplier.*positive"),
    # .npz files
    Case("npz-truncated", "npz", npz_truncated, r"not a zip|truncated"),
    Case("npz-pickled-member", "npz", npz_pickled_member, r"pickle"),
    Case("npz-missing-format-member", "npz", npz_missing_format_member, r"meta/format\.json"),
    Case("npz-missing-config-member", "npz", npz_missing_config_member, r"meta/config\.json"),
    Case("npz-missing-codes-member", "npz", npz_missing_codes_member, r"missing member .*codes"),
    Case("npz-missing-tensor", "npz", npz_missing_tensor, r"missing tensor " + re.escape(NORM)),
    Case("npz-invalid-trit-byte", "npz", npz_invalid_trit_byte, r"invalid byte 250"),
    Case("npz-multiplier-nan", "npz", _npz_multiplier(float("nan")), r"multiplier.*(nan|finite)"),
    Case("npz-multiplier-inf", "npz", _npz_multiplier(float("-inf")), r"multiplier.*(inf|finite)"),
    Case("npz-multiplier-zero", "npz", _npz_multiplier(0.0), r"multiplier.*positive"),
    Case("npz-multiplier-negative", "npz", _npz_multiplier(-2.0), r"multiplier.*positive"),
    Case("npz-config-sizes-disagree", "npz", npz_config_sizes_disagree, r"config says"),
    Case("npz-member-header-larger-than-file", "npz", npz_member_larger_than_file, r"bytes|size|truncated"),
    # GGUF files
    Case("gguf-truncated-data", "gguf", gguf_truncated, r"truncated"),
    Case("gguf-truncated-header", "gguf", gguf_truncated_in_header, r"truncated|corrupt"),
    Case("gguf-tensor-count-huge", "gguf", gguf_tensor_count_huge, r"truncated|corrupt"),
    Case("gguf-kv-count-huge", "gguf", gguf_kv_count_huge, r"truncated|corrupt"),
    Case("gguf-unsupported-version", "gguf", gguf_wrong_version, r"version|corrupt"),
    Case("gguf-unsupported-architecture", "gguf", gguf_unsupported_architecture, r"architecture 'falcon'"),
    Case("gguf-unknown-tensor-type", "gguf", gguf_unknown_tensor_type, r"unsupported tensor type|99"),
    Case("gguf-unsupported-projection-type", "gguf", gguf_unsupported_projection_type, r"Q4_0"),
    Case("gguf-unsupported-norm-type", "gguf", gguf_unsupported_norm_type, r"I8|not one of"),
    Case("gguf-alignment-zero", "gguf", gguf_alignment_zero, r"alignment|corrupt"),
    Case("gguf-i2s-code-3", "gguf", gguf_i2s_code_3, r"code 3"),
    Case("gguf-tq2-code-3", "gguf", gguf_tq2_code_3, r"code 3"),
    Case("gguf-f16-projection-not-ternary", "gguf", gguf_f16_not_ternary, r"not a ternary tensor"),
    Case("gguf-i2s-multiplier-nan", "gguf", _gguf_i2s_multiplier(float("nan")), r"multiplier.*(nan|finite)"),
    Case("gguf-i2s-multiplier-zero", "gguf", _gguf_i2s_multiplier(0.0), r"multiplier.*positive"),
    Case("gguf-i2s-multiplier-negative", "gguf", _gguf_i2s_multiplier(-1.0), r"multiplier.*positive"),
    Case("gguf-scale-tensor-inf", "gguf", _gguf_scale_tensor(float("inf")), r"(inf|finite)"),
    Case("gguf-scale-tensor-zero", "gguf", _gguf_scale_tensor(0.0), r"multiplier.*positive"),
    Case("gguf-string-value-not-utf8", "gguf", gguf_string_not_utf8, r"tokenizer\.ggml\.pre|utf-?8"),
    Case("gguf-block-count-huge", "gguf", gguf_block_count_huge, r"num_hidden_layers is 4294967295"),
    Case("gguf-config-key-disagrees", "gguf", gguf_config_key_disagrees, r"config says"),
    Case("gguf-missing-tensor", "gguf", gguf_missing_tensor, r"missing tensor " + re.escape(NORM)),
    Case("gguf-extra-tensor", "gguf", gguf_extra_tensor, r"unexpected tensor model\.layers\.1"),
    Case("npz-named-gguf-given-to-gguf-to-flax", "gguf", gguf_npz_in_disguise, r"not a gguf", pair_only=True),
    Case("gguf-given-to-npz-to-flax", "npz", lambda good, tmp: copy(good["tq2_0"], tmp / "m.gguf"),
         r"not a zip", pair_only=True),
    Case("npz-given-to-hf-to-flax", "hf", lambda good, tmp: copy(good["npz"], tmp / "m.npz"), r"found a file",
         pair_only=True),
    Case("hf-folder-given-to-flax-to-npz", "flax", lambda good, tmp: copy(good["hf"], tmp / "m-hf"),
         r"not a Flax folder", pair_only=True),
    # --- issue 15 §3: bounded work for any input
    Case("hf-modules-to-not-convert-regex", "hf", _hf_quantization(modules_to_not_convert=["(a+)+$", "lm_head"]),
         r"modules_to_not_convert entry '\(a\+\)\+\$' is not a module name"),
    Case("hf-modules-to-not-convert-wildcard", "hf", _hf_quantization(modules_to_not_convert=["model.layers.*"]),
         r"modules_to_not_convert .*not a module name"),
    Case("hf-modules-to-not-convert-dot-matches-any", "hf",
         _hf_quantization(modules_to_not_convert=["model.layers.0.mlp.up.proj"]),
         r"modules_to_not_convert leaves model\.layers\.0\.mlp\.up_proj unquantized"),
    Case("hf-modules-to-not-convert-suffix", "hf", _hf_quantization(modules_to_not_convert=["down_proj"]),
         r"modules_to_not_convert leaves model\.layers\.0\.mlp\.down_proj unquantized"),
    Case("hf-modules-to-not-convert-not-a-list", "hf", _hf_quantization(modules_to_not_convert=5),
         r"modules_to_not_convert is not a list"),
    Case("hf-weights-are-a-fifo", "hf", _hf_fifo("model.safetensors"), r"model\.safetensors: is a FIFO"),
    Case("hf-config-is-a-fifo", "hf", _hf_fifo("config.json"), r"config\.json: is a FIFO"),
    Case("hf-tokenizer-is-a-fifo", "hf", _hf_fifo("tokenizer.json"), r"tokenizer\.json: is a FIFO"),
    Case("hf-weights-are-a-folder", "hf", hf_folder_as_weights, r"model\.safetensors: is a folder"),
    Case("hf-only-pickled-weights", "hf", hf_only_pickled_weights,
         r"pytorch_model\.bin is a pickle, which bitnet-convert never loads"),
    Case("hf-shard-is-a-fifo", "hf", hf_shard_is_fifo, r"model-00001-of-00001\.safetensors: is a FIFO"),
    Case("flax-params-are-a-fifo", "flax", flax_params_fifo, r"params\.safetensors: is a FIFO"),
    Case("npz-is-a-fifo", "npz", npz_fifo, r"m\.npz: is a FIFO"),
    Case("gguf-is-a-fifo", "gguf", gguf_fifo, r"m\.gguf: is a FIFO"),
    Case("dev-zero", "npz", dev_zero, r"/dev/zero: is a character device"),
    Case("flax-tokenizer-file-of-65-mib", "flax", _huge_side_file("flax", "tokenizer.model"),
         r"tokenizer\.model: 68,157,440 bytes, more than any tokenizer file"),
    Case("hf-tokenizer-file-of-65-mib", "hf", _huge_side_file("hf", "tokenizer.json"),
         r"tokenizer\.json: 68,157,440 bytes, more than any tokenizer file"),
    Case("hf-config-of-65-mib", "hf", _huge_side_file("hf", "config.json"),
         r"config\.json: 68,157,440 bytes, more than any config file"),
    Case("npz-deflated-tokenizer-member-of-100-mib", "npz", npz_deflated_tokenizer_member,
         r"member tokenizer/tokenizer\.json: 104,857,600 bytes, more than any tokenizer file"),
    Case("gguf-too-many-metadata-strings", "gguf", gguf_too_many_strings, r"key x\.big .*more than any tokenizer"),
    Case("gguf-nested-array", "gguf", _gguf_added(struct.pack("<Q", 5) + b"x.arr" + struct.pack("<IIQ", 9, 9, 1)
                                                  + struct.pack("<IQ", 4, 0)), r"key x\.arr is an array of arrays"),
    # --- issue 15 §5: every config.json field of the JSON type it must have, at read time, the file named
    Case("hf-config-architectures-an-integer", "hf", _hf_config(architectures=5),
         r"config\.json: architectures is an integer \(5\)"),
    Case("hf-config-architectures-of-objects", "hf", _hf_config(architectures=[{}]),
         r"config\.json: architectures is a list"),
    Case("hf-config-size-a-boolean", "hf", _hf_config(hidden_size=True), r"hidden_size is a boolean"),
    Case("hf-config-size-a-fraction", "hf", _hf_config(intermediate_size=512.5), r"intermediate_size is a number"),
    Case("hf-config-eps-a-string", "hf", _hf_config(rms_norm_eps="1e-5"), r"rms_norm_eps is a string"),
    Case("hf-config-tie-a-string", "hf", _hf_config(tie_word_embeddings="false"), r"tie_word_embeddings is a string"),
    Case("hf-config-rope-parameters-a-list", "hf", _hf_config(rope_parameters=[1]), r"rope_parameters is a list"),
    Case("hf-config-hidden-act-a-list", "hf", _hf_config(hidden_act=["relu2"]), r"hidden_act is a list"),
    Case("hf-config-bos-a-string", "hf", _hf_config(bos_token_id="381"), r"bos_token_id is a string"),
    Case("hf-config-number-beyond-float", "hf", _hf_config_text(_json_field("rope_theta", "1e999")),
         r"config\.json: JSON holding the number 1e999"),
    Case("hf-config-nan-literal", "hf", _hf_config_text(_json_field("initializer_range", "NaN")),
         r"config\.json: JSON holding NaN"),
    Case("hf-config-5000-digit-integer", "hf", _hf_config_text(_json_field("vocab_size", "9" * 5000)),
         r"config\.json: JSON holding an integer of more than 4300 digits"),
    Case("hf-config-nested-too-deeply", "hf", _hf_config_text(_json_field("extra", "[" * 100_000 + "]" * 100_000)),
         r"config\.json: JSON nested too deeply"),
    Case("hf-config-not-utf8", "hf", hf_config_not_utf8, r"config\.json: not UTF-8 text"),
    Case("hf-config-heads-not-a-multiple-of-kv-heads", "hf", _hf_config(num_key_value_heads=3),
         r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    Case("hf-config-odd-head-dim", "hf", _hf_config(head_dim=63), r"head_dim is 63.*even"),
    Case("hf-config-context-2-to-the-33", "hf", _hf_config(max_position_embeddings=2**33),
         r"max_position_embeddings is 8589934592, more than fits a 32-bit size"),
    Case("hf-config-rope-base-beyond-float32", "hf", _hf_config(rope_theta=1e39),
         r"rope_theta is 1e\+39, beyond the float32 range"),
    Case("hf-config-eps-zero-in-float32", "hf", _hf_config(rms_norm_eps=1e-50), r"rms_norm_eps is 1e-50.*0 in"),
    Case("hf-config-negative-bos", "hf", _hf_config(bos_token_id=-1), r"bos_token_id is -1, outside the vocabulary"),
    Case("hf-config-bos-outside-vocabulary", "hf", _hf_config(bos_token_id=384),
         r"bos_token_id is 384, outside the vocabulary \(ids 0\.\.383\)"),
    Case("hf-config-eos-list-outside-vocabulary", "hf", _hf_config(eos_token_id=[383, 5000]),
         r"eos_token_id is 5000, outside"),
    Case("flax-config-heads-not-a-multiple", "flax", _flax_config(num_key_value_heads=3), r"not a multiple"),
    Case("flax-config-size-a-string", "flax", _flax_config(vocab_size="384"), r"vocab_size is a string"),
    Case("npz-config-negative-eos", "npz", _npz_config(eos_token_id=-7), r"eos_token_id is -7"),
    Case("npz-config-number-beyond-float", "npz", _npz_json_member("meta/config.json", '{"rope_theta": 1e999}'),
         r"member meta/config\.json is JSON holding the number 1e999"),
    Case("npz-index-shape-of-floats", "npz", npz_index_shape_float, r"malformed record in meta/tensors\.json"),
    # safetensors indexes: every value of the type it must have
    Case("hf-index-value-an-integer", "hf", _hf_index(_index_value(5)),
         r"index\.json: weight_map entry .*post_attention_layernorm.* is 5, expected a file name"),
    Case("hf-index-value-a-list", "hf", _hf_index(_index_value(["a"])), r"index\.json: weight_map entry .*expected a file"),
    Case("hf-index-value-null", "hf", _hf_index(_index_value(None)), r"index\.json: weight_map entry .*None"),
    Case("hf-index-weight-map-a-list", "hf", _hf_index(lambda index: index.update(weight_map=[])), r"weight_map"),
    Case("hf-index-not-json", "hf", _hf_index(lambda index: '{"weight_map": '), r"index\.json: not valid JSON"),
    Case("hf-index-nested-too-deeply", "hf", _hf_index(lambda index: "[" * 100_000 + "]" * 100_000),
         r"index\.json: JSON nested too deeply"),
    # tokenizer files: JSON, and of the shape the GGUF writer and generate read
    Case("hf-tokenizer-json-not-json", "hf", _hf_tokenizer_bytes("tokenizer.json", b'{"model": '),
         r"tokenizer\.json: not valid JSON"),
    Case("hf-tokenizer-json-a-list", "hf", _hf_tokenizer_bytes("tokenizer.json", b"[]"),
         r"tokenizer\.json: not a JSON object"),
    Case("hf-tokenizer-vocab-a-list", "hf", _hf_tokenizer_field("tokenizer.json", "model.vocab", ["a"]),
         r"tokenizer\.json: model\.vocab is \['a'\]"),
    Case("hf-tokenizer-merge-of-one-part", "hf", _hf_tokenizer_field("tokenizer.json", "model.merges", ["ab"]),
         r"tokenizer\.json: a merge in model\.merges is 'ab'"),
    Case("hf-tokenizer-added-token-id-a-string", "hf",
         _hf_tokenizer_field("tokenizer.json", "added_tokens", [{"id": "5", "content": "<x>"}]),
         r"tokenizer\.json: an entry of added_tokens"),
    Case("hf-tokenizer-config-bos-a-list", "hf", _hf_tokenizer_field("tokenizer_config.json", "bos_token", ["<s>"]),
         r"tokenizer_config\.json: bos_token is \['<s>'\]"),
    Case("hf-tokenizer-config-chat-template-a-number", "hf",
         _hf_tokenizer_field("tokenizer_config.json", "chat_template", 5), r"chat_template is 5"),
    Case("hf-generation-config-eos-a-string", "hf",
         _hf_tokenizer_field("generation_config.json", "eos_token_id", "x"), r"generation_config\.json: eos_token_id"),
    Case("hf-merges-txt-not-utf8", "hf", _hf_tokenizer_bytes("merges.txt", b"a b\n\xff\xfe\n"),
         r"merges\.txt: not UTF-8"),
    Case("npz-tokenizer-config-wrong-shape", "npz", npz_tokenizer_config_wrong_shape,
         r"member tokenizer/tokenizer_config\.json: bos_token is"),
    # GGUF keys: of their GGUF type, in range, lengths that agree
    Case("gguf-head-count-zero", "gguf", _gguf_key("bitnet.attention.head_count", "u32", 0),
         r"num_attention_heads is 0"),
    Case("gguf-block-count-a-string", "gguf", _gguf_key("bitnet.block_count", "string", "1"),
         r"key bitnet\.block_count is a string, expected an integer"),
    Case("gguf-rope-base-a-string", "gguf", _gguf_key("bitnet.rope.freq_base", "string", "1e4"),
         r"key bitnet\.rope\.freq_base is a string, expected a number"),
    Case("gguf-rope-base-beyond-float32", "gguf", _gguf_key("bitnet.rope.freq_base", "f64", 1e39),
         r"rope_theta is 1e\+39, beyond the float32 range"),
    Case("gguf-context-2-to-the-33", "gguf", _gguf_key("bitnet.context_length", "u64", 2**33),
         r"max_position_embeddings is 8589934592, more than fits"),
    Case("gguf-context-negative", "gguf", _gguf_key("bitnet.context_length", "i32", -1),
         r"max_position_embeddings is -1"),
    Case("gguf-architecture-a-number", "gguf", _gguf_key("general.architecture", "u32", 7),
         r"key general\.architecture is u32, expected a string"),
    Case("gguf-bos-outside-vocabulary", "gguf", _gguf_key("tokenizer.ggml.bos_token_id", "u32", 100_000),
         r"bos_token_id is 100000"),
    Case("gguf-bos-negative", "gguf", _gguf_key("tokenizer.ggml.bos_token_id", "i32", -1), r"bos_token_id is -1"),
    Case("gguf-add-bos-not-a-bool", "gguf", _gguf_key("tokenizer.ggml.add_bos_token", "u8", 1),
         r"key tokenizer\.ggml\.add_bos_token is 1, expected a bool"),
    Case("gguf-merges-of-numbers", "gguf", _gguf_key("tokenizer.ggml.merges", "array", [1, 2], "u32"),
         r"key tokenizer\.ggml\.merges is an array of 2, expected"),
    Case("gguf-pre-tokenizer-a-number", "gguf", _gguf_key("tokenizer.ggml.pre", "u32", 3),
         r"key tokenizer\.ggml\.pre is 3, expected a string"),
    Case("gguf-token-type-shorter-than-tokens", "gguf", _gguf_tokens(lambda tokens, types: (tokens, types[:10])),
         r"token_type has 10 entries for 384 tokens"),
    Case("gguf-token-type-out-of-range", "gguf", _gguf_tokens(lambda tokens, types: (tokens, [99] + types[1:])),
         r"key tokenizer\.ggml\.token_type .*expected an array of token types"),
    Case("gguf-fewer-tokens-than-embedding-rows", "gguf", _gguf_tokens(lambda tokens, types: (tokens[:10], types[:10])),
         r"holds 10 tokens, but token_embd\.weight has 384 rows"),
    Case("gguf-key-twice", "gguf", _gguf_added(gguf_entry("bitnet.block_count", "u32", 1)),
         r"key bitnet\.block_count appears twice"),
    Case("gguf-unknown-value-type", "gguf", _gguf_added(struct.pack("<Q", 3) + b"x.y" + struct.pack("<I", 77)),
         r"unknown value type 77"),
    Case("gguf-big-endian", "gguf", gguf_version_big_endian, r"big-endian"),
    # --- issue 24 §3: no error left to the catch-all (each once ended in `error: SomeError: ...`)
    Case("gguf-provenance-nested-100k-deep", "gguf", _gguf_provenance(_DEEP),
         r"key bitnet_convert\.provenance is JSON nested too deeply"),
    Case("gguf-provenance-not-a-string", "gguf", _gguf_provenance(5, "u32"),
         r"key bitnet_convert\.provenance is int, expected a JSON string"),
    Case("gguf-provenance-casts-a-list", "gguf", _gguf_provenance(json.dumps({"tensor_casts": [1, 2]})),
         r"provenance record: tensor_casts is \[1, 2\], expected a JSON object"),
    Case("gguf-provenance-layout-a-list", "gguf", _gguf_provenance(json.dumps({"source_layout": ["bitlinear"]})),
         r"provenance record: source_layout is \['bitlinear'\], expected a JSON string"),
    Case("gguf-provenance-roundings-a-string", "gguf", _gguf_provenance(json.dumps({"multiplier_roundings": "bf16"})),
         r"provenance record: multiplier_roundings is 'bf16', expected a JSON list"),
    Case("npz-provenance-a-list", "npz", _npz_provenance("[1]"), r"provenance record is a JSON list, expected an object"),
    Case("npz-provenance-nested-100k-deep", "npz", _npz_provenance(_DEEP),
         r"member meta/provenance\.json is JSON nested too deeply"),
    Case("npz-provenance-casts-an-integer", "npz", _npz_provenance(json.dumps({"tensor_casts": 5})),
         r"provenance record: tensor_casts is 5, expected a JSON object"),
    Case("flax-provenance-nested-100k-deep", "flax", _folder_provenance("flax", _DEEP),
         r"bitnet_convert\.json: JSON nested too deeply"),
    Case("flax-provenance-a-list", "flax", _folder_provenance("flax", "[1]"), r"bitnet_convert\.json: not a JSON object"),
    Case("hf-provenance-layout-an-integer", "hf", _folder_provenance("hf", '{"source_layout": 5}'),
         r"provenance record: source_layout is 5, expected a JSON string"),
    Case("npz-member-compression-method-99", "npz", _npz_zip_flags(method=99),
         r"member meta/format\.json\.npy uses zip compression method 99"),
    Case("npz-member-encrypted", "npz", _npz_zip_flags(encrypted=True), r"member meta/format\.json\.npy is encrypted"),
]


# ------------------------------------------------------------------------------------------------ running


def commands(src: str, fmt: str | None, out: Path, reference: Path) -> list[tuple[list[str], Path | None]]:
    """(argv, output path or None) for every command that reads `src`."""
    runs = [
        (["convert", src, str(out / "m.npz")], out / "m.npz"),
        (["convert", src, str(out / "m.gguf")], out / "m.gguf"),
        (["convert", src, str(out / "m-i2s.gguf"), "--target", "bitnet.cpp"], out / "m-i2s.gguf"),
        (["convert", src, str(out / "m-hf")], out / "m-hf"),
        (["convert", src, str(out / "m-flax")], out / "m-flax"),
        (["inspect", src], None),
        (["inspect", "--check", src], None),
        (["verify", src, "--reference", str(reference)], None),
    ]
    if fmt is not None:
        dst = "flax" if fmt != "flax" else "npz"
        target = out / ("m-pair.npz" if dst == "npz" else "m-pair-flax")
        runs.append(([f"{fmt}-to-{dst}", src, str(target)], target))
    return runs



def check_refused(argv: list[str], mentions: str, why: str, out: Path, target: Path | None) -> list[str]:
    """Problems with one run, as strings (empty when it behaved)."""
    result = run_cli(argv)
    problems = []
    stderr = result.stderr
    errors = [line for line in stderr.splitlines() if line.lower().startswith("error:")]
    if result.exit_code == 0:
        problems.append("exit code 0")
    if not isinstance(result.exception, (SystemExit, type(None))):
        problems.append(f"exception escaped: {type(result.exception).__name__}: {result.exception}")
    if "Traceback" in stderr or "Traceback" in result.stdout:
        problems.append("traceback printed")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    line = errors[0] if errors else ""
    if mentions not in line:
        problems.append(f"error does not name {mentions}")
    if not re.search(why, line, re.IGNORECASE):
        problems.append(f"error does not match /{why}/")
    if len(line) > 400:
        problems.append(f"error line of {len(line)} characters")
    if "rerun with --debug" in line:  # cli.py's catch-all: every input error has a reader's own line
        problems.append("the catch-all line")
    if target is not None and target.exists():
        problems.append(f"{target.name} exists")
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    if leftovers:
        problems.append(f"left in the output folder: {leftovers}")
    if not problems:
        return []
    return [f"{argv[0]} -> {'; '.join(problems)}   [{line or stderr.strip()[-200:]}]"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, good, tmp_path):
    scratch = tmp_path / "in"
    scratch.mkdir()
    src = case.make(good, scratch)
    before = tree_digest(src)
    problems = []
    runs = commands(str(src), case.fmt, tmp_path / "out", good["hf"])
    for argv, target in runs[-1:] if case.pair_only else runs:
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        problems += check_refused(argv, str(src), case.why, out, target)
        for leftover in out.iterdir():  # keep the next command's check independent of this one's failure
            leftover.unlink() if leftover.is_file() else shutil.rmtree(leftover)
    assert tree_digest(src) == before, "the input was modified"
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------- requests, not files


@pytest.mark.parametrize(
    "argv, why",
    [
        (["convert", "{src}", "{out}/m.npz", "--to", "xyz"], r"invalid value for '--to'.*'xyz'"),
        (["convert", "{src}", "{out}/m.npz", "--from", "safetensors"], r"invalid value for '--from'.*'safetensors'"),
        (["convert", "{src}", "{out}/model.bin"], r"model\.bin.*cannot tell the output format"),
        (["convert", "{src}", "{out}/m.npz", "--outtype", "tq2_0"], r"--outtype does not apply to npz"),
        (["convert", "{src}", "{out}/m.gguf", "--target", "bitnet.cpp", "--outtype", "tq2_0"],
         r"tq2_0 is for llama\.cpp, not bitnet\.cpp"),
        (["convert", "{src}", "{out}/missing-folder/m.npz"], r"missing-folder.*does not exist"),
        (["hf-to-npz", "{src}", "{out}/m.npz", "--revision", "main"], r"--revision applies to"),
    ],
    ids=["unknown-to", "unknown-from", "unknown-suffix", "option-of-other-format", "outtype-for-other-target",
         "output-parent-missing", "revision-on-local-folder"],
)
def test_bad_requests_are_refused_cleanly(argv, why, good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(src=good["hf"], out=out) for a in argv]
    result = run_cli(argv)
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error:")]
    assert result.exit_code != 0
    assert len(errors) == 1, result.stderr
    assert re.search(why, errors[0], re.IGNORECASE), errors[0]
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def test_reference_that_is_not_a_checkpoint_is_refused_by_verify(good, tmp_path):
    result = run_cli(["verify", str(good["npz"]), "--reference", str(tmp_path / "nowhere")])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr
    assert str(tmp_path / "nowhere") in errors[0]


def test_debug_shows_the_traceback(good, tmp_path):
    folder = hf_code_3(good, tmp_path)
    quiet = run_cli(["inspect", str(folder)])
    loud = run_cli(["--debug", "inspect", str(folder)])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and "CorruptData" in loud.stderr
    assert loud.stderr.rstrip().splitlines()[-1].startswith("error:")  # the one line still ends the output


# ------------------------------------------------------------------------------- readers used as a library

_NON_POSITIVE = [
    "hf-weight-scale-zero",
    "hf-weight-scale-negative",
    "npz-multiplier-zero",
    "npz-multiplier-negative",
    "flax-multiplier-zero",
    "flax-multiplier-negative",
    "gguf-i2s-multiplier-zero",
    "gguf-i2s-multiplier-negative",
    "gguf-scale-tensor-zero",
]


@pytest.mark.parametrize("case_id", _NON_POSITIVE)
def test_each_reader_refuses_non_positive_multipliers_itself(case_id, good, tmp_path):
    """The registry's guard (validate.checked) stops these for every command; a reader used directly as a
    library must refuse them too."""
    from bitnet_convert.formats import registry
    from bitnet_core.errors import CorruptData

    case = next(c for c in CASES if c.id == case_id)
    src = case.make(good, tmp_path)
    module = registry.format_module(case.fmt)
    with pytest.raises(CorruptData, match=r"multiplier|weight_scale"):
        for entry in module.read(str(src)):
            entry.load()
