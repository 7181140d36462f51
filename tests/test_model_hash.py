"""The model hash (sha256-model-v2 and its successors) covers everything a runtime reads, and outputs carry only
known tokenizer files.

- The model hash (fresh outputs: blake3-model-v4): each edit below passes sha256-tensors-v1 (same tensor names and bytes: asserted) yet makes
  another model, and fails the check with exit 1: a tensor's dtype in a safetensors header (hf, flax) or in
  an npy header (npz, with its index), a GGUF tensor type, config.json's `linear_class`, a config value (flax,
  npz), the GGUF rope base, a swapped tokenizer (every format), an allow-listed tokenizer file added.
- Fresh outputs pass; files recording sha256-tensors-v1 still check (exit 0, 1 after a tensor byte changes) with a
  note of what that hash covers, v2 and v3 files without one; an unknown algorithm is exit 2.
- Stray files never travel: a Flax folder's extra files (a `model.safetensors.index.json` among them) and an npz's
  extra `tokenizer/*` members stay behind, with a warning naming them; only allow-listed tokenizer files arrive.
"""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from damage import (
    GGUF_PROJ,
    NORM,
    copy,
    gguf_kv_value_offset,
    gguf_tensor_info_type_offset,
    npz_array,
    npz_rewrite,
    patch,
    rewrite_safetensors_header,
    run_cli,
    safetensors_offsets,
    small_checkpoint,
    write,
    xor_byte,
)
from gguf import GGMLQuantizationType, GGUFReader

from bitnet_convert.fileio.integrity import (
    HASH_ALGORITHM,
    HASH_V1,
    HASH_V2,
    HASH_V3,
    HASH_V4,
    PROVENANCE_FILE,
    ModelHasher,
    hash_stored,
)
from bitnet_convert.formats import folder, registry

# output variant -> (format, writer options, output name)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "hf": ("hf", {}, "m-hf"),
    "hf-bitlinear": ("hf", {"layout": "bitlinear"}, "m-bitlinear-hf"),
    "flax": ("flax", {}, "m-flax"),
    "npz": ("npz", {}, "m.npz"),
    "gguf-tq2_0": ("gguf", {"outtype": "tq2_0"}, "m-tq2_0.gguf"),
    "gguf-f16": ("gguf", {"outtype": "f16"}, "m-f16.gguf"),
    "gguf-i2_s": ("gguf", {"target": "bitnet.cpp", "outtype": "i2_s"}, "m-i2_s.gguf"),
}
WEIGHTS_FILE = {"hf": "model.safetensors", "flax": "params.safetensors"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2-outputs")
    ckpt = small_checkpoint(seed=31)
    return {name: write(ckpt, root / out, fmt, **opts) for name, (fmt, opts, out) in VARIANTS.items()}


def _module(variant: str):
    return registry.format_module(VARIANTS[variant][0])


def _hash(variant: str, path: Path, algorithm: str) -> str:
    return hash_stored(_module(variant).stored_tensor_bytes(path), algorithm)


def _check(path: Path):
    return run_cli(["inspect", "--check", path])


def _json_member(value) -> np.ndarray:
    return np.frombuffer(json.dumps(value, indent=1).encode(), np.uint8)


def _npz_json(path: Path, key: str):
    return json.loads(bytes(npz_array(path, key)))


def _npz_edit(src: Path, dst: Path, replace: dict | None = None, add: dict | None = None) -> Path:
    """A copy of an .npz with members replaced and added (zip CRCs recomputed: only the content hash can tell)."""
    npz_rewrite(src, dst, replace=replace)
    with zipfile.ZipFile(dst, "a") as zf:
        for key, array in (add or {}).items():
            with zf.open(key + ".npy", "w") as fh:
                np.lib.format.write_array(fh, array, allow_pickle=False)
    return dst


def _edit_json_file(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


def _swapped_vocab(tokenizer_json: bytes) -> bytes:
    """tokenizer.json with the ids of two learned tokens exchanged: a valid tokenizer that encodes differently."""
    tok = json.loads(tokenizer_json)
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return json.dumps(tok).encode()


def _swap_two_gguf_tokens(path: Path) -> None:
    """Exchange two entries of equal length in tokenizer.ggml.tokens, in place (each found once in the file)."""
    tokens = GGUFReader(path).get_field("tokenizer.ggml.tokens").contents()
    raw = bytearray(path.read_bytes())

    def entry(token: str) -> bytes:
        return struct.pack("<Q", len(token.encode())) + token.encode()

    unique = [t for t in tokens[-60:] if len(t.encode()) > 2 and raw.count(entry(t)) == 1]
    a, b = next((a, b) for i, a in enumerate(unique) for b in unique[i + 1 :] if len(a.encode()) == len(b.encode()))
    at_a, at_b = raw.find(entry(a)), raw.find(entry(b))
    raw[at_a : at_a + len(entry(a))], raw[at_b : at_b + len(entry(b))] = entry(b), entry(a)
    path.write_bytes(bytes(raw))


def _set_gguf_tensor_type(path: Path, name: str, ggml_type: GGMLQuantizationType) -> None:
    patch(path, gguf_tensor_info_type_offset(path, name), struct.pack("<I", int(ggml_type)))


# --------------------------------------------------------------------------------------- each edit -> exit 1


def _safetensors_dtype_f16(variant: str, path: Path) -> None:  # BF16 -> F16: same bytes, other numbers
    rewrite_safetensors_header(path / WEIGHTS_FILE[VARIANTS[variant][0]], lambda h: h[NORM].update(dtype="F16"))


def _npy_dtype_f16(variant: str, path: Path) -> Path:
    """bf16 data (stored as <u2) declared float16 in its npy header, and in meta/tensors.json (the reader
    refuses a header that disagrees with the index)."""
    key = f"tensor/{NORM}/data"
    index = _npz_json(path, "meta/tensors.json")
    next(r for r in index if r["name"] == NORM)["dtype"] = "float16"
    edited = {key: npz_array(path, key).view("<f2"), "meta/tensors.json": _json_member(index)}
    return _npz_edit(path, path.with_name("edited.npz"), replace=edited)


def _linear_class_flipped(variant: str, path: Path) -> None:  # every multiplier read as its inverse
    def flip(config):
        quant = config["quantization_config"]
        quant["linear_class"] = "autobitlinear" if quant["linear_class"] == "bitlinear" else "bitlinear"

    _edit_json_file(path / "config.json", flip)


def _rope_theta_changed(variant: str, path: Path) -> Path | None:
    if VARIANTS[variant][0] == "npz":
        config = _npz_json(path, "meta/config.json")
        config["rope_theta"] = 10000.0
        return _npz_edit(path, path.with_name("edited.npz"), replace={"meta/config.json": _json_member(config)})
    _edit_json_file(path / "config.json", lambda config: config.update(rope_theta=10000.0))
    return None


def _gguf_rope_base_changed(variant: str, path: Path) -> None:
    patch(path, gguf_kv_value_offset(path, "bitnet.rope.freq_base")[1], struct.pack("<f", 10000.0))


def _gguf_embedding_type_bf16(variant: str, path: Path) -> None:  # F16 bytes read as BF16
    _set_gguf_tensor_type(path, "token_embd.weight", GGMLQuantizationType.BF16)


def _gguf_projection_type_bf16(variant: str, path: Path) -> None:  # codes +-1.0 in F16 read as BF16 +-2^-7
    _set_gguf_tensor_type(path, GGUF_PROJ, GGMLQuantizationType.BF16)


def _tokenizer_swapped(variant: str, path: Path) -> Path | None:
    fmt = VARIANTS[variant][0]
    if fmt == "gguf":
        _swap_two_gguf_tokens(path)
    elif fmt == "npz":
        key = "tokenizer/tokenizer.json"
        swapped = np.frombuffer(_swapped_vocab(bytes(npz_array(path, key))), np.uint8)
        return _npz_edit(path, path.with_name("edited.npz"), replace={key: swapped})
    else:
        (path / "tokenizer.json").write_bytes(_swapped_vocab((path / "tokenizer.json").read_bytes()))
    return None


def _template_added(variant: str, path: Path) -> None:  # an allow-listed file transformers would now read
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")


EDITS = {
    "safetensors header dtype": (_safetensors_dtype_f16, ["hf", "flax"]),
    "npy header dtype": (_npy_dtype_f16, ["npz"]),
    "config linear_class": (_linear_class_flipped, ["hf", "hf-bitlinear"]),
    "config rope_theta": (_rope_theta_changed, ["flax", "npz"]),
    "gguf rope base": (_gguf_rope_base_changed, ["gguf-tq2_0"]),
    "gguf embedding type": (_gguf_embedding_type_bf16, ["gguf-tq2_0", "gguf-i2_s"]),
    "gguf projection type": (_gguf_projection_type_bf16, ["gguf-f16"]),
    "tokenizer swapped": (_tokenizer_swapped, ["hf", "flax", "npz", "gguf-tq2_0"]),
    "tokenizer file added": (_template_added, ["hf", "flax"]),
}
CASES = [(edit, variant) for edit, (_, variants) in EDITS.items() for variant in variants]


@pytest.mark.parametrize(("edit", "variant"), CASES, ids=[f"{e}-{v}" for e, v in CASES])
def test_check_fails_on_an_edit_the_tensor_hash_cannot_see(edit, variant, outputs, tmp_path):
    original = outputs[variant]
    path = copy(original, tmp_path / original.name)
    path = EDITS[edit][0](variant, path) or path
    registry.read_checkpoint(str(path))  # still a readable model: a different one
    assert _hash(variant, path, HASH_V1) == _hash(variant, original, HASH_V1)  # the v1 hash passes it
    result = _check(path)
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "MISMATCH" in result.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_fresh_output_records_and_passes_the_model_hash(variant, outputs):
    record = _module(variant).recorded_provenance(outputs[variant])
    assert record["hash_algorithm"] == HASH_ALGORITHM == HASH_V4
    assert record["content_hash"] == _hash(variant, outputs[variant], HASH_V4)
    assert record["content_hash"] not in (_hash(variant, outputs[variant], HASH_V3),
                                          _hash(variant, outputs[variant], HASH_V2))
    result = run_cli(["inspect", "--check", "--json", outputs[variant]])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["check_passed"], report["hash_algorithm"], report["hash_note"]) == (True, HASH_V4, None)


def test_files_the_model_hash_does_not_cover(outputs, tmp_path):
    """Only what a runtime reads counts: a README beside an HF model changes nothing."""
    path = copy(outputs["hf"], tmp_path / "m-hf")
    (path / "README.md").write_text("# notes\n")
    assert _check(path).exit_code == 0


def _model_digest(tensors, background: bool = False, in_pieces: bool = False, documents_reversed: bool = False,
                  algorithm: str = HASH_ALGORITHM):
    hasher = ModelHasher(background, algorithm)
    for name, dtype, data in tensors:
        if in_pieces:
            raw = data.reshape(-1).view(np.uint8)
            hasher.begin(name, dtype, data.shape, raw.nbytes)
            for start in range(0, raw.nbytes, 7):
                hasher.update(raw[start : start + 7])
        else:
            hasher.add(name, dtype, data.shape, data)
    documents = [(hasher.add_config, "config.json", b"{}"), (hasher.add_tokenizer_file, "tokenizer.json", b"{}")]
    for add, name, data in reversed(documents) if documents_reversed else documents:
        add(name, data)
    return hasher.hexdigest()


@pytest.mark.parametrize("algorithm", [HASH_V2, HASH_V3, HASH_V4])
def test_the_model_hash_streams_and_describes_each_tensor(algorithm):
    """Pieces, a thread of its own and the order of the documents give one digest; a dtype or shape another."""
    tensors = [("a", "U8", np.arange(20, dtype=np.uint8)), ("b", "F32", np.ones((2, 3), np.float32))]
    digest = _model_digest(tensors, algorithm=algorithm)
    assert _model_digest(tensors, background=True, in_pieces=True, documents_reversed=True,
                         algorithm=algorithm) == digest
    assert _model_digest([tensors[0], ("b", "I32", tensors[1][2])], algorithm=algorithm) != digest
    assert _model_digest([tensors[0], ("b", "F32", tensors[1][2].reshape(3, 2))], algorithm=algorithm) != digest
    with pytest.raises(TypeError, match="StoredModel"):
        hash_stored([("a", b"")], HASH_V2)


# -------------------------------------------------------------------------------------- older hashes still check


def _record_older(variant: str, path: Path, algorithm: str = HASH_V1) -> Path:
    """The file as an older bitnet-convert wrote it: its record names `algorithm` and that digest."""
    fmt = VARIANTS[variant][0]
    record = _module(variant).recorded_provenance(path)
    old = dict(record, hash_algorithm=algorithm, content_hash=_hash(variant, path, algorithm))
    if fmt in ("hf", "flax"):
        (path / PROVENANCE_FILE).write_text(json.dumps(old, indent=2))
        return path
    if fmt == "npz":
        return _npz_edit(path, path.with_name("older.npz"), replace={"meta/provenance.json": _json_member(old)})
    # GGUF: rewrite the key's JSON in place at the same length (v1's longer name: two separator spaces pay)
    new = json.dumps(old, sort_keys=True)
    if len(algorithm) != len(HASH_ALGORITHM):
        new = new.replace(f'"hash_algorithm": "{algorithm}", ', f'"hash_algorithm":"{algorithm}",')
    before = json.dumps(record, sort_keys=True).encode()
    assert len(new) == len(before)
    data = path.read_bytes()
    assert data.count(before) == 1
    path.write_bytes(data.replace(before, new.encode()))
    return path


@pytest.mark.parametrize("variant", ["hf", "flax", "npz", "gguf-tq2_0"])
def test_a_v1_hash_still_checks_with_a_note_of_what_it_covers(variant, outputs, tmp_path):
    path = _record_older(variant, copy(outputs[variant], tmp_path / outputs[variant].name))
    result = _check(path)
    assert result.exit_code == 0, result.stderr
    assert f"OK  ({HASH_V1})" in result.stdout
    assert "covers tensor names and bytes only" in result.stdout
    report = json.loads(run_cli(["inspect", "--check", "--json", path]).stdout)
    assert report["hash_algorithm"] == HASH_V1 and "tensor names and bytes only" in report["hash_note"]


def test_a_v1_hash_still_fails_when_a_tensor_byte_changes(outputs, tmp_path):
    path = _record_older("hf", copy(outputs["hf"], tmp_path / "m-hf"))
    xor_byte(path / "model.safetensors", safetensors_offsets(path / "model.safetensors")[NORM][0])
    result = _check(path)
    assert result.exit_code == 1 and "MISMATCH" in result.stdout


@pytest.mark.parametrize("algorithm", [HASH_V2, HASH_V3])
@pytest.mark.parametrize("variant", ["hf", "flax", "npz", "gguf-tq2_0"])
def test_v2_and_v3_hashes_still_check_without_a_note(variant, algorithm, outputs, tmp_path):
    """Files of earlier versions record sha256-model-v2 or v3: they cover what v4 does, so no note; a changed
    byte still fails."""
    path = _record_older(variant, copy(outputs[variant], tmp_path / outputs[variant].name), algorithm)
    report = json.loads(run_cli(["inspect", "--check", "--json", path]).stdout)
    assert (report["check_passed"], report["hash_algorithm"], report["hash_note"]) == (True, algorithm, None)
    if variant == "hf":
        xor_byte(path / "model.safetensors", safetensors_offsets(path / "model.safetensors")[NORM][0])
        result = _check(path)
        assert result.exit_code == 1 and "MISMATCH" in result.stdout


@pytest.mark.parametrize("algorithm", ["sha256-model-v9", None, ["sha256-model-v2"]])
def test_an_unknown_hash_algorithm_is_refused(algorithm, outputs, tmp_path):
    path = copy(outputs["hf"], tmp_path / "m-hf")
    _edit_json_file(path / PROVENANCE_FILE, lambda record: record.update(hash_algorithm=algorithm))
    result = _check(path)
    assert result.exit_code == 2
    assert f"{algorithm!r}" in result.stderr and "does not know" in result.stderr


# --------------------------------------------------------------------------------------------- stray files

ALLOWED_EXTRAS = {"chat_template.jinja": b"{{ messages }}", "generation_config.json": b"{}"}
STRAYS = {
    "model.safetensors.index.json": json.dumps({"weight_map": {NORM: "other.safetensors"}}).encode(),
    "other.safetensors": b"not these weights",
    "notes.txt": b"a stray file",
}


def _own_files(fmt: str) -> set[str]:
    return {"config.json", PROVENANCE_FILE, WEIGHTS_FILE[fmt]}


@pytest.mark.parametrize("target", ["hf", "flax"])
def test_a_flax_folder_passes_on_only_its_tokenizer_files(target, outputs, tmp_path, caplog):
    source = copy(outputs["flax"], tmp_path / "src-flax")
    for name, data in {**ALLOWED_EXTRAS, **STRAYS, ".hidden": b"x"}.items():
        (source / name).write_bytes(data)
    out = tmp_path / f"out-{target}"
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        write(registry.read_checkpoint(str(source)), out, target)
    expected = _own_files(target) | {"tokenizer.json", "tokenizer_config.json"} | set(ALLOWED_EXTRAS)
    assert {p.name for p in out.iterdir()} == expected
    assert (out / "chat_template.jinja").read_bytes() == ALLOWED_EXTRAS["chat_template.jinja"]
    warned = [r.getMessage() for r in caplog.records if "not carried" in r.getMessage()]
    assert len(warned) == 1 and all(name in warned[0] for name in STRAYS), warned
    assert _check(out).exit_code == 0  # its own weights, its hash: no index redirects the reader


@pytest.mark.parametrize("target", ["hf", "npz"])
def test_an_npz_passes_on_only_its_tokenizer_files(target, outputs, tmp_path, caplog):
    members = {**ALLOWED_EXTRAS, **STRAYS, "config.json": b"{}", PROVENANCE_FILE: b"{}"}
    added = {f"tokenizer/{name}": np.frombuffer(data, np.uint8) for name, data in members.items()}
    source = _npz_edit(outputs["npz"], tmp_path / "src.npz", add=added)
    out = tmp_path / ("out-hf" if target == "hf" else "out.npz")
    with caplog.at_level(logging.WARNING, logger="bitnet_convert"):
        write(registry.read_checkpoint(str(source)), out, target)
    tokenizer = {"tokenizer.json", "tokenizer_config.json"} | set(ALLOWED_EXTRAS)
    if target == "hf":
        assert {p.name for p in out.iterdir()} == _own_files("hf") | tokenizer
        assert json.loads((out / "config.json").read_text())["vocab_size"] > 0  # ours, not the stray "{}"
    else:
        with zipfile.ZipFile(out) as zf:
            carried = {n[len("tokenizer/") : -len(".npy")] for n in zf.namelist() if n.startswith("tokenizer/")}
        assert carried == tokenizer
    warned = [r.getMessage() for r in caplog.records if "not carried" in r.getMessage()]
    assert len(warned) == 1 and all(name in warned[0] for name in (*STRAYS, "config.json", PROVENANCE_FILE))
    assert _check(out).exit_code == 0


@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja", "generation_config.json"])
def test_known_tokenizer_files(name):
    assert folder.is_tokenizer_file(name)


@pytest.mark.parametrize("name", ["../x.jinja", "a/b.jinja", ".x.jinja", "model.safetensors.index.json",
                                  "config.json", PROVENANCE_FILE, "model.safetensors", "x.jinja.txt"])
def test_names_that_never_travel(name):
    assert not folder.is_tokenizer_file(name)
    assert folder.carried_tokenizer_files({name: b"x"}, "src") == {}


def test_a_name_the_target_reserves_never_travels():
    files = {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"}
    assert folder.carried_tokenizer_files(files, "src", reserved=["tokenizer.json"]) == {"tokenizer_config.json": b"{}"}
