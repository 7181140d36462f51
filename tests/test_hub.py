"""Resolving sources: local folders, and hub repo ids through a fake local Hugging Face cache (no network)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from bitnet_convert.fileio.hub import (
    looks_like_repo_id,
    resolve_source,
    snapshot_revision,
)
from bitnet_convert.formats import hf
from bitnet_core.errors import ConvertError

SHA_MAIN = "a" * 40
SHA_DEV = "b" * 40
SHA_OLD = "c" * 40


def add_snapshot(cache: Path, repo_id: str, sha: str, files: dict[str, bytes], ref: str | None = None) -> Path:
    """Lay a snapshot out as huggingface_hub does: blobs, a snapshots/<sha> folder of links, refs/<branch>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / f"{sha[:8]}-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache; huggingface_hub reads its location at import, so point the constant at it too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE  # set by conftest: nothing here may touch the network
    return cache


def tiny_files(marker: str) -> dict[str, bytes]:
    return {"config.json": json.dumps({"marker": marker}).encode()}


def test_local_folder_is_returned_as_is(tmp_path):
    assert resolve_source(str(tmp_path)) == tmp_path


def test_repo_id_resolves_to_the_snapshot_of_main(hub_cache):
    snapshot = add_snapshot(hub_cache, "org/model", SHA_MAIN, tiny_files("main"), ref="main")
    folder = resolve_source("org/model")
    assert folder == snapshot
    assert json.loads((folder / "config.json").read_text()) == {"marker": "main"}
    assert snapshot_revision(folder) == SHA_MAIN


def test_revision_by_commit_sha_and_by_branch(hub_cache):
    add_snapshot(hub_cache, "org/model", SHA_MAIN, tiny_files("main"), ref="main")
    add_snapshot(hub_cache, "org/model", SHA_DEV, tiny_files("dev"), ref="dev")
    add_snapshot(hub_cache, "org/model", SHA_OLD, tiny_files("old"))  # reachable by sha only
    assert json.loads((resolve_source("org/model", "dev") / "config.json").read_text()) == {"marker": "dev"}
    assert snapshot_revision(resolve_source("org/model", "dev")) == SHA_DEV
    assert json.loads((resolve_source("org/model", SHA_OLD) / "config.json").read_text()) == {"marker": "old"}
    assert resolve_source("org/model", SHA_MAIN) == resolve_source("org/model")


def test_uncached_repo_offline_is_one_clear_line(hub_cache):
    with pytest.raises(ConvertError) as info:
        resolve_source("org/absent")
    message = str(info.value)
    assert message.startswith("org/absent: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in message and "\n" not in message


def test_unknown_revision_offline_names_it(hub_cache):
    add_snapshot(hub_cache, "org/model", SHA_MAIN, tiny_files("main"), ref="main")
    with pytest.raises(ConvertError, match=r"org/model@nope: not in the local Hugging Face cache"):
        resolve_source("org/model", "nope")


def test_local_paths_that_are_not_folders(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ConvertError, match="found a file"):
        resolve_source(str(file))
    with pytest.raises(ConvertError, match="no such folder"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(ConvertError, match="--revision applies to"):
        resolve_source(str(tmp_path), revision="main")


def test_repo_id_syntax():
    assert looks_like_repo_id("microsoft/bitnet-b1.58-2B-4T")
    assert looks_like_repo_id("tiiuae/Falcon3-1B-Instruct-1.58bit")
    for bad in ("model", "a/b/c", "/abs/path", "./x", "../x/y", "org/..", "org/name.", "or g/name"):
        assert not looks_like_repo_id(bad), bad


def test_hf_reader_resolves_a_repo_id_and_records_the_commit(hub_cache, hf_checkpoint):
    source = hf_checkpoint("autobitlinear")
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    add_snapshot(hub_cache, "microsoft/tiny-bitnet", SHA_MAIN, files, ref="main")
    ckpt = hf.read("microsoft/tiny-bitnet")
    assert ckpt.provenance["source"] == "microsoft/tiny-bitnet"
    assert ckpt.provenance["revision"] == SHA_MAIN
    assert hf.detect(Path("microsoft/tiny-bitnet"))
    local = hf.read(str(source))
    assert local.provenance["revision"] is None
    for name in local.tensors:
        a, b = local.load(name), ckpt.load(name)
        assert type(a) is type(b)


@pytest.mark.skipif(shutil.which("env") is None, reason="needs a POSIX env")
def test_cache_location_and_offline_mode_come_from_the_environment(tmp_path):
    """A fresh process (as the CLI runs) finds the cache through HF_HOME and stays offline."""
    home = tmp_path / "hf-home"
    add_snapshot(home / "hub", "org/model", SHA_MAIN, tiny_files("env"), ref="main")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    script = (
        "from bitnet_convert.fileio.hub import resolve_source\n"
        "from bitnet_core.errors import ConvertError\n"
        "print(resolve_source('org/model'))\n"
        "try:\n    resolve_source('org/other')\nexcept ConvertError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(home / "hub" / "models--org--model" / "snapshots" / SHA_MAIN)
    assert lines[1].startswith("org/other: not in the local Hugging Face cache") and "HF_HUB_OFFLINE" in lines[1]
