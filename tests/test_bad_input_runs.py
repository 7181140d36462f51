"""Bad input the case table of test_bad_input.py cannot express (issue 15): a source that changes while it is
read (forced deterministically, between two tensor loads), paths the system refuses, a closed stdout,
`--json` that must stay strict JSON, a reference that holds only a pickle, bounded metadata and generation.

Each test asserts what the table asserts: exit code 2 (or the documented one), one `error:` line naming the
file and the problem, no traceback, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from damage import run_cli, small_checkpoint, write
from test_bad_input import gguf_rebuilt

from bitnet_convert.fileio import sources
from bitnet_convert.formats import flax_dir, registry

OTHER_SEED = 6  # the model written over the source: same shapes, other values


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_refused(result, mentions: str, why: str, out: Path | None = None) -> str:
    """Exit 2, exactly one error line naming `mentions` and matching `why`, no traceback, `out` empty."""
    lines = error_lines(result)
    assert result.exit_code == 2, (result.exit_code, result.stderr[-500:])
    assert len(lines) == 1, result.stderr
    assert mentions in lines[0], lines[0]
    assert re.search(why, lines[0], re.IGNORECASE), lines[0]
    assert "Traceback" not in result.stderr and len(lines[0]) <= 400
    assert "rerun with --debug" not in lines[0], "the catch-all line: no reader or validator said what is wrong"
    if out is not None:
        assert list(out.iterdir()) == [], list(out.iterdir())
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each format of one small model, and of another with the same shapes (what is written over a source)."""
    root = tmp_path_factory.mktemp("models")
    files = {}
    for seed, tag in ((5, "a"), (OTHER_SEED, "b")):
        ckpt = small_checkpoint(seed=seed)
        files[tag] = {"hf": write(ckpt, root / f"{tag}-hf", "hf"), "flax": write(ckpt, root / f"{tag}-flax", "flax"),
                      "npz": write(ckpt, root / f"{tag}.npz", "npz"), "gguf": write(ckpt, root / f"{tag}.gguf", "gguf")}
    return files


# ------------------------------------------------------------------------ a source changed while it is read

# format -> the file inside the source that is changed (None: the source is the file)
CHANGED = {"hf": "model.safetensors", "flax": "params.safetensors", "npz": None, "gguf": None}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    return dst


def _replace(victim: Path, other: Path) -> None:
    """Another model saved over the file the usual way: written beside it, renamed over it."""
    shutil.copyfile(other, victim.with_name(victim.name + ".new"))
    os.replace(victim.with_name(victim.name + ".new"), victim)


def _overwrite(victim: Path, other: Path) -> None:
    """Another model written into the same file (same inode, same size: only the modification time tells)."""
    with open(victim, "r+b") as fh:
        fh.write(other.read_bytes())


CHANGES = {
    "replaced": (_replace, r"was replaced by another file while it was being read"),
    "overwritten-in-place": (_overwrite, r"was modified .* while it was being read"),
    "truncated": (lambda victim, other: os.truncate(victim, victim.stat().st_size // 2),
                  r"(was modified|cut short|truncated)"),
    "removed": (lambda victim, other: victim.unlink(), r"was removed while it was being read"),
}


def change_after_loads(monkeypatch, loads: int, change) -> list[int]:
    """Run `change()` right after the `loads`-th tensor load has passed its check: between two loads."""
    checks = []
    original = sources.SourceWatch.check

    def check(self):
        original(self)
        checks.append(1)
        if len(checks) == loads:
            change()

    monkeypatch.setattr(sources.SourceWatch, "check", check)
    return checks


@pytest.mark.parametrize("how", CHANGES)
@pytest.mark.parametrize("fmt", CHANGED)
def test_a_source_changed_between_two_tensor_loads_is_refused(fmt, how, models, tmp_path, monkeypatch):
    src = _copy(models["a"][fmt], tmp_path / models["a"][fmt].name)
    inner = CHANGED[fmt]
    victim, other = (src / inner, models["b"][fmt] / inner) if inner else (src, models["b"][fmt])
    os.utime(victim, ns=(0, 0))  # an old mtime: an in-place write within the same clock tick still shows
    change, why = CHANGES[how]
    checks = change_after_loads(monkeypatch, 3, lambda: change(victim, other))
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("m-flax" if fmt != "flax" else "m.npz")
    result = run_cli(["convert", str(src), str(target)])
    assert checks, "no tensor load was checked"
    assert_refused(result, str(victim), why, out)


def test_a_config_rewritten_during_the_run_is_refused(models, tmp_path, monkeypatch):
    src = _copy(models["a"]["hf"], tmp_path / "m-hf")
    config = src / "config.json"
    os.utime(config, ns=(0, 0))
    change_after_loads(monkeypatch, 2, lambda: config.write_text(config.read_text().replace("1e-05", "1e-06")))
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(run_cli(["convert", str(src), str(out / "m.npz")]), str(config), r"was modified", out)


def test_an_unchanged_source_passes_every_check(models, tmp_path):
    out = tmp_path / "m.npz"
    result = run_cli(["convert", str(models["a"]["hf"]), str(out)])
    assert result.exit_code == 0, result.stderr
    assert registry.read_checkpoint(str(out)).materialize()


def test_one_descriptor_per_source_file_is_held_for_the_whole_read(models, tmp_path):
    """The file renamed away after open is still the one read: a replacement is never mixed in."""
    src = _copy(models["a"]["flax"], tmp_path / "m-flax")
    ckpt = registry.read_checkpoint(str(src))
    first = next(iter(ckpt)).load()
    _replace(src / "params.safetensors", models["b"]["flax"] / "params.safetensors")
    with pytest.raises(sources.ConvertError, match="was replaced"):
        next(iter(ckpt)).load()
    assert first is not None


# ------------------------------------------------------------------------------- paths the system refuses


def test_a_4200_character_path_is_one_short_line(tmp_path):
    long = str(tmp_path / "/".join(["d" * 200] * 21))
    assert len(long) > 4200
    for argv in (["inspect", long], ["npz-to-flax", long, str(tmp_path / "m-flax")], ["hf-to-npz", long, "m.npz"]):
        line = assert_refused(run_cli(argv), long[:40], r"too long")
        assert "characters)" in line  # shortened, with its length said


def test_a_too_long_output_path_is_one_line(models, tmp_path):
    """(The line's length is atomic.py's: it names the whole path, twice.)"""
    long = str(tmp_path / "/".join(["d" * 200] * 21)) + ".npz"
    result = run_cli(["convert", str(models["a"]["npz"]), long])
    lines = error_lines(result)
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"too long|does not exist", lines[0], re.IGNORECASE), lines[0]


def test_a_read_only_output_folder_is_named(models):
    probe = Path("/sys/bitnet-convert-probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    assert_refused(run_cli(["convert", str(models["a"]["npz"]), "/sys/m.gguf"]), "/sys/", r"denied|read-only|write")


@pytest.mark.parametrize("typo, why", [
    ("models/modle-hf", r"^error: models/modle-hf: no such folder \(models/ exists here: a mistyped folder name\?\)"),
    ("foo/bar", r"not in the local Hugging Face cache .*no local folder of that name either"),
    ("./modle-hf", r"no such (file or )?folder"),
])
def test_a_mistyped_local_path_is_not_reported_as_only_a_missing_hub_id(typo, why, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for argv in (["inspect", typo], ["hf-to-npz", typo, "out.npz"]):
        assert_refused(run_cli(argv), typo.removeprefix("./"), why)


# ------------------------------------------------------------------------------------- closed stdout, JSON


def test_a_closed_stdout_is_one_error_line(models):
    """`inspect m.npz | head -c0`: the reader end closes before anything is written."""
    code = "import sys; from bitnet_convert.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "inspect", str(models["a"]["npz"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    proc.stdout.close()  # long before the child has imported anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["error: standard output: closed before all output was written (broken pipe)"], stderr


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in --json output")

    return json.loads(text, parse_constant=refuse)


def test_inspect_json_is_strict_even_with_nan_in_what_it_reports(models, tmp_path):
    src = _copy(models["a"]["hf"], tmp_path / "m-hf")
    record = src / "bitnet_convert.json"  # what an older or foreign writer may have left: NaN is not JSON
    record.write_text(record.read_text().replace('"producer"', '"weird": NaN, "producer"', 1))
    result = run_cli(["inspect", "--json", str(src)])
    assert result.exit_code == 0, result.stderr
    report = _strict_json(result.stdout)
    assert report["provenance"]["weird"] is None


def test_jsonout_writes_non_finite_numbers_as_null():
    import numpy as np

    from bitnet_convert import jsonout

    text = jsonout.dumps({"a": float("nan"), "b": [np.float32(np.inf), np.float64(1.5)], "c": np.arange(2)})
    assert _strict_json(text) == {"a": None, "b": [None, 1.5], "c": [0, 1]}


def test_inspect_warns_about_nan_values_in_a_dense_tensor(models, tmp_path):
    from damage import NORM, patch_tensor

    src = _copy(models["a"]["hf"], tmp_path / "m-hf")
    patch_tensor(src / "model.safetensors", NORM, bytes.fromhex("c07f"))  # bf16 NaN
    result = run_cli(["inspect", "--json", str(src)])
    assert result.exit_code == 0, result.stderr
    assert f"warning: {NORM}: 1 of 256 values are NaN or infinite" in result.stderr
    _strict_json(result.stdout)


# ----------------------------------------------------------------------------------------- never unpickle


def test_verify_refuses_a_reference_that_holds_only_a_pickle(models, tmp_path):
    reference = _copy(models["a"]["hf"], tmp_path / "ref-hf")
    (reference / "model.safetensors").rename(reference / "pytorch_model.bin")
    result = run_cli(["verify", str(models["a"]["npz"]), "--reference", str(reference)])
    assert_refused(result, str(reference), r"pytorch_model\.bin is a pickle, which bitnet-convert never loads")


def test_the_transformers_reference_loader_refuses_a_pickle_itself(models, tmp_path):
    from bitnet_convert.reference import load_reference

    reference = _copy(models["a"]["hf"], tmp_path / "ref-hf")
    (reference / "model.safetensors").rename(reference / "pytorch_model.bin")
    with pytest.raises(sources.ConvertError, match=r"pytorch_model\.bin is a pickle"):
        load_reference(reference)


# ------------------------------------------------------------------------------------------ bounded work


def test_a_huge_metadata_array_is_skipped_not_parsed(models, tmp_path):
    """One u8 array of 24 M items (gguf-py made a numpy view per item: 1.4 GB and 25 s for 2.4 M): skipped
    in one step, since no reader needs it; the file converts."""
    count = 24_000_000
    entry = struct.pack("<Q", 7) + b"x.bytes" + struct.pack("<IIQ", 9, 0, count) + bytes(count)
    src = gguf_rebuilt(models["a"]["gguf"], tmp_path / "big.gguf", add=(entry,))
    started = time.perf_counter()
    result = run_cli(["convert", str(src), str(tmp_path / "m.npz")])
    assert result.exit_code == 0, result.stderr
    assert time.perf_counter() - started < 20


def test_metadata_strings_are_walked_fast():
    """400 k strings (a real tokenizer's tokens and merges): gguf-py took ~20 s; this parser well under one."""
    from bitnet_convert.formats.gguf.header import GGUFHeader

    count = 400_000
    strings = b"".join(struct.pack("<Q", 3) + b"abc" for _ in range(count))
    entry = struct.pack("<Q", 3) + b"x.s" + struct.pack("<IIQ", 9, 8, count) + strings
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + entry
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"strings-{os.getpid()}.gguf"
    path.write_bytes(raw)
    try:
        started = time.perf_counter()
        header = GGUFHeader(sources.HeldFile(path), path)
        assert len(header.value("x.s")) == count
        assert time.perf_counter() - started < 5
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A small Flax model whose context (max_position_embeddings) is 40 tokens."""
    ckpt = small_checkpoint(seed=4, hidden_size=64, intermediate_size=128)
    ckpt.config["max_position_embeddings"] = 40
    return flax_dir.write(ckpt, str(tmp_path_factory.mktemp("ctx") / "m-flax"))


def test_generate_caps_max_new_tokens_at_the_context_and_says_so(short_context_model, caplog):
    """The KV cache is sized from the request: 10^7 tokens once grew to 24 GB. The CLI prints the log record as
    a `warning:` line (pytest's log capture takes it here)."""
    result = run_cli(["generate", str(short_context_model), "--prompt-ids", "1 2 3", "--max-new-tokens", "10000000"])
    assert result.exit_code == 0, result.stderr
    assert ("--max-new-tokens 10000000 capped at 37: the model's context (max_position_embeddings) is 40 "
            "tokens and the prompt takes 3") in caplog.messages
    assert len(result.stdout.split()) <= 37


def test_generate_refuses_a_prompt_that_fills_the_context(short_context_model):
    ids = " ".join(["1"] * 40)
    assert_refused(run_cli(["generate", str(short_context_model), "--prompt-ids", ids]), "prompt has 40 tokens",
                   r"context \(max_position_embeddings\) holds 40")


def test_within_context_bounds_the_request():
    from bitnet_model.generation import within_context

    assert within_context(3, 10_000_000, 4096) == 4093
    assert within_context(3, 16, 4096) == 16
    with pytest.raises(sources.ConvertError, match="no room"):
        within_context(4096, 1, 4096)


# ------------------------------------------------------------------------ writers name the file they read


def test_a_tokenizer_the_tokenizers_library_refuses_names_the_input_not_the_first_source(models, tmp_path):
    src = _copy(models["a"]["hf"], tmp_path / "m-hf")
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = ["nosuch token"] + tokenizer["model"]["merges"]
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "out"
    out.mkdir()
    line = assert_refused(run_cli(["convert", str(src), str(out / "m.gguf")]), str(src),
                          r"tokenizer\.json is not one the tokenizers library loads", out)
    assert "bitnet_convert.tiny" not in line


# ------------------------------------------------------- issue 24 §3: no error left to the catch-all
# Each case once ended in the generic `error: SomeError: ... (rerun with --debug ...)` line or a misleading one.

CATCH_ALL = "rerun with --debug"


@pytest.mark.parametrize("seed", [str(2 * 10**70), str(2**64), str(2**63), str(2**32), "-1", "-" + "9" * 30])
def test_a_seed_the_sampler_cannot_hold_is_refused(seed, short_context_model):
    """jax.random.key raised OverflowError beyond 64 bits and silently kept 32 bits below (2^32 drew what 0 draws)."""
    result = run_cli(["generate", str(short_context_model), "--prompt-ids", "1 2 3", "--temperature", "1",
                      "--seed", seed])
    line = assert_refused(result, "--seed", r"must be an integer from 0 to 4294967295 .*32 bits\), not -?\d")
    assert CATCH_ALL not in line and len(line) < 160


def test_the_largest_seed_is_used(short_context_model):
    result = run_cli(["generate", str(short_context_model), "--prompt-ids", "1 2 3", "--max-new-tokens", "2",
                      "--temperature", "1", "--seed", str(2**32 - 1)])
    assert result.exit_code == 0, result.stderr


def _generated(model, *options) -> str:
    result = run_cli(["generate", str(model), "--prompt-ids", "1 2 3", "--max-new-tokens", "8", *options])
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("temperature", ["1e-45", "1e-38", "1e-50"])
def test_a_temperature_at_its_limit_is_greedy(temperature, models):
    """1e-45 is a float32 subnormal that XLA flushes to zero: logits / T were NaN and the draw garbage."""
    greedy = _generated(models["a"]["flax"], "--greedy")
    assert _generated(models["a"]["flax"], "--temperature", temperature, "--seed", "5") == greedy


@pytest.mark.parametrize("level, why", [
    ("", r"no verify level given"),
    (",", r"no verify level given"),
    ("all,foo", r"unknown verify level 'foo'"),
    ("all,weights", r"'all' stands alone"),
])
def test_a_verify_level_list_that_says_nothing_or_too_much_is_refused(level, why, models):
    result = run_cli(["verify", str(models["a"]["npz"]), "--reference", str(models["a"]["hf"]), "--level", level])
    assert_refused(result, "verify level", why)


def test_a_prompt_that_is_not_unicode_is_refused(short_context_model):
    """A byte of the command line the locale could not decode arrives as a lone surrogate (tokenizers: TypeError)."""
    result = run_cli(["generate", str(short_context_model), "--prompt", "a\udcffb"])
    assert_refused(result, "the prompt", r"not Unicode text \(character 1 is '\\udcff'")


def test_an_output_path_with_a_nul_byte_is_one_line(models):
    result = run_cli(["convert", str(models["a"]["npz"]), "a\x00b.npz"])
    assert_refused(result, "a\\x00b.npz", r"not a valid path \(it holds a NUL byte\)")


def test_a_file_name_with_a_newline_stays_on_one_line(models, tmp_path):
    src = _copy(models["a"]["hf"], tmp_path / "bad\nname-hf")
    (src / "config.json").write_text("{")
    result = run_cli(["convert", str(src), str(tmp_path / "m.npz")])
    line = assert_refused(result, str(tmp_path / "bad\\nname-hf" / "config.json"), r"not valid JSON")
    assert result.stderr.count("\n") == 1 and line == result.stderr.rstrip("\n")


def _cli_process(*argv) -> subprocess.CompletedProcess:
    """The real command (its own logging setup: in process, pytest's log capture takes warnings first)."""
    return subprocess.run([sys.executable, "-m", "bitnet_convert", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300, check=False)


def test_a_256_mib_stray_file_in_a_flax_folder_is_left_behind_unread_with_a_warning(models, tmp_path, monkeypatch):
    """The README's promise: any other file of a Flax folder stays behind with a warning. It was read whole (and
    refused beyond 64 MiB) instead. The file is sparse: no disk used."""
    src = _copy(models["a"]["flax"], tmp_path / "m-flax")
    with open(src / "notes\nof mine.bin", "wb") as fh:
        fh.truncate(256 << 20)
    read = []
    original = sources.SourceWatch.read_side_file
    monkeypatch.setattr(sources.SourceWatch, "read_side_file",
                        lambda self, path, what="file": read.append(Path(path).name) or original(self, path, what))
    ckpt = registry.read_checkpoint(str(src))
    assert "notes\nof mine.bin" not in read and "notes\nof mine.bin" not in ckpt.tokenizer_files
    done = _cli_process("convert", src, tmp_path / "m.npz")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {src}: not carried into any output (not a known tokenizer file): notes\\nof mine.bin"]


def test_an_npz_member_named_to_escape_is_named_in_a_warning_and_never_written(models, tmp_path, caplog):
    """`tokenizer/../../../x` converted silently: member names never become paths, and now it is said."""
    import io

    import numpy as np

    src = _copy(models["a"]["npz"], tmp_path / "m.npz")
    member = io.BytesIO()
    np.save(member, np.frombuffer(b"escaped", np.uint8))
    with zipfile.ZipFile(src, "a") as zf:
        zf.writestr("tokenizer/../../../x.npy", member.getvalue())
        zf.writestr("elsewhere/y.npy", member.getvalue())
    out = tmp_path / "deep" / "er" / "out"
    out.mkdir(parents=True)
    for target in (out / "m-flax", out / "m-hf"):
        caplog.clear()
        assert run_cli(["convert", str(src), str(target)]).exit_code == 0
        assert f"{src}: not carried into any output (not a known tokenizer file): tokenizer/../../../x" in caplog.messages
        assert f"{src}: members that are no part of this format, ignored: elsewhere/y" in caplog.messages
    written = [p.name for p in tmp_path.rglob("*")]
    assert "x" not in written and "x.npy" not in written and "y" not in written


def test_inspect_json_is_strict_with_nan_in_a_gguf_provenance(models, tmp_path):
    from test_bad_input import gguf_entry

    key = "bitnet_convert.provenance"
    record = '{"producer": "bitnet-convert", "weird": NaN, "big": 1e999}'
    src = gguf_rebuilt(models["a"]["gguf"], tmp_path / "nan.gguf", changes={key: gguf_entry(key, "string", record)})
    result = run_cli(["inspect", "--json", str(src)])
    assert result.exit_code == 0, result.stderr
    report = _strict_json(result.stdout)
    assert report["provenance"]["weird"] is None and report["provenance"]["big"] is None


def test_verify_refuses_a_multiplier_rounding_it_does_not_know(models, tmp_path):
    from test_bad_input import gguf_entry

    key = "bitnet_convert.provenance"
    record = json.dumps({"producer": "bitnet-convert", "multiplier_roundings": ["bf16", "fp4"]})
    src = gguf_rebuilt(models["a"]["gguf"], tmp_path / "r.gguf", changes={key: gguf_entry(key, "string", record)})
    result = run_cli(["verify", str(src), "--reference", str(models["a"]["hf"])])
    assert_refused(result, str(src), r"provenance records a multiplier rounding 'fp4' this bitnet-convert does not know")


@pytest.mark.parametrize("eos", [[1, 2], []])
def test_a_config_whose_eos_is_a_list_verifies_and_generates(eos, models, tmp_path):
    """A list made ModelConfig unhashable: verify's function layer (a jit static argument) ended in ValueError."""
    src = _copy(models["a"]["hf"], tmp_path / "m-hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    result = run_cli(["verify", str(src), "--reference", str(src)])
    assert result.exit_code == 0, result.stderr
    assert run_cli(["convert", str(src), str(tmp_path / "m-flax")]).exit_code == 0
    assert json.loads((tmp_path / "m-flax" / "config.json").read_text())["eos_token_id"] == eos
    result = run_cli(["generate", str(src), "--prompt-ids", "5 6", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory):
    """bitnet.cpp's embedding GGUF of a small Qwen3 BitNet-embedding model (and its Flax folder)."""
    from embedding_fixtures import write_embedding_checkpoint

    from bitnet_convert import api

    root = tmp_path_factory.mktemp("qwen3")
    src = write_embedding_checkpoint(root / "src", "qwen3", "i2s", pooling="lasttoken", tokenizer="gguf")
    return api.convert(src, root / "m.gguf", quiet=True), api.convert(src, root / "m-flax", quiet=True)


@pytest.mark.parametrize("key, value, why", [
    ("qwen3.attention.key_length", 0, r"head_dim is 0, expected a positive integer"),
    ("qwen3.attention.value_length", 32, r"key qwen3\.attention\.value_length is 32, but the heads are 64 wide"),
])
def test_an_embedding_gguf_head_size_no_model_has_is_refused(key, value, why, qwen3_gguf, tmp_path):
    """key_length 0 was read as absent, and value_length (how wide the runtime makes V heads) not at all."""
    from test_bad_input import gguf_entry

    src = gguf_rebuilt(qwen3_gguf[0], tmp_path / "m.gguf", changes={key: gguf_entry(key, "u32", value)})
    for argv in (["inspect", src], ["embed", src, "--text", "hi"], ["convert", src, tmp_path / "m-flax"]):
        assert_refused(run_cli(argv), str(src), why)


def test_a_text_to_embed_that_is_not_unicode_is_refused(qwen3_gguf):
    assert_refused(run_cli(["embed", str(qwen3_gguf[1]), "--text", "ok", "--text", "\udcff"]), "a text to embed",
                   r"not Unicode text \(character 0 is '\\udcff'")


def test_embed_reads_a_bounded_text_file(models):
    """`--file /dev/zero` read lines forever (a device has no end and no newline)."""
    assert_refused(run_cli(["embed", str(models["a"]["flax"]), "--file", "/dev/zero"]), "/dev/zero",
                   r"more than 64 Mi characters of text")


def test_an_output_under_a_file_says_the_parent_is_not_a_folder(models, tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    assert_refused(run_cli(["convert", str(models["a"]["npz"]), str(tmp_path / "afile" / "m.gguf")]),
                   str(tmp_path / "afile"), r"parent folder .*afile is not a folder")


def test_a_written_path_with_a_newline_is_shown_on_one_line(models, tmp_path):
    out = tmp_path / "two\nlines.npz"
    result = run_cli(["convert", str(models["a"]["flax"]), str(out)])
    assert result.exit_code == 0 and out.is_file(), result.stderr
    assert result.stderr.splitlines()[-1] == f"wrote {tmp_path}/two\\nlines.npz"
