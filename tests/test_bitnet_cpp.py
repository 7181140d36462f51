"""bitnet.cpp itself (verify --runtime bitnet.cpp): our files in the real runtime, every family it reads, against
the JAX model under its arithmetic (verification/bitnet_cpp_arithmetic.py says which and why those bounds).

Needs a bitnet.cpp build: $BITNET_CPP_DIR, else ~/.cache/bitnet-cpp-4645960, where
../shared/runtimes/bitnet.cpp/build.sh puts one (.ci/run builds it); without one these tests skip. Fixtures are
the families' own HF layouts (families.py), written independently of our writers.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bitnet_convert import api
from bitnet_convert.formats.gguf.reader import open_gguf, raw_bytes
from bitnet_convert.verification import bitnet_cpp, runtime
from bitnet_convert.verification import bitnet_cpp_arithmetic as arithmetic
from damage import gguf_tensor_offsets, patch, run_cli
from families import write_family

BUILD = Path(os.environ.get(bitnet_cpp.ENV) or Path.home() / ".cache" / "bitnet-cpp-4645960")
pytestmark = pytest.mark.skipif(not (BUILD / bitnet_cpp.LIBLLAMA).is_file(),
                                reason=f"no bitnet.cpp build at {BUILD} (set {bitnet_cpp.ENV}; "
                                       "../shared/runtimes/bitnet.cpp/build.sh builds one)")
# bitnet.cpp's architectures, by family: 1bitLLM's latent layout runs as `bitnet`, the Llama family as `llama`
ARCHITECTURE = {"1bitllm": "bitnet", "falcon3": "llama", "llama3-8b": "llama"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    made = {}

    def get(name, size="small", is_chaotic=False):
        key = (name, size, is_chaotic)
        if key not in made:
            made[key] = write_family(tmp_path_factory.mktemp(name) / "hf", name, size=size, seed=5,
                                     is_chaotic=is_chaotic)
        return made[key]

    return get


def runtime_layer(candidate, reference):
    report = api.verify(candidate, reference, levels="weights", runtime="bitnet.cpp", bitnet_cpp_dir=BUILD)
    return report, report.layer("runtime")


def assert_agrees(layer):
    assert layer.passed, layer.failures
    assert layer.figures["max_rel_diff"] <= arithmetic.FLOOR
    assert layer.figures["max_input_departure_of_a_float_op"] <= arithmetic.FLOAT_INPUT_TOLERANCE
    assert layer.figures["top1_agreement"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("size", ["small", "runtime"])  # hidden 256 and 512
@pytest.mark.parametrize("name", ["1bitllm", "falcon3"])
def test_i2_s_files_of_every_family_run_in_bitnet_cpp_as_the_jax_model(family, name, size, tmp_path):
    src = family(name, size)
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    report, layer = runtime_layer(out, src)
    assert report.passed, [layer.failures for layer in report.layers]
    assert_agrees(layer)
    # bitnet.cpp's f16 Q/K/V, unmodelled, move the free-running logits by far more than the bound
    assert layer.figures["free_running_max_rel_diff_without_f16_model"] > 100 * arithmetic.FLOOR


@pytest.mark.slow
@pytest.mark.parametrize("name", ["1bitllm", "llama3-8b"])
def test_chaotic_models_run_in_bitnet_cpp_as_the_jax_model(family, name, tmp_path):
    src = family(name, is_chaotic=True)
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    assert_agrees(runtime_layer(out, src)[1])


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", ["1bitllm", "falcon3"])
def test_float_files_for_bitnet_cpp_run_in_it_as_the_jax_model(family, name, outtype, tmp_path):
    """codes x multiplier in a float type: bitnet.cpp multiplies them with float activations rounded to the
    weights' type (no int8 quantizer), which the reference models."""
    src = family(name)
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp", outtype=outtype)
    assert_agrees(runtime_layer(out, src)[1])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "embed_type"), [("falcon3", "q8_0"), ("1bitllm", "bf16")])
def test_the_head_product_of_each_embedding_type(family, name, embed_type, tmp_path):
    """bitnet.cpp's head quantizes its input to Q8_0 blocks for a Q8_0 table and rounds it to bf16 for a BF16 one
    (untied `output.weight` under `llama`, tied `token_embd` under `bitnet`): the reference does the same."""
    src = family(name)
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp", embed_type=embed_type)
    assert_agrees(runtime_layer(out, src)[1])


def test_the_cli_finds_the_build_through_the_environment(family, tmp_path, monkeypatch):
    src = family("falcon3")
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    monkeypatch.setenv(bitnet_cpp.ENV, str(BUILD))
    result = run_cli(["verify", out, "--reference", src, "--runtime", "bitnet.cpp", "--level", "weights", "--json"])
    assert result.exit_code == 0, result.output
    assert '"runtime": "bitnet.cpp"' in result.stdout


def _i2_s_tensor(path: Path, name: str) -> tuple[int, int]:
    """(offset of the packed codes, offset of the float32 multiplier in the tail) of an I2_S tensor."""
    (info,) = [t for t in open_gguf(path).tensors if t.name == name]
    start = gguf_tensor_offsets(path)[name]
    return start, start + int(info.n_elements) // 4


def _scale_multiplier(path: Path, name: str, factor: float) -> None:
    _, tail = _i2_s_tensor(path, name)
    (value,) = struct.unpack("<f", path.read_bytes()[tail : tail + 4])
    patch(path, tail, struct.pack("<f", value * factor))


def _change_one_code(path: Path, name: str) -> None:
    """One 2-bit code of the first byte moved up a step (-1 -> 0 or 0 -> +1): still a valid ternary file."""
    start, _ = _i2_s_tensor(path, name)
    byte = path.read_bytes()[start]
    for shift in (6, 4, 2, 0):
        code = (byte >> shift) & 3
        if code < 2:
            patch(path, start, bytes([(byte & ~(3 << shift)) | ((code + 1) << shift)]))
            return
    raise AssertionError("a byte of +1 codes only")


@pytest.mark.slow
@pytest.mark.parametrize("damage", [lambda p: _scale_multiplier(p, "blk.0.ffn_up.weight", 1.02),
                                    lambda p: _change_one_code(p, "blk.0.ffn_gate.weight")],
                         ids=["multiplier-x1.02", "one-code"])
def test_a_tampered_file_fails_the_runtime_layer(family, damage, tmp_path):
    """The runtime is held to the reference's model, so changed values fail here, not only in the weights layer."""
    src = family("falcon3")
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    damage(out)
    _, layer = runtime_layer(out, src)
    assert layer.passed is False
    assert layer.failures[0].startswith("bitnet.cpp's input to blk.0.ffn_down.weight departs from the JAX model's")


def test_a_2b4t_file_is_refused_in_one_line(family, tmp_path):
    src = family("2b4t")
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    _, layer = runtime_layer(out, src)
    assert layer.failures == [runtime.NO_GRAPH[("bitnet.cpp", "bitnet-b1.58")]]
    assert "verify --runtime ik_llama.cpp" in layer.failures[0]


def test_no_build_is_one_error_line(family, tmp_path, monkeypatch):
    src = family("falcon3")
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    monkeypatch.delenv(bitnet_cpp.ENV, raising=False)
    result = run_cli(["verify", out, "--reference", src, "--runtime", "bitnet.cpp"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: bitnet.cpp: no build given: pass --bitnet-cpp-dir DIR or set "
                                    "BITNET_CPP_DIR")
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli(["verify", out, "--reference", src, "--runtime", "bitnet.cpp", "--bitnet-cpp-dir", tmp_path])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {tmp_path.resolve()}: not a bitnet.cpp build (no "
                                     f"3rdparty/llama.cpp/include; {bitnet_cpp.BUILD_HINT})")


def test_no_compiler_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_CONVERT_CACHE", str(tmp_path))  # nothing compiled yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(api.ConvertError, match=r"^no C\+\+ compiler \(no-such-compiler\) on PATH: verify --runtime "
                                               r"bitnet.cpp compiles bitnet_cpp_logits.cc against "):
        bitnet_cpp.logits(tmp_path / "m.gguf", [1], bitnet_cpp_dir=BUILD)


def test_the_program_is_compiled_once_per_build(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_CONVERT_CACHE", str(tmp_path))
    first = bitnet_cpp.program(BUILD)
    assert first.parent == tmp_path / "bitnet-cpp" and os.access(first, os.X_OK)
    stamp = first.stat().st_mtime_ns
    assert bitnet_cpp.program(BUILD) == first and first.stat().st_mtime_ns == stamp


def test_a_file_bitnet_cpp_cannot_load_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(api.ConvertError, match=r"bad.gguf: bitnet.cpp could not run the file \(exit 1\): "):
        bitnet_cpp.logits(bad, [1, 2, 3], bitnet_cpp_dir=BUILD)


@pytest.mark.slow
def test_greedy_continues_as_the_jax_model(family, tmp_path):
    src = family("1bitllm")
    out = api.convert(src, tmp_path / "m.gguf", target="bitnet.cpp")
    ids = bitnet_cpp.greedy(out, [1, 7, 42], 6, bitnet_cpp_dir=BUILD)
    assert len(ids) == 6
    # the same tokens as taking the argmax of bitnet.cpp's own logits over the grown sequence
    logits = bitnet_cpp.logits(out, [1, 7, 42, *ids[:-1]], bitnet_cpp_dir=BUILD)
    assert [int(t) for t in logits[2:].argmax(-1)] == ids
    assert api.generate(out, [1, 7, 42], max_new_tokens=6).ids == ids  # and our engine's greedy tokens


@pytest.mark.slow
def test_bitnet_cpp_quantizer_makes_our_i2_s_file_from_our_f32_file(family, tmp_path):
    """Our F32 file (codes x multiplier) through bitnet.cpp's own llama-quantize: our I2_S file's tensors, byte for
    byte (the embedding and the untied head kept in our f16), but the 28 bytes after each I2_S multiplier: its
    quantizer writes the packed codes and the float32 multiplier and leaves the rest of the 32-byte tail as its
    buffer held it (stale bytes, never read); ours are zero."""
    src = family("falcon3")
    f32 = api.convert(src, tmp_path / "m-f32.gguf", target="bitnet.cpp", outtype="f32")
    ours = api.convert(src, tmp_path / "m-i2_s.gguf", target="bitnet.cpp")
    theirs = tmp_path / "theirs.gguf"
    quantize = BUILD / "build" / "bin" / "llama-quantize"
    done = subprocess.run([str(quantize), "--token-embedding-type", "f16", "--output-tensor-type", "f16", str(f32),
                           str(theirs), "I2_S", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = open_gguf(ours), open_gguf(theirs)
    assert [(t.name, t.tensor_type.name, t.shape) for t in a.tensors] == \
           [(t.name, t.tensor_type.name, t.shape) for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        ours_bytes, their_bytes = raw_bytes(a, x), raw_bytes(b, y)
        used = x.n_elements // 4 + 4 if x.tensor_type.name == "I2_S" else len(ours_bytes)
        assert np.array_equal(ours_bytes[:used], their_bytes[:used]), x.name
        assert not ours_bytes[used:].any()
    assert sum(t.tensor_type.name == "I2_S" for t in a.tensors) == 7 * 2
