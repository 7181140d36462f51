"""The output pipeline's options (issue 24): --dry-run, --vocab-only, --split-max-size / --split-max-tensors
and --metadata, each checked on what lands on disk (or does not), read back by our reader, by inspect --check
and, where it is installed, by llama.cpp (llama-cpp-python) itself."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from damage import run_cli

from bitnet_convert import api
from bitnet_convert.fileio import atomic, integrity
from bitnet_convert.formats import registry
from bitnet_convert.formats.gguf.header import GGUFHeader
from bitnet_convert.fileio.sources import SourceWatch
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Ternary, ternary_entry
from bitnet_core.errors import ConvertError

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny model as an HF folder: what the CLI converts."""
    folder = tmp_path_factory.mktemp("src") / "tiny-hf"
    registry.write_checkpoint(tiny_checkpoint(seed=3), str(folder), "hf")
    return folder


@pytest.fixture(scope="module")
def whole(source, tmp_path_factory):
    """The same model as one GGUF file: what a split set and a dry run are compared with."""
    return api.convert(source, tmp_path_factory.mktemp("whole") / "m.gguf")


def header(path) -> GGUFHeader:
    return GGUFHeader(SourceWatch().hold(Path(path)), Path(path))


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def loaded(path) -> dict:
    """Every tensor of a checkpoint, loaded (ternary: codes and multiplier)."""
    out = {}
    for entry in api.read(path):
        value = entry.load()
        out[entry.name] = (value.codes, value.multiplier) if isinstance(value, Ternary) else np.asarray(value)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        for x, y in zip(a[name] if isinstance(a[name], tuple) else (a[name],),
                        b[name] if isinstance(b[name], tuple) else (b[name],), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)


def with_bad_codes(ckpt, name: str):
    """`ckpt` whose projection `name` loads a code 2 (outside -1, 0, +1): what no writer may store."""
    bad = Ternary(np.full(ckpt[name].shape, 2, np.int8), np.float32(0.5))
    ckpt.tensors[name] = ternary_entry(name, ckpt[name].shape, lambda: bad)
    return ckpt


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# ---------------------------------------------------------------------------------------------- --dry-run


@pytest.mark.parametrize("fmt, name", [("gguf", "m.gguf"), ("npz", "m.npz"), ("hf", "m-hf"), ("flax", "m-flax")])
def test_dry_run_describes_what_is_then_written_and_writes_nothing(source, tmp_path, fmt, name):
    out = tmp_path / name
    result = run_cli(["convert", source, out, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert entries(tmp_path) == []  # nothing written, not even a partial file
    written = api.convert(source, out)
    stored = list(registry.format_module(fmt).stored_tensor_bytes(written).tensors())
    assert [(t["name"], t["type"], t["shape"], t["bytes"]) for t in described["tensors"]] == \
        [(t.name, t.dtype, list(t.shape), t.data.nbytes) for t in stored]
    assert described["total_bytes"] == sum(t.data.nbytes for t in stored)
    assert described["files"] == [str(out)]
    if fmt == "gguf":
        keys = header(written)
        assert described["architecture"] == keys.value("general.architecture")
        assert set(described["keys"]) | {"bitnet_convert.provenance"} == \
            {k for k in keys.fields if not k.startswith("GGUF.")}
        assert described["keys"]["general.file_type"] == keys.value("general.file_type")


def test_dry_run_text_names_every_tensor_and_the_total(source, tmp_path):
    result = run_cli(["hf-to-gguf", source, tmp_path / "m.gguf", "--dry-run", "--outtype", "tq1_0"])
    assert result.exit_code == 0, result.output
    assert "architecture  bitnet" in result.stdout
    assert "blk.0.attn_q.weight" in result.stdout and "TQ1_0" in result.stdout
    assert "total" in result.stdout.splitlines()[-1]
    assert entries(tmp_path) == []


def test_dry_run_reads_every_tensor(tmp_path):
    """A code the writer would refuse is refused by the dry run too: it produces every tensor."""
    ckpt = with_bad_codes(tiny_checkpoint(seed=4), "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(Exception, match=r"must be -1, 0 or \+1"):
        api.write(ckpt, tmp_path / "m.npz", dry_run=True)
    assert entries(tmp_path) == []


def test_json_without_dry_run_is_refused_before_anything_is_written(source, tmp_path):
    out = tmp_path / "m.gguf"
    assert "--json goes with --dry-run" in one_error_line(run_cli(["convert", source, out, "--json"]))
    assert "--json goes with --dry-run" in one_error_line(run_cli(["hf-to-npz", source, tmp_path / "m.npz", "--json"]))
    assert list(tmp_path.iterdir()) == []


def test_dry_run_refuses_what_the_conversion_would(source, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    line = one_error_line(run_cli(["convert", source, out, "--dry-run"]))
    assert "already exists" in line
    assert out.read_bytes() == b"mine"


# -------------------------------------------------------------------------------------------- --vocab-only


@pytest.fixture(scope="module")
def vocab_only(source, tmp_path_factory):
    return api.convert(source, tmp_path_factory.mktemp("vocab") / "vocab.gguf", vocab_only=True)


def test_vocab_only_holds_the_keys_and_no_tensor(vocab_only, whole):
    keys, full = header(vocab_only), header(whole)
    assert keys.tensors == []
    ours = {k for k in keys.fields if not k.startswith("GGUF.")}
    assert ours == {k for k in full.fields if not k.startswith("GGUF.")}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "bitnet.block_count", "bitnet.embedding_length"):
        assert keys.value(key) == full.value(key), key
    assert json.loads(keys.value("bitnet_convert.provenance"))["vocab_only"] is True


def test_vocab_only_reads_back_as_a_tokenizer(vocab_only, whole):
    vocab, full = api.read(vocab_only), api.read(whole)
    assert len(vocab) == 0 and vocab.provenance["vocab_only"] is True
    assert vocab.tokenizer_files == full.tokenizer_files
    assert vocab.config == full.config


def test_vocab_only_inspects_and_checks(vocab_only):
    result = run_cli(["inspect", "--check", "--json", vocab_only])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tensors"] == [] and report["check_passed"] is True


def test_vocab_only_is_no_model_to_convert(vocab_only, tmp_path):
    line = one_error_line(run_cli(["convert", vocab_only, tmp_path / "m-hf"]))
    assert "vocab-only" in line and str(vocab_only) in line
    assert entries(tmp_path) == []


def test_vocab_only_loads_in_llama_cpp(vocab_only, whole):
    llama_cpp = pytest.importorskip("llama_cpp")
    text = b"The quick brown fox jumps over the lazy dog."
    vocab = llama_cpp.Llama(model_path=str(vocab_only), vocab_only=True, verbose=False)
    model = llama_cpp.Llama(model_path=str(whole), vocab_only=True, verbose=False)
    assert vocab.tokenize(text) == model.tokenize(text) and len(vocab.tokenize(text)) > 5
    assert vocab.n_vocab() == model.n_vocab()


# ---------------------------------------------------------------------------------------- split GGUF sets


@pytest.fixture(scope="module")
def split(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    first = api.convert(source, folder / "m.gguf", split_max_tensors="10")
    return folder, first


def test_split_files_are_named_and_keyed_as_llama_cpp_splits_them(split, whole):
    folder, first = split
    count = -(-len(header(whole).tensors) // 10)
    names = [f"m-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert entries(folder) == names and Path(first) == folder / names[0]
    full = header(whole)
    for number, name in enumerate(names):
        part = header(folder / name)
        keys = [k for k in part.fields if not k.startswith("GGUF.")]
        assert [part.value(k) for k in SPLIT_KEYS] == [number, count, len(full.tensors)]
        assert part.fields["split.no"].vtype == 2 and part.fields["split.count"].vtype == 2  # u16
        assert part.fields["split.tensors.count"].vtype == 5  # i32
        if number:
            assert keys == list(SPLIT_KEYS)  # the model's keys are in the first file only
        assert len(part.tensors) == min(10, len(full.tensors) - 10 * number)
    assert [t.name for p in names for t in header(folder / p).tensors] == [t.name for t in full.tensors]


def test_split_set_reads_as_the_whole_file(split, whole):
    assert_same(loaded(split[1]), loaded(whole))


def test_split_set_checks_every_file(split, tmp_path):
    folder, first = split
    result = run_cli(["inspect", "--check", "--json", first])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["check_passed"] is True
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in entries(folder):
        (copy / name).write_bytes((folder / name).read_bytes())
    last = copy / entries(folder)[-1]
    t = header(last).tensors[-1]
    data = bytearray(last.read_bytes())
    data[t.data_offset] ^= 0x01  # one bit of the last file's last tensor
    last.write_bytes(bytes(data))
    result = run_cli(["inspect", "--check", "--json", copy / entries(folder)[0]])
    assert result.exit_code == 1 and json.loads(result.stdout)["check_passed"] is False


def test_split_set_verifies_against_the_source(split, source):
    result = run_cli(["verify", split[1], "--reference", source, "--level", "weights"])
    assert result.exit_code == 0, result.output


def test_split_by_size(source, tmp_path):
    first = api.convert(source, tmp_path / "m.gguf", split_max_size="300K")
    for name in entries(tmp_path):
        part = header(tmp_path / name)
        sizes = [t.stored_nbytes for t in part.tensors]
        assert sum(sizes) <= 300_000 or len(sizes) == 1
    assert len(entries(tmp_path)) > 1 and Path(first).name.startswith("m-00001-of-")


def test_force_replaces_a_split_set_of_ours_and_a_dry_run_names_its_files(source, tmp_path):
    first = api.convert(source, tmp_path / "m.gguf", split_max_tensors=10)
    names = entries(tmp_path)
    line = one_error_line(run_cli(["convert", source, tmp_path / "m.gguf", "--split-max-tensors", "10"]))
    assert "already exists" in line
    described = api.convert(source, tmp_path / "m.gguf", split_max_tensors=10, dry_run=True, force=True)
    assert described["files"] == [str(tmp_path / name) for name in names]
    (tmp_path / names[-1]).write_bytes(b"not ours")  # a later file: recognized only through the first's record
    line = one_error_line(run_cli(["convert", source, tmp_path / "m.gguf", "--split-max-tensors", "10", "--force"]))
    assert names[-1] in line and "not an output of bitnet-convert" in line
    (tmp_path / names[-1]).unlink()
    assert api.convert(source, tmp_path / "m.gguf", split_max_tensors=10, force=True) == first
    assert entries(tmp_path) == names and api.inspect(first, check=True).check_passed


def test_a_split_that_fits_one_file_is_one_file(source, tmp_path):
    out = api.convert(source, tmp_path / "m.gguf", split_max_tensors=10_000)
    assert entries(tmp_path) == ["m.gguf"] and "split.count" not in header(out).fields


def test_a_later_split_file_is_not_opened_alone(split):
    folder, _ = split
    second = folder / entries(folder)[1]
    with pytest.raises(Exception, match="first"):
        api.read(second)


def test_a_split_set_is_published_whole_or_not_at_all(tmp_path):
    """A tensor that fails in the last file: no file of the set is left, no partial file either."""
    ckpt = tiny_checkpoint(seed=5)
    ckpt = with_bad_codes(ckpt, list(ckpt.tensors)[-2])  # a projection of the last layer, in the last file
    with pytest.raises(Exception, match=r"must be -1, 0 or \+1"):
        api.write(ckpt, tmp_path / "m.gguf", split_max_tensors=8)
    assert entries(tmp_path) == []


def test_a_failure_while_publishing_a_set_takes_back_what_it_published(source, tmp_path, monkeypatch):
    """The first file is published last; when that fails, the later files already in place are removed."""
    real, published = atomic._publish, []

    def publish(tmp, target, **options):
        published.append(target.name)
        if target.name.startswith("m-00001-"):
            raise OSError(errno.EIO, "injected failure")
        return real(tmp, target, **options)

    monkeypatch.setattr(atomic, "_publish", publish)
    with pytest.raises(ConvertError, match="injected failure"):
        api.convert(source, tmp_path / "m.gguf", split_max_tensors=10)
    assert len(published) > 2 and published[-1].startswith("m-00001-") and published[0].startswith("m-0000")
    assert entries(tmp_path) == []


def test_llama_cpp_loads_a_split_set_from_its_first_file(split, whole):
    llama_cpp = pytest.importorskip("llama_cpp")

    def logits(path):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, n_threads=2, logits_all=True,
                              verbose=False)
        llm.eval([1, 17, 42, 99, 5])
        return np.array(llm.scores[:5], np.float32)

    np.testing.assert_array_equal(logits(split[1]), logits(whole))  # one build, one function: exactly equal


# ------------------------------------------------------------------------------------------------ --metadata


def test_metadata_keys_are_stored_recorded_and_hashed(source, tmp_path):
    out = tmp_path / "m.gguf"
    result = run_cli(["convert", source, out, "--metadata", "general.author=Ada Lovelace",
                      "--metadata", "general.name=tiny-bitnet", "--metadata", "general.license=mit"])
    assert result.exit_code == 0, result.output
    keys = header(out)
    assert keys.value("general.author") == "Ada Lovelace" and keys.value("general.license") == "mit"
    assert keys.value("general.name") == "tiny-bitnet"  # in place of the name the writer takes from the source
    assert list(keys.fields).count("general.name") == 1
    record = json.loads(keys.value("bitnet_convert.provenance"))
    assert record["metadata"] == {"general.author": "Ada Lovelace", "general.name": "tiny-bitnet",
                                  "general.license": "mit"}
    assert run_cli(["inspect", "--check", out]).exit_code == 0
    data = out.read_bytes()
    out.write_bytes(data.replace(b"Ada Lovelace", b"Ada Lovelacf"))  # the hash covers the key
    assert run_cli(["inspect", "--check", out]).exit_code == 1


@pytest.mark.parametrize("fmt, name", [("npz", "m.npz"), ("hf", "m-hf"), ("flax", "m-flax")])
def test_metadata_in_the_other_formats_is_recorded_and_hashed(source, tmp_path, fmt, name, caplog):
    out = api.convert(source, tmp_path / name, metadata={"general.author": "Ada"})
    caplog.clear()
    api.read(out)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # its own members are no strangers
    module = registry.format_module(fmt)
    assert module.recorded_provenance(out)["metadata"] == {"general.author": "Ada"}
    assert run_cli(["inspect", "--check", out]).exit_code == 0
    stored = module.stored_tensor_bytes(out)
    assert integrity.hash_stored(stored) == module.recorded_provenance(out)["content_hash"]
    assert any(b"Ada" in data for data in stored.config.values())


@pytest.mark.parametrize("args, says", [
    (["--metadata", "general.author"], "is not KEY=VALUE"),
    (["--metadata", "general.architecture=llama"], "the writer owns"),
    (["--metadata", "general.file_type=1"], "the writer owns"),
    (["--metadata", "split.count=3"], "the writer owns"),
    (["--metadata", "bitnet_convert.provenance={}"], "the writer owns"),
    (["--metadata", "General.Name=x"], "the writer owns"),
    (["--metadata", "general.name=a", "--metadata", "general.name=b"], "given twice"),
    (["--metadata", "general.name=a\x00b"], "NUL"),
    (["--metadata", "general.description=" + "x" * 70_000], "at most"),
    (["--metadata", "general.name\n=x"], "not a key"),
    (["--split-max-tensors", "0"], "out of range"),
    (["--split-max-tensors", "-3"], "not a positive whole number"),
    (["--split-max-tensors", "2e70"], "not a positive whole number"),
    (["--split-max-tensors", "99999999999999999999"], "out of range"),
    (["--split-max-size", "1e999"], "not a size"),
    (["--split-max-size", "99999999999999999999G"], "out of range"),
    (["--split-max-size", "0"], "out of range"),
    (["--split-max-size", "lots"], "not a size"),
    (["--vocab-only", "--split-max-tensors", "4"], "nothing to split"),
])
def test_hostile_output_options_are_one_error_line(source, tmp_path, args, says):
    line = one_error_line(run_cli(["convert", source, tmp_path / "m.gguf", *args]))
    assert says in line and "\n" not in line
    assert entries(tmp_path) == []


def test_gguf_options_do_not_apply_to_other_formats(source, tmp_path):
    line = one_error_line(run_cli(["convert", source, tmp_path / "m.npz", "--split-max-tensors", "4"]))
    assert "does not apply to npz" in line
    line = one_error_line(run_cli(["convert", source, tmp_path / "m-hf", "--vocab-only"]))
    assert "does not apply to hf" in line
