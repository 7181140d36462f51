"""Nothing the user has is lost (issue #15, part 1): what --force may replace, OUT against SRC, races, signals.

Every case checks what is on disk afterwards, entry by entry (hidden ones, folders and links included):
- --force replaces only an earlier output of bitnet-convert in the same format, and names what is in the way;
- an output that is the input, holds it or lies inside it is refused, with or without --force;
- a target that appears, changes or is swapped while a conversion runs is never replaced by it (the races are
  forced by running the other party at the moment before publishing), also without renameat2 (lock file);
- a dangling symlink at the output path counts as existing;
- SIGTERM and SIGHUP remove the hidden partial output as Ctrl-C does, and the process still ends by the signal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from damage import run_cli, small_checkpoint, small_sources, write
from gguf import GGUFWriter
from test_atomic import SLOW_CONVERT, _partial_with_data, child_env

import bitnet_convert
from bitnet_convert.fileio import atomic
from bitnet_convert.formats import flax_dir, hf, npz, registry
from bitnet_core.errors import ConvertError

OUTPUTS = {"npz": "m.npz", "gguf": "m.gguf", "hf": "m-hf", "flax": "m-flax"}
FOLDERS = ("hf", "flax")
SOURCE_OF = {11: "bitnet_convert.tiny seed=11", 12: "bitnet_convert.tiny seed=12"}
# Child scripts start with both signals at their default action, whatever they inherited (`nohup` ignores SIGHUP).
DEFAULT_SIGNALS = "import signal\nfor s in (signal.SIGTERM, signal.SIGHUP):\n    signal.signal(s, signal.SIG_DFL)\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return small_sources(tmp_path_factory.mktemp("src"))


def listing(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (the folder itself excluded), without following links: what kind, and the
    sha256 of a file or the target of a link. Equal listings: nothing was added, removed or changed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISDIR(mode):
                found[str(path.relative_to(root))] = ("dir",)
            else:
                found[str(path.relative_to(root))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def source_of(path: Path) -> str:
    """The provenance source `inspect` reads from a whole, checkable output."""
    check = run_cli(["inspect", "--check", "--json", path])
    assert check.exit_code == 0, check.stderr
    return json.loads(check.stdout)["provenance"]["source"]


def converted(src: Path, target: Path, *args) -> Path:
    result = run_cli(["convert", src, target, "-q", *args])
    assert result.exit_code == 0, result.stderr
    return target


def refused(argv, starts: str):
    """The CLI run must stop with exit 2 and one error line starting with `starts`."""
    result = run_cli(argv)
    assert result.exit_code == 2, result.stderr
    assert len(error_lines(result)) == 1 and "Traceback" not in result.stderr, result.stderr
    assert error_lines(result)[0].startswith(f"error: {starts}"), result.stderr
    return error_lines(result)[0]


# -------------------------------------------------------------------------------- --force: only our output


def git_clone_of_a_model(folder: Path, hf_source: Path) -> Path:
    """What `git clone` of a hub model repo holds: the model files plus the user's own."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_bytes((hf_source / name).read_bytes())
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "README.md").write_text("# my notes\n")
    (folder / "other.gguf").write_bytes(b"GGUF my other model")
    (folder / "experiments").mkdir()
    (folder / "experiments" / "run1.json").write_text("{}")
    return folder


@pytest.mark.parametrize("fmt", FOLDERS)
def test_force_never_deletes_a_git_clone(fmt, sources, tmp_path):
    clone = git_clone_of_a_model(tmp_path / OUTPUTS[fmt], sources["hf"])
    before = listing(tmp_path)
    line = refused(["convert", sources["npz"], clone, "--force", "-q"],
                   f"{clone}: folder holds no model written by bitnet-convert (no bitnet_convert.json)")
    assert "in the way: .git/, README.md, experiments/, other.gguf;" in line  # named, folders marked
    assert "even with --force" in line
    assert listing(tmp_path) == before  # .git/ and all the rest untouched, no partial left


@pytest.mark.parametrize("fmt", FOLDERS)
@pytest.mark.parametrize("intruder", ["README.md", "notes/", ".DS_Store", "weights.bin"])
def test_force_refuses_our_folder_once_the_user_added_to_it(fmt, intruder, sources, tmp_path):
    target = converted(sources["npz"], tmp_path / OUTPUTS[fmt])
    if intruder.endswith("/"):
        (target / intruder).mkdir()
        (target / intruder / "todo.txt").write_text("mine")
    else:
        (target / intruder).write_text("mine")
    before = listing(tmp_path)
    line = refused(["convert", sources["other"], target, "--force", "-q"],
                   f"{target}: folder holds what bitnet-convert does not write: {intruder};")
    assert line.endswith("refusing to replace it, even with --force")
    assert listing(tmp_path) == before
    assert source_of(target) == SOURCE_OF[11]  # still the old output


def test_force_refuses_a_link_inside_our_folder(sources, tmp_path):
    """A file of ours replaced by a link (to the user's file elsewhere) is no longer ours to delete."""
    target = converted(sources["npz"], tmp_path / "m-hf")
    precious = tmp_path / "precious.json"
    precious.write_text('{"mine": true}')
    (target / "tokenizer.json").unlink()
    (target / "tokenizer.json").symlink_to(precious)
    before = listing(tmp_path)
    refused(["convert", sources["other"], target, "--force", "-q"],
            f"{target}: folder holds what bitnet-convert does not write: tokenizer.json;")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("record", [
    None,  # a model folder of another tool, with the old marker config.json
    "not json",
    json.dumps(["a", "list"]),
    json.dumps({"producer": "some-other-tool", "format": "hf"}),
])
def test_force_refuses_a_folder_without_our_provenance(record, sources, tmp_path):
    target = tmp_path / "m-hf"
    target.mkdir()
    (target / "config.json").write_text("{}")
    if record is not None:
        (target / "bitnet_convert.json").write_text(record)
    before = listing(tmp_path)
    line = refused(["convert", sources["npz"], target, "--force", "-q"],
                   f"{target}: folder holds no model written by bitnet-convert (no bitnet_convert.json);")
    assert "in the way" not in line  # nothing but names a model folder has: the record is what is missing
    assert listing(tmp_path) == before


@pytest.mark.parametrize("existing, writing", [("hf", "flax"), ("flax", "hf")])
def test_force_replaces_a_folder_only_by_the_same_format(existing, writing, sources, tmp_path):
    target = converted(sources["npz"], tmp_path / "model", "--to", existing)
    before = listing(tmp_path)
    refused(["convert", sources["other"], target, "--force", "-q", "--to", writing],
            f"{target}: folder holds a {existing} output of bitnet-convert, not {writing}; --force replaces an "
            "output only by one of the same format")
    assert listing(tmp_path) == before


def foreign_gguf(path: Path) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.context_length", 16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("make, out, why", [
    (lambda p: p.write_bytes(b"precious"), "m.npz", ""),  # then the reader's own words say why
    (lambda p: np.savez(p, weights=np.arange(4)), "m.npz", "(it records no bitnet-convert provenance)"),
    (lambda p: p.write_bytes(b"precious"), "m.gguf", ""),
    (foreign_gguf, "m.gguf", "(it records no bitnet-convert provenance)"),
])
def test_force_refuses_a_file_we_did_not_write(make, out, why, sources, tmp_path):
    target = tmp_path / out
    make(target)
    before = listing(tmp_path)
    line = refused(["convert", sources["npz"], target, "--force", "-q"], f"{target}: not an output of bitnet-convert (")
    assert why in line and line.endswith("refusing to replace it, even with --force")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("existing, writing", [("npz", "gguf"), ("gguf", "npz")])
def test_force_replaces_a_file_only_by_the_same_format(existing, writing, sources, tmp_path):
    """Our own npz named like a GGUF (or the other way round) is not an output of the format being written."""
    target = converted(sources["npz"], tmp_path / "model.bin", "--to", existing)
    before = listing(tmp_path)
    refused(["convert", sources["other"], target, "--force", "-q", "--to", writing],
            f"{target}: not an output of bitnet-convert (")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_force_replaces_our_own_output_of_the_same_format(fmt, sources, tmp_path):
    target = converted(sources["npz"], tmp_path / OUTPUTS[fmt])
    assert source_of(target) == SOURCE_OF[11]
    converted(sources["other"], target, "--force")
    assert source_of(target) == SOURCE_OF[12]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no .partial-*, .old-* or .lock left


def test_force_replaces_a_sharded_output_and_leaves_none_of_its_shards(sources, tmp_path):
    target = tmp_path / "m-hf"
    hf.write(small_checkpoint(seed=11), str(target), max_shard_bytes=20_000)
    shards = sorted(p.name for p in target.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (target / "model.safetensors.index.json").is_file()
    converted(sources["other"], target, "--force")
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["bitnet_convert.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert source_of(target) == SOURCE_OF[12]


@pytest.mark.parametrize("fmt", FOLDERS)
def test_force_replaces_an_empty_folder(fmt, sources, tmp_path):
    """Nothing to lose; the folder becomes the output."""
    (tmp_path / OUTPUTS[fmt]).mkdir()
    target = converted(sources["npz"], tmp_path / OUTPUTS[fmt], "--force")
    assert source_of(target) == SOURCE_OF[11]


@pytest.mark.parametrize("record, why", [
    ({"producer": "bitnet-convert", "format": "npz"}, "holds a npz output of bitnet-convert, not gguf"),
    ({"producer": "bitnet-convert"}, "holds a format-less output of bitnet-convert, not gguf"),
    ({"producer": "another-tool", "format": "gguf"}, "not an output of bitnet-convert (it records no"),
    (None, "not an output of bitnet-convert (it records no"),
    (["not", "a", "record"], "not an output of bitnet-convert (it records no"),
])
def test_a_file_is_ours_only_if_its_record_names_us_and_the_format(record, why, tmp_path):
    """What the format's reader of its provenance answers, as atomic_path judges it."""
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with atomic.replacing_outputs_of("gguf", lambda path: record), pytest.raises(ConvertError, match=re.escape(why)):
        with atomic.atomic_path(target, force=True) as tmp:
            tmp.write_bytes(b"new")
    assert listing(tmp_path) == {"m.gguf": ("file", hashlib.sha256(b"old").hexdigest())}
    with atomic.replacing_outputs_of("gguf", lambda path: {"producer": "bitnet-convert", "format": "gguf"}):
        with atomic.atomic_path(target, force=True) as tmp:
            tmp.write_bytes(b"new")
    assert listing(tmp_path) == {"m.gguf": ("file", hashlib.sha256(b"new").hexdigest())}


def test_writers_called_directly_recognize_their_outputs(tmp_path):
    """A writer called directly names its own format and reader around its output (replacing_outputs_of), as the
    registry does: --force replaces its own earlier output, file or folder, and nothing else."""
    ckpt = small_checkpoint(seed=11)
    folder = hf.write(ckpt, str(tmp_path / "m-hf"))
    hf.write(small_checkpoint(seed=12), str(folder), force=True)
    assert source_of(folder) == SOURCE_OF[12]
    with pytest.raises(ConvertError, match="holds a hf output of bitnet-convert, not flax"):
        flax_dir.write(ckpt, str(folder), force=True)

    file = npz.write(ckpt, str(tmp_path / "m.npz"))
    npz.write(small_checkpoint(seed=12), str(file), force=True)
    assert source_of(file) == SOURCE_OF[12]
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    before = listing(tmp_path)
    with pytest.raises(ConvertError, match="not an output of bitnet-convert"):
        npz.write(ckpt, str(foreign), force=True)
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------- OUT is never SRC


def same_path_cases(sources, tmp_path):
    """(argv, what the error says) for every way OUT can be SRC, hold it or lie inside it."""
    npz_src = tmp_path / "a.npz"
    npz_src.write_bytes(sources["npz"].read_bytes())
    hf_src = tmp_path / "a-hf"
    hf_src.mkdir()
    for p in sources["hf"].iterdir():
        (hf_src / p.name).write_bytes(p.read_bytes())
    (tmp_path / "link.npz").symlink_to(npz_src)
    os.link(npz_src, tmp_path / "hard.npz")
    os.link(hf_src / "model.safetensors", tmp_path / "weights.npz")
    (tmp_path / "link-hf").symlink_to(hf_src)
    return [
        (["convert", npz_src, npz_src], f"{npz_src}: is the input {npz_src}"),
        (["npz-to-gguf", npz_src, npz_src], f"{npz_src}: is the input {npz_src}"),  # the pair commands too
        (["convert", npz_src, tmp_path / "sub" / ".." / "a.npz", "--to", "gguf"], "is the input"),
        (["convert", npz_src, tmp_path / "link.npz"], "is the input"),  # a symlink to the input
        (["convert", tmp_path / "link.npz", npz_src], "is the input"),  # the input named through a symlink
        (["convert", npz_src, tmp_path / "hard.npz"], "is the input"),  # a hard link: the same inode
        (["hf-to-flax", hf_src, hf_src], f"{hf_src}: is the input {hf_src}"),
        (["convert", hf_src, tmp_path / "link-hf"], "is the input"),
        (["convert", npz_src, tmp_path, "--to", "hf"], f"{tmp_path}: holds the input {npz_src}"),
        (["convert", hf_src, tmp_path.parent, "--to", "flax"], "holds the input"),
        (["convert", hf_src, hf_src / "m.npz"], f"{hf_src / 'm.npz'}: lies inside the input {hf_src}"),
        (["convert", hf_src, hf_src / "new" / "m-flax"], "lies inside the input"),
        (["convert", hf_src, tmp_path / "link-hf" / "m.gguf"], "lies inside the input"),
        (["convert", hf_src, tmp_path / "weights.npz"], "is a file of the input"),  # a hard link into it
    ]


@pytest.mark.parametrize("force", [False, True])
def test_an_output_over_the_input_is_refused_with_or_without_force(force, sources, tmp_path):
    for argv, says in same_path_cases(sources, tmp_path):
        before = listing(tmp_path)
        result = run_cli([*argv, "-q", *(["--force"] if force else [])])
        assert result.exit_code == 2, (argv, result.stderr)
        assert len(error_lines(result)) == 1, (argv, result.stderr)
        assert says in error_lines(result)[0], (argv, result.stderr)
        assert error_lines(result)[0].endswith("write the output somewhere else"), (argv, result.stderr)
        assert listing(tmp_path) == before, argv  # the input whole, no partial output anywhere


def test_the_output_is_compared_with_the_input_before_the_input_is_read(tmp_path):
    """Even an input that cannot be read: the answer is that OUT is SRC, not what is wrong with SRC."""
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a model")
    for force in ([], ["--force"]):
        refused(["convert", junk, junk, "--to", "gguf", "-q", *force], f"{junk}: is the input {junk}")
    assert junk.read_bytes() == b"not a model"


def test_every_pair_command_refuses_its_own_input(sources, tmp_path):
    """`gguf-to-npz m.gguf m.gguf --force` made the GGUF a zip; `hf-to-flax SRC SRC --force` made SRC Flax."""
    inputs = {"npz": sources["npz"], "hf": sources["hf"]}
    inputs["gguf"] = converted(sources["npz"], tmp_path / "a.gguf")
    inputs["flax"] = converted(sources["npz"], tmp_path / "a-flax")
    before = {fmt: listing(path.parent) for fmt, path in inputs.items()}
    for src_fmt, src in inputs.items():
        for dst_fmt in (fmt for fmt in OUTPUTS if fmt != src_fmt):
            refused([f"{src_fmt}-to-{dst_fmt}", src, src, "--force", "-q"], f"{src}: is the input {src}")
    assert {fmt: listing(path.parent) for fmt, path in inputs.items()} == before


def test_the_api_write_checks_where_the_checkpoint_was_read_from(sources, tmp_path):
    src = Path(bitnet_convert.convert(sources["npz"], tmp_path / "m.gguf"))
    before = listing(tmp_path)
    ckpt = bitnet_convert.read(src)
    for out in (src, tmp_path):
        with pytest.raises(ConvertError, match="the input"):
            bitnet_convert.write(ckpt, out, format="gguf" if out == src else "hf", force=True)
    assert listing(tmp_path) == before
    bitnet_convert.write(ckpt, tmp_path / "copy.gguf")  # anywhere else is fine
    assert source_of(tmp_path / "copy.gguf") == SOURCE_OF[11]


def test_a_checkpoint_made_in_memory_has_no_input_to_protect(tmp_path):
    """No provenance path (a hub id, a model built in Python): nothing to compare, the write goes ahead."""
    ckpt = small_checkpoint(seed=11)
    assert "path" not in ckpt.provenance
    atomic.refuse_output_over_input(None, tmp_path)
    atomic.refuse_output_over_input("microsoft/bitnet-b1.58-2B-4T", tmp_path / "x")  # not a local path
    assert source_of(write(ckpt, tmp_path / "m.npz", "npz")) == SOURCE_OF[11]


# ------------------------------------------------------------------------------------------------- races


@pytest.fixture
def at_publish(monkeypatch):
    """at_publish(action): run `action()` once, after the conversion wrote its whole output and before it
    publishes it: the other party of a race, at the worst moment, deterministically."""

    def install(action):
        real = atomic._publish_mode
        pending = [action]

        def publish_mode(path):
            real(path)
            if pending:
                pending.pop()()

        monkeypatch.setattr(atomic, "_publish_mode", publish_mode)

    return install


def other_run(src: Path, target: Path, force: bool = False):
    """The other party of a race: a whole conversion (through the registry, as the CLI's)."""
    return lambda: registry.convert(str(src), str(target), force=force, quiet=True)


def no_renameat2(monkeypatch):
    """As on a kernel or file system without renameat2: publishing falls back to the lock file."""
    monkeypatch.setattr(atomic, "_SYSCALL", None)


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock-file"])
@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_two_runs_the_second_finished_output_is_never_replaced(fmt, fallback, sources, tmp_path, at_publish,
                                                               monkeypatch):
    """Run A starts; run B writes the same output and finishes while A writes; A must not replace it."""
    if fallback:
        no_renameat2(monkeypatch)
    target = tmp_path / OUTPUTS[fmt]
    at_publish(other_run(sources["other"], target))  # run B, inside A
    refused(["convert", sources["npz"], target, "-q"],
            f"{target}: already exists: it appeared while this conversion ran (another run?); left as it is")
    assert source_of(target) == SOURCE_OF[12]  # B's output, whole
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # A's partial removed, no lock file left


def users_own(target: Path, fmt: str) -> dict[str, tuple]:
    """Put the user's own entry at `target` (a folder with a README, or a file); returns its listing."""
    if fmt in FOLDERS:
        target.mkdir()
        (target / "README.md").write_text("mine")
        return {target.name: ("dir",), f"{target.name}/README.md": ("file", hashlib.sha256(b"mine").hexdigest())}
    target.write_text("mine")
    return {target.name: ("file", hashlib.sha256(b"mine").hexdigest())}


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock-file"])
@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_force_checks_again_at_publishing(fmt, fallback, sources, tmp_path, at_publish, monkeypatch):
    """Our output at the start, the user's own in its place at the end: that one is never replaced."""
    if fallback:
        no_renameat2(monkeypatch)
    target = converted(sources["npz"], tmp_path / OUTPUTS[fmt])
    expected = {}

    def users_own_in_its_place():
        atomic._remove(target)
        expected.update(users_own(target, fmt))

    at_publish(users_own_in_its_place)
    line = refused(["convert", sources["other"], target, "--force", "-q"], f"{target}: ")
    assert "refusing to replace it, even with --force" in line
    assert listing(tmp_path) == expected  # the user's entry alone: no partial, no lock file


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_force_onto_nothing_refuses_what_appears_meanwhile_unless_ours(fmt, sources, tmp_path, at_publish):
    target = tmp_path / OUTPUTS[fmt]
    expected = {}
    at_publish(lambda: expected.update(users_own(target, fmt)))
    refused(["convert", sources["npz"], target, "--force", "-q"], f"{target}: ")
    assert listing(tmp_path) == expected

    # The other run wrote our output there meanwhile: --force replaces it (the last run wins, both are ours).
    atomic._remove(target)
    at_publish(other_run(sources["other"], target))
    converted(sources["npz"], target, "--force")
    assert source_of(target) == SOURCE_OF[11]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize("fmt", FOLDERS)
def test_force_never_deletes_an_entry_swapped_in_after_the_last_check(fmt, sources, tmp_path, monkeypatch):
    """Between the check at publishing and the exchange another folder takes the target's place: the exchange
    swaps it out, sees it is not what was checked, swaps it back and refuses."""
    target = converted(sources["npz"], tmp_path / OUTPUTS[fmt])
    real_check = atomic._check_replaceable
    calls = []

    def check_then_swap(path, directory, writing):
        found = real_check(path, directory, writing)
        calls.append(path)
        if len(calls) == 2:  # the check at publishing (the first one ran before the conversion)
            os.rename(target, tmp_path / "ours-moved-away")
            target.mkdir()
            (target / "README.md").write_text("mine")
        return found

    monkeypatch.setattr(atomic, "_check_replaceable", check_then_swap)
    refused(["convert", sources["other"], target, "--force", "-q"],
            f"{target}: changed while this conversion ran; left as it is")
    assert len(calls) == 2
    assert listing(target) == {"README.md": ("file", hashlib.sha256(b"mine").hexdigest())}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, "ours-moved-away"])


@pytest.mark.parametrize("fmt", FOLDERS)
def test_force_keeps_the_target_path_occupied_while_replacing_a_folder(fmt, sources, tmp_path, monkeypatch):
    """RENAME_EXCHANGE: when the old output is deleted, the new one is already at the target path."""
    target = converted(sources["npz"], tmp_path / OUTPUTS[fmt])
    real_remove = atomic._remove
    seen = []

    def remove(path):
        record = json.loads((target / "bitnet_convert.json").read_text())
        seen.append((path.name, record["source"], json.loads((path / "bitnet_convert.json").read_text())["source"]))
        real_remove(path)

    monkeypatch.setattr(atomic, "_remove", remove)
    converted(sources["other"], target, "--force")
    assert len(seen) == 1 and seen[0][0].startswith(f".{target.name}.partial-")  # swapped out to our temporary name
    assert seen[0][1:] == (SOURCE_OF[12], SOURCE_OF[11])  # the new output in place, then the old one deleted
    assert source_of(target) == SOURCE_OF[12]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_without_renameat2_runs_take_turns_on_a_lock_file(sources, tmp_path, monkeypatch):
    """Run B publishes while run A holds the lock (A checked: nothing there, and is renaming): B waits, then
    sees A's output and refuses."""
    no_renameat2(monkeypatch)
    target = tmp_path / "m.npz"
    a_output = converted(sources["npz"], tmp_path / "a-output.npz")
    failures = []

    def run_b():
        try:
            other_run(sources["other"], target)()
        except ConvertError as exc:
            failures.append(str(exc))

    with atomic._publish_lock(target):
        assert (tmp_path / ".m.npz.lock").is_file()
        b = threading.Thread(target=run_b)
        b.start()
        time.sleep(1.5)  # B has long finished writing its partial output: it must be waiting for the lock
        assert b.is_alive() and not target.exists()
        os.rename(a_output, target)  # A's rename, under the lock
    b.join(timeout=60)
    assert failures and "appeared while this conversion ran" in failures[0]
    assert source_of(target) == SOURCE_OF[11]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the lock file removed by its last holder


# ---------------------------------------------------------------------------------- stranded .NAME.old-*


def test_a_stranded_old_output_is_put_back_when_the_target_is_missing(sources, tmp_path, caplog):
    """An older version (or this one without renameat2) interrupted between its two renames: the target is
    gone and the old output sits in `.NAME.old-*`. The next run restores it before anything else."""
    old = converted(sources["npz"], tmp_path / "m-hf")
    stranded = tmp_path / ".m-hf.old-1a2b3c4d"
    os.rename(old, stranded)
    content = listing(stranded)
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        refused(["convert", sources["other"], old, "-q"], f"{old}: already exists (use --force to overwrite)")
    assert f"restored the earlier output stranded in {stranded.name}" in caplog.text
    assert listing(old) == content and not stranded.exists()
    converted(sources["other"], old, "--force")  # and --force then replaces it as usual
    assert source_of(old) == SOURCE_OF[12]
    assert [p.name for p in tmp_path.iterdir()] == ["m-hf"]


KILLED_BETWEEN_RENAMES = DEFAULT_SIGNALS + textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from bitnet_convert.fileio import atomic
    from bitnet_convert.formats import registry

    src, target = sys.argv[1], Path(sys.argv[2])
    atomic._SYSCALL = None  # no renameat2: a folder is replaced in two renames
    rename = os.rename

    def killed_on_the_second(a, b):
        if Path(b) == target and Path(a).name.startswith(f".{target.name}.partial-"):
            os.kill(os.getpid(), signal.SIGKILL)
        rename(a, b)

    os.rename = killed_on_the_second
    registry.convert(src, str(target), force=True)
    """
)


def without_renameat2_a_folder_is_replaced(sources, target: Path, monkeypatch, fail_with: BaseException, raised):
    """Replace `target` with --force, the second of the two renames failing with `fail_with`; the conversion
    must raise `raised`."""
    no_renameat2(monkeypatch)
    real_rename = os.rename

    def fail_on_the_second(src, dst):
        if Path(dst) == target and Path(src).name.startswith(f".{target.name}.partial-"):
            raise fail_with
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", fail_on_the_second)
    try:
        with pytest.raises(raised):
            registry.convert(str(sources["other"]), str(target), force=True, quiet=True)
    finally:
        monkeypatch.setattr(atomic.os, "rename", real_rename)


@pytest.mark.parametrize("fail_with, raised", [(KeyboardInterrupt(), KeyboardInterrupt),
                                               (OSError(5, "Input/output error"), ConvertError)])
def test_without_renameat2_an_error_between_the_two_renames_puts_the_old_output_back(fail_with, raised, sources,
                                                                                     tmp_path, monkeypatch):
    target = converted(sources["npz"], tmp_path / "m-flax")
    before = listing(tmp_path)
    without_renameat2_a_folder_is_replaced(sources, target, monkeypatch, fail_with, raised)
    assert listing(tmp_path) == before  # the old output back at the target, nothing stranded or partial


def test_a_kill_between_the_two_renames_loses_nothing(sources, tmp_path, caplog, monkeypatch):
    """`kill -9` between the two renames strands the old output in `.NAME.old-*` (the target is missing; the
    partial output and the lock file stay too, both hidden); the next run puts it back before anything else."""
    target = converted(sources["npz"], tmp_path / "m-flax")
    content = listing(target)
    script = tmp_path.parent / f"{tmp_path.name}-killed.py"
    script.write_text(KILLED_BETWEEN_RENAMES)
    proc = subprocess.run([sys.executable, str(script), str(sources["other"]), str(target)], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lock, stranded, partial = sorted(p.name for p in tmp_path.iterdir())
    assert lock == ".m-flax.lock" and stranded.startswith(".m-flax.old-") and partial.startswith(".m-flax.partial-")
    assert listing(tmp_path / stranded) == content  # the old output, whole

    no_renameat2(monkeypatch)  # the next run on the same file system: no renameat2 either
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        refused(["convert", sources["other"], target, "-q"], f"{target}: already exists (use --force")
    assert f"{target}: restored the earlier output stranded in {stranded}" in caplog.text
    assert listing(target) == content
    converted(sources["other"], target, "--force")
    assert source_of(target) == SOURCE_OF[12]
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial, "m-flax"]  # the lock file taken and removed


def test_stranded_old_outputs_beside_a_target_are_reported_not_touched(sources, tmp_path, caplog):
    target = converted(sources["npz"], tmp_path / "m-hf")
    for suffix in ("aaaa", "bbbb"):
        (tmp_path / f".m-hf.old-{suffix}").mkdir()
        (tmp_path / f".m-hf.old-{suffix}" / "config.json").write_text("{}")
    before = listing(tmp_path)
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        refused(["convert", sources["other"], target, "-q"], f"{target}: already exists")
    assert caplog.text.count("stranded by an interrupted --force; delete it when no longer needed") == 2
    assert listing(tmp_path) == before

    atomic._remove(target)  # two candidates and no target: which one was the output is not ours to guess
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        converted(sources["other"], target)
    assert caplog.text.count("delete it when no longer needed") == 2 and "restored" not in caplog.text
    assert source_of(target) == SOURCE_OF[12]


# --------------------------------------------------------------------------------------- dangling symlinks


@pytest.mark.parametrize("fmt", list(OUTPUTS))
@pytest.mark.parametrize("points_to", ["nowhere", "existing"])
def test_a_symlink_at_the_output_path_is_an_existing_output(fmt, points_to, sources, tmp_path):
    target = tmp_path / OUTPUTS[fmt]
    if points_to == "existing":
        (tmp_path / "elsewhere").write_text("mine")
    target.symlink_to(tmp_path / ("elsewhere" if points_to == "existing" else "missing"))
    before = listing(tmp_path)
    refused(["convert", sources["npz"], target, "-q"], f"{target}: already exists (use --force to overwrite)")
    assert listing(tmp_path) == before
    refused(["convert", sources["npz"], target, "-q", "--force"],
            f"{target}: is a symbolic link (bitnet-convert never writes one); refusing to replace it, even with "
            "--force")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("fmt", ["npz", "hf"])
def test_a_dangling_symlink_that_appears_while_writing_is_not_replaced(fmt, sources, tmp_path, at_publish):
    target = tmp_path / OUTPUTS[fmt]
    at_publish(lambda: target.symlink_to(tmp_path / "missing"))
    refused(["convert", sources["npz"], target, "-q"], f"{target}: already exists: it appeared while")
    assert listing(tmp_path) == {target.name: ("link", str(tmp_path / "missing"))}


# ---------------------------------------------------------------------------------------------- signals

SLOW_CONVERT_DEFAULT_SIGNALS = DEFAULT_SIGNALS + SLOW_CONVERT


def run_slow_and_signal(tmp_path: Path, argv: list, out: Path, name: str, signum: int) -> tuple[int, str]:
    """Start a slowed-down conversion, send `signum` once its partial output holds data; (exit status, stderr)."""
    script = tmp_path / "slow_convert.py"
    script.write_text(SLOW_CONVERT_DEFAULT_SIGNALS)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, argv)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _partial_with_data(out, name) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _partial_with_data(out, name) is not None, f"no partial output seen (exit {proc.poll()})"
        os.kill(proc.pid, signum)
        code = proc.wait(timeout=60)
        return code, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("fmt", ["npz", "gguf", "flax"])
def test_sigterm_and_sighup_remove_the_partial_output(fmt, signum, sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / OUTPUTS[fmt]
    code, stderr = run_slow_and_signal(tmp_path, ["convert", sources["npz"], target, "-q"], out, target.name, signum)
    assert code == -signum, stderr  # ended by the signal (a shell shows 128 + N: 143, 129)
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []  # no target, no partial


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_force_keeps_the_old_output(signum, sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = converted(sources["npz"], out / "m-hf")
    before = listing(out)
    code, stderr = run_slow_and_signal(tmp_path, ["convert", sources["other"], target, "-q", "--force"], out,
                                       target.name, signum)
    assert code == -signum, stderr
    assert listing(out) == before


SIGNAL_IN_PROCESS = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from bitnet_convert.fileio import atomic

    target, moment = Path(sys.argv[1]), sys.argv[2]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    def signalled(call, before):  # `call`, with SIGTERM arriving just before or just after it
        def run(*args, **kwargs):
            if before:
                os.kill(os.getpid(), signal.SIGTERM)
            result = call(*args, **kwargs)
            if not before:
                os.kill(os.getpid(), signal.SIGTERM)
            return result
        return run
    if moment == "publishing":  # as the rename starts: it waits until the output is in place
        atomic._renameat2 = signalled(atomic._renameat2, before=True)
    if moment == "creating":  # once the partial file exists, before atomic_path knows its name
        atomic.tempfile.mkstemp = signalled(atomic.tempfile.mkstemp, before=False)
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 100_000)
        if moment == "writing":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    print("not reached", flush=True)
    """
)


@pytest.mark.parametrize("moment", ["creating", "writing", "publishing"])
def test_a_signal_is_delivered_again_once_the_output_is_cleaned_up_or_whole(moment, tmp_path):
    script = tmp_path / "signal_in_process.py"
    script.write_text(SIGNAL_IN_PROCESS)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(out / "m.bin"), moment], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "not reached" not in proc.stdout and "Traceback" not in proc.stderr
    if moment in ("creating", "writing"):
        assert list(out.iterdir()) == []
    else:  # publishing is never cut in half: the output is whole at the target, then the process ends
        assert [p.name for p in out.iterdir()] == ["m.bin"] and (out / "m.bin").read_bytes() == b"x" * 100_000


def test_the_signal_handlers_are_only_borrowed(tmp_path):
    """Installed over the default action for the duration of atomic_path only; an application's own handler
    and an ignored signal (nohup) stay as they are."""

    def own(signum, frame):
        pass

    previous = {s: signal.getsignal(s) for s in atomic.TERMINATING_SIGNALS}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with atomic.atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"a")
            assert all(callable(signal.getsignal(s)) for s in atomic.TERMINATING_SIGNALS)
        assert [signal.getsignal(s) for s in atomic.TERMINATING_SIGNALS] == [signal.SIG_DFL, signal.SIG_DFL]

        signal.signal(signal.SIGTERM, own)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with atomic.atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"b")
            assert signal.getsignal(signal.SIGTERM) is own and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is own and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_an_atomic_path_in_another_thread_leaves_signals_alone(tmp_path):
    """Python runs handlers in the main thread only: a writer in a worker thread installs none (and does not fail)."""
    seen = {}

    def worker():
        with atomic.atomic_path(tmp_path / "t.bin") as tmp:
            tmp.write_bytes(b"t")
            seen["handlers"] = [signal.getsignal(s) for s in atomic.TERMINATING_SIGNALS]

    before = [signal.getsignal(s) for s in atomic.TERMINATING_SIGNALS]
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["handlers"] == before
    assert (tmp_path / "t.bin").read_bytes() == b"t"
