"""Outputs are all or nothing (issue #5, part 2): killed runs, full disks, and refusing to overwrite.

Every writer writes into a hidden `.NAME.partial-*` file or folder beside the target and renames it at the
end. These tests drive the real command line and check what is left on disk:
- a conversion SIGKILLed half-way leaves nothing at the target path, and the next run still succeeds;
- a full disk (a tiny tmpfs where we may mount one, and everywhere a file-size limit, which makes write()
  fail in the kernel whatever library does the writing) gives one clean error and no partial output;
- an existing output is refused without --force and stays byte-identical; with --force it is replaced only
  by a whole new output, never by a failed one.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from damage import (
    PROJ,
    copy,
    patch_tensor,
    run_cli,
    small_checkpoint,
    small_sources,
    tree_digest,
    write,
)

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = {"npz": "m.npz", "gguf": "m.gguf", "hf": "m-hf", "flax": "m-flax"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return small_sources(tmp_path_factory.mktemp("src"))



def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def child_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "tests"))
    return env


# ------------------------------------------------------------------------------------------------- SIGKILL

# The conversion, slowed down: each tensor waits before loading, so the writer is caught with a partial output.
SLOW_CONVERT = textwrap.dedent(
    """
    import dataclasses, sys, time
    from bitnet_convert import cli
    from bitnet_convert.fileio import direct
    from bitnet_convert.formats import registry

    direct.BUFFER_BYTES = direct.BLOCK  # a small output reaches the disk as it is written, as a large one does

    read = registry.read_checkpoint

    def slow_read(*args, **kwargs):
        ckpt = read(*args, **kwargs)

        def slow(entry):
            def load():
                time.sleep(0.25)
                return entry.load()
            return dataclasses.replace(entry, load=load)

        return dataclasses.replace(ckpt, tensors={n: slow(e) for n, e in ckpt.tensors.items()})

    registry.read_checkpoint = slow_read
    cli.main(sys.argv[1:], prog_name="bitnet-convert")
    """
)


def _partial_with_data(folder: Path, name: str) -> Path | None:
    for partial in folder.glob(f".{name}.partial-*"):
        files = [partial] if partial.is_file() else [p for p in partial.rglob("*") if p.is_file()]
        if any(f.stat().st_size > 0 for f in files):
            return partial
    return None


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_sigkill_mid_conversion_leaves_nothing_at_the_target(fmt, sources, tmp_path):
    script = tmp_path / "slow_convert.py"
    script.write_text(SLOW_CONVERT)
    out = tmp_path / "out"
    out.mkdir()
    target = out / OUTPUTS[fmt]
    proc = subprocess.Popen([sys.executable, str(script), "convert", str(sources["npz"]), str(target), "-q"],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        partial = None
        while partial is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            partial = _partial_with_data(out, target.name)
        assert partial is not None, f"no partial output seen (exit {proc.poll()}): {proc.stderr.read()[-2000:]!r}"
        assert not target.exists()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not target.exists(), "a killed conversion left a file at the target path"
    assert [p.name for p in out.iterdir()] == [partial.name]  # only the hidden partial, never a visible file

    # The leftover does not get in the way of the next run, which produces a whole, checkable output.
    result = run_cli(["convert", sources["npz"], target, "-q"])
    assert result.exit_code == 0, result.stderr
    check = run_cli(["inspect", "--check", target])
    assert check.exit_code == 0, check.stderr
    assert "OK" in check.stdout


# ----------------------------------------------------------------------------------------------- full disk

FILE_SIZE_LIMITED = textwrap.dedent(
    """
    import json, resource, signal, sys
    from click.testing import CliRunner
    from bitnet_convert import cli

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing us
    src, out, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    results = []
    for i, (name, limit) in enumerate(limits):  # run i writes into folder out/i
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            r = CliRunner().invoke(cli.main, ["convert", src, f"{out}/{i}/{name}", "-q"])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        results.append([name, limit, r.exit_code, r.stderr, repr(r.exception)])
    print(json.dumps(results))
    """
)


def test_write_failures_give_one_clean_error_and_no_partial_output(sources, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the kernel refuse writes past it, for every way of writing
    (Python file objects, zipfile, numpy's tofile inside gguf-py). Limits hit the first bytes, the middle and
    the end of each output."""
    script = tmp_path / "fsize.py"
    script.write_text(FILE_SIZE_LIMITED)
    out = tmp_path / "out"
    out.mkdir()
    limits = [[name, limit] for name in OUTPUTS.values() for limit in (1, 4096, 150_000, 420_000)]
    for i in range(len(limits)):
        (out / str(i)).mkdir()
    proc = subprocess.run([sys.executable, str(script), str(sources["npz"]), str(out), json.dumps(limits)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = 0
    for i, (name, limit, code, stderr, exception) in enumerate(results):
        target = out / str(i) / name
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if code == 0:  # the whole output fitted under this limit: then it must be complete
            assert run_cli(["inspect", "--check", target]).exit_code == 0
            continue
        failed += 1
        assert code == 2, (name, limit, stderr, exception)
        assert len(errors) == 1 and f"{target}: could not write" in errors[0], (name, limit, stderr)
        assert "Traceback" not in stderr
        assert list(target.parent.iterdir()) == [], (name, limit)  # no target, no partial
    assert failed >= 3 * len(OUTPUTS)  # 1 byte, 4 KiB and 150 kB are less than any output


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs: less than any output of the small model (every one is above 300 kB)."""
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(disk, "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights); the RLIMIT_FSIZE test covers it")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_full_disk_gives_one_clean_error_and_no_partial_output(fmt, sources, small_disk):
    target = small_disk / OUTPUTS[fmt]
    result = run_cli(["convert", sources["npz"], target, "-q"])
    errors = error_lines(result)
    assert result.exit_code == 2, result.stderr
    assert len(errors) == 1 and f"{target}: could not write" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(small_disk.iterdir()) == []  # no target, no partial: the space is given back
    # and the disk is usable again at once: a small file fits
    (small_disk / "after").write_bytes(b"x" * 100_000)


# ------------------------------------------------------------------------------------------------ --force


def _snapshot(path: Path) -> tuple[dict, dict]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tree_digest(path), {str(p): p.stat().st_mtime_ns for p in files}


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_existing_output_is_refused_without_force_and_stays_identical(fmt, sources, tmp_path):
    target = tmp_path / OUTPUTS[fmt]
    assert run_cli(["convert", sources["npz"], target, "-q"]).exit_code == 0
    before = _snapshot(target)

    result = run_cli(["convert", sources["other"], target, "-q"])
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {target}: already exists (use --force to overwrite)"]
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_force_never_replaces_an_output_with_a_failed_one(fmt, sources, tmp_path):
    """The damage (code 3 in a packed weight) is found only while writing: the old output must survive."""
    bad = copy(sources["hf"], tmp_path / "bad-hf")
    patch_tensor(bad / "model.safetensors", PROJ, b"\xff")
    target = tmp_path / OUTPUTS[fmt]
    assert run_cli(["convert", sources["npz"], target, "-q"]).exit_code == 0
    before = _snapshot(target)

    result = run_cli(["convert", bad, target, "--force", "-q"])
    assert result.exit_code == 2 and "code 3" in result.stderr
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, "bad-hf"])


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_force_replaces_an_output_with_a_whole_new_one(fmt, sources, tmp_path):
    target = tmp_path / OUTPUTS[fmt]
    assert run_cli(["convert", sources["npz"], target, "-q"]).exit_code == 0
    old_digest, _ = _snapshot(target)
    if target.is_dir():
        # A file our writers write (a tokenizer file of an older source) must not survive the replacement; a file
        # of the user's makes --force refuse instead (test_clobber.py).
        (target / "special_tokens_map.json").write_text("{}")

    result = run_cli(["convert", sources["other"], target, "--force", "-q"])
    assert result.exit_code == 0, result.stderr
    new_digest, _ = _snapshot(target)
    assert new_digest != old_digest
    assert not any("special_tokens_map" in name for name in new_digest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no .old-* or .partial-* left
    check = run_cli(["inspect", "--check", "--json", target])
    assert check.exit_code == 0, check.stderr
    assert json.loads(check.stdout)["provenance"]["source"] == "bitnet_convert.tiny seed=12"  # the new source


@pytest.mark.parametrize(
    "existing, out, why",
    [
        ("folder", "m.npz", "is a folder"),  # a folder named like a file output
        ("folder", "m.gguf", "is a folder"),
        ("file", "m-hf", "is a file"),  # a file named like a folder output
        ("folder", "m-flax", "folder holds no model"),  # the user's own folder, e.g. `convert x ~/models --force`
        ("folder", "docs", "folder holds no model"),
    ],
)
def test_force_replaces_only_an_output_of_the_same_kind(existing, out, why, sources, tmp_path):
    target = tmp_path / out
    if existing == "folder":
        target.mkdir()
        (target / "keep.txt").write_text("keep me")
    else:
        target.write_text("keep me")
    before = _snapshot(target)
    result = run_cli(["convert", sources["npz"], target, "--force", "-q", *(["--to", "hf"] if out == "docs" else [])])
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.stderr
    assert error_lines(result)[0].startswith(f"error: {target}: {why}")
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_outputs_get_ordinary_permissions(fmt, sources, tmp_path):
    """The private 0600/0700 modes of the temporary file do not stick to the published output."""
    old = os.umask(0o022)
    try:
        target = Path(write(small_checkpoint(seed=11), tmp_path / OUTPUTS[fmt], fmt))
    finally:
        os.umask(old)
    files = [target] if target.is_file() else [target, *target.iterdir()]
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
