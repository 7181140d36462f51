"""Fuzzing every reader with truncated and bit-flipped files (issue #5, part 3).

For a small valid file of each format (HF safetensors, Flax params, .npz, and GGUF in each projection type),
hypothesis truncates it at any offset or flips bits (half of them inside the file's structure: headers, zip
directory, GGUF key/values and tensor infos), then everything a command does with a source runs on it:
detect the format, read, load every tensor, read the recorded provenance, hash the stored bytes.

- Only ConvertError may escape: any other exception is a crash.
- A truncated file must be refused, or read back exactly as before (cutting GGUF alignment padding is harmless).
- Every example must finish within EXAMPLE_SECONDS (a SIGALRM timer turns a hang into a failure).
- No allocation may be sized by an untrusted header field: the whole module runs under an address-space limit
  of its current size + ALLOCATION_HEADROOM (RLIMIT_AS), so a corrupted length that makes a reader allocate
  gigabytes fails with MemoryError (a crash) instead of passing, or swapping the machine to death.

Examples per test default to a CI-sized, derandomized run; BITNET_FUZZ_EXAMPLES=2000 runs a random campaign.
A second test sets every length/count field of a GGUF header, one at a time, to huge values.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from damage import GGUF_VARIANTS, small_checkpoint, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitnet_convert.fileio.integrity import hash_stored
from bitnet_convert.formats import registry
from bitnet_core.checkpoint import Ternary
from bitnet_core.errors import ConvertError

EXAMPLES = int(os.environ.get("BITNET_FUZZ_EXAMPLES", "0")) or None
EXAMPLE_SECONDS = 4
ALLOCATION_HEADROOM = 2 << 30

# file id -> (format, writer options, output name, the file inside a folder output that is fuzzed)
FILES: dict[str, tuple[str, dict, str, str | None]] = {
    "hf": ("hf", {}, "m-hf", "model.safetensors"),
    "hf-config": ("hf", {}, "m-hf", "config.json"),
    "flax": ("flax", {}, "m-flax", "params.safetensors"),
    "npz": ("npz", {}, "m.npz", None),
    **{f"gguf-{k}": ("gguf", v, f"m-{k}.gguf", None) for k, v in GGUF_VARIANTS.items()},
}


def _settings(default: int):
    return settings(
        max_examples=EXAMPLES or default,
        derandomize=EXAMPLES is None,  # CI: the same examples every run; a campaign: fresh ones
        deadline=None,  # the SIGALRM timer bounds each example; wall-clock deadlines flake on shared CPUs
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------------------ harness


class Hang(Exception):
    """An example ran past EXAMPLE_SECONDS."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"reader still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def address_space_limit(headroom: int = ALLOCATION_HEADROOM):
    """RLIMIT_AS = what the process maps now + `headroom`, while the reader runs (not while pytest reports)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        vm_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
    limit = vm_kib * 1024 + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def exercise(path: Path, fmt: str, seconds: float = EXAMPLE_SECONDS) -> dict:
    """Everything a command does with a source; returns the loaded tensors as bytes (for comparisons)."""
    with address_space_limit(), time_limit(seconds):
        detected = registry.detect_input_format(str(path))
        assert detected in registry.FORMATS
        ckpt = registry.read_checkpoint(str(path), fmt)
        loaded = {}
        for entry in ckpt:
            value = entry.load()
            if isinstance(value, Ternary):
                loaded[entry.name] = (value.codes.tobytes(), value.multiplier.tobytes())
            else:
                loaded[entry.name] = np.asarray(value).tobytes()
        module = registry.format_module(fmt)
        module.recorded_provenance(path)
        hash_stored(module.stored_tensor_bytes(path))
        return loaded


def outcome(path: Path, fmt: str, seconds: float = EXAMPLE_SECONDS):
    """The tensors read, or None when the file was refused with a ConvertError (anything else propagates)."""
    try:
        return exercise(path, fmt, seconds)
    except ConvertError:
        return None


class Target:
    """One valid file, a scratch copy to damage, and what the valid file reads as."""

    def __init__(self, root: Path, file_id: str):
        fmt, opts, name, inner = FILES[file_id]
        self.fmt = fmt
        valid = root / "valid" / file_id / name
        valid.parent.mkdir(parents=True)
        write(small_checkpoint(seed=31), valid, fmt, **opts)
        self.scratch = root / "scratch" / file_id / name
        self.scratch.parent.mkdir(parents=True)
        if valid.is_dir():
            shutil.copytree(valid, self.scratch)
        else:
            shutil.copyfile(valid, self.scratch)
        self.fuzzed = self.scratch / inner if inner else self.scratch  # the file that gets damaged
        self.original = self.fuzzed.read_bytes()
        self.structure = structure_regions(self.fuzzed, fmt if inner != "config.json" else "json", self.original)
        self.expected = exercise(self.scratch, fmt)

    def damaged(self, data: bytes) -> Path:
        self.fuzzed.write_bytes(data)
        return self.scratch


def structure_regions(path: Path, kind: str, raw: bytes) -> list[tuple[int, int]]:
    """[start, end) byte ranges holding a file's structure (where a flip is most likely to confuse a reader)."""
    if kind == "json":
        return [(0, len(raw))]
    if path.suffix == ".safetensors":
        (n,) = struct.unpack("<Q", raw[:8])
        return [(0, 8 + n)]
    if kind == "npz":
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
        starts = [(i.header_offset, i.header_offset + 30 + len(i.filename) + 20 + 128) for i in infos]
        directory = raw.rfind(b"PK\x01\x02", 0, raw.rfind(b"PK\x05\x06"))
        return starts + [(min(i.header_offset for i in infos[-1:]) if directory < 0 else directory, len(raw))]
    from damage import gguf_tensor_offsets

    return [(0, min(gguf_tensor_offsets(path).values()))]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    cache: dict[str, Target] = {}

    def get(file_id: str) -> Target:
        if file_id not in cache:
            cache[file_id] = Target(root / file_id.replace("/", "_"), file_id)
        return cache[file_id]

    return get


@st.composite
def offsets(draw, target: Target) -> int:
    """Half in the file's structure, half anywhere."""
    if draw(st.booleans()):
        start, end = draw(st.sampled_from(target.structure))
        return draw(st.integers(start, min(end, len(target.original)) - 1))
    return draw(st.integers(0, len(target.original) - 1))


# ------------------------------------------------------------------------------------------------- fuzzing


@pytest.mark.parametrize("file_id", [f for f in FILES if f != "hf-config"])
def test_truncated_files_are_refused_or_read_unchanged(file_id, targets):
    target = targets(file_id)
    size = len(target.original)

    @_settings(default=12 if file_id.startswith("gguf") else 25)
    @given(st.data())
    def check(data):
        cut = data.draw(st.one_of(st.integers(0, 64), offsets(target), st.integers(max(size - 64, 0), size - 1)),
                        label="length")
        path = target.damaged(target.original[:cut])
        result = outcome(path, target.fmt)
        assert result is None or result == target.expected, f"truncated to {cut} of {size} bytes, read differently"

    try:
        check()
    finally:
        target.damaged(target.original)


@pytest.mark.parametrize("file_id", FILES)
def test_bit_flipped_files_give_only_clean_errors(file_id, targets):
    target = targets(file_id)

    @_settings(default=12 if file_id.startswith("gguf") else 30)
    @given(st.data())
    def check(data):
        flips = data.draw(st.lists(st.tuples(offsets(target), st.integers(0, 7)), min_size=1, max_size=4),
                          label="flips")
        raw = bytearray(target.original)
        for at, bit in flips:
            raw[at] ^= 1 << bit
        outcome(target.damaged(bytes(raw)), target.fmt)  # anything but ConvertError fails the test

    try:
        check()
    finally:
        target.damaged(target.original)


# ------------------------------------------------------------------------------- GGUF length and count fields


def gguf_length_fields(path: Path) -> list[tuple[str, int, str]]:
    """(description, offset, struct format) of every length or count field of a valid GGUF header."""
    from gguf import GGUFReader, GGUFValueType

    import bitnet_convert.formats.gguf.types  # noqa: F401  (registers I2_S)

    reader = GGUFReader(path)
    base = reader.data.ctypes.data

    def at(part) -> int:
        return part.ctypes.data - base

    fields = [("tensor count", 8, "<Q"), ("key/value count", 16, "<Q")]
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        fields.append((f"{field.name}: key length", at(field.parts[0]), "<Q"))
        if field.types[0] == GGUFValueType.STRING:
            fields.append((f"{field.name}: string length", at(field.parts[3]), "<Q"))
        elif field.types[0] == GGUFValueType.ARRAY:
            fields.append((f"{field.name}: array length", at(field.parts[4]), "<Q"))
            if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING and len(field.parts) > 5:
                fields.append((f"{field.name}: first element's length", at(field.parts[5]), "<Q"))
    for t in reader.tensors[:3] + reader.tensors[-1:]:
        parts = t.field.parts
        fields.append((f"{t.name}: name length", at(parts[0]), "<Q"))
        fields.append((f"{t.name}: dimension count", at(parts[2]), "<I"))
        fields.append((f"{t.name}: dimension 0", at(parts[3]), "<Q"))
        fields.append((f"{t.name}: data offset", at(parts[5]), "<Q"))
    return fields


HUGE = (2**31, 2**40, 2**63 - 1)


@pytest.fixture(scope="module")
def gguf_file(targets):
    return targets("gguf-tq2_0")


def test_every_gguf_length_field_set_huge_gives_a_clean_error(gguf_file):
    """Each length/count field of the header, one at a time, set to 2^31, 2^40 and 2^63-1."""
    target = gguf_file
    problems, hangs = [], []
    try:
        for what, offset, fmt in gguf_length_fields(target.fuzzed):
            for value in HUGE:
                if fmt == "<I" and value >= 2**32:
                    value = 2**32 - 1
                raw = bytearray(target.original)
                raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
                try:
                    result = outcome(target.damaged(bytes(raw)), target.fmt)
                except Hang:
                    hangs.append(f"{what} = {value}")
                    continue
                except Exception as exc:  # noqa: BLE001 - every other escape is what we are looking for
                    problems.append(f"{what} = {value}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if result is not None and result != target.expected:
                    problems.append(f"{what} = {value}: read differently without an error")
    finally:
        target.damaged(target.original)
    assert not problems, "\n".join(problems)
    if hangs:
        raise Hang("; ".join(hangs))



HANG_PROBE = """
import resource, signal, sys
from bitnet_convert.formats import registry
from bitnet_core.errors import ConvertError

def on_alarm(signum, frame):
    raise TimeoutError
signal.signal(signal.SIGALRM, on_alarm)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, hard))  # 2 GiB address space
signal.alarm(3)
try:
    registry.read_checkpoint(sys.argv[1], "gguf")
    print("read")
except ConvertError:
    print("ConvertError")
except (TimeoutError, MemoryError) as exc:
    print(type(exc).__name__)
"""


def test_a_huge_scalar_array_length_does_not_hang_the_gguf_reader(gguf_file, tmp_path):
    """tokenizer.ggml.token_type (int32) claiming 2^40 items, the file padded so the int32 reads end exactly at
    its end (otherwise numpy happens to raise on a partial item and hides the loop). Run in a child process
    with 3 s and 2 GiB: the loop must not exhaust this one."""
    import subprocess
    import sys

    target = gguf_file
    offset = next(f[1] for f in gguf_length_fields(target.fuzzed) if f[0] == "tokenizer.ggml.token_type: array length")
    raw = bytearray(target.original)
    raw[offset : offset + 8] = struct.pack("<Q", 2**40)
    raw += b"\0" * (-(len(raw) - (offset + 8)) % 4)
    path = tmp_path / "huge-array.gguf"
    path.write_bytes(bytes(raw))
    proc = subprocess.run([sys.executable, "-c", HANG_PROBE, str(path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    result = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"crashed: {proc.stderr[-500:]}"
    assert result == "ConvertError", result


# ----------------------------------------------------------------- every field of any JSON or GGUF type (issue 15)

CONFIG_FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                 "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "quantization_config")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@_settings(default=300)
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON_VALUES)
def test_any_json_value_in_any_config_field_is_read_or_refused_cleanly(field, value):
    """validate.model_config is the one gate of every config.json field: whatever JSON a field holds, it
    returns a config or raises ConvertError naming the file (never TypeError, KeyError, ZeroDivisionError ...)."""
    from bitnet_convert.tiny import tiny_config
    from bitnet_core import validate

    config = {**tiny_config(384), field: value}
    try:
        validate.model_config(config, "m/config.json")
    except ConvertError as exc:
        assert str(exc).startswith("m/config.json: ") and "\n" not in str(exc)


TOKENIZER_PATHS = {
    "tokenizer.json": ("model", "model.vocab", "model.merges", "model.type", "added_tokens", "pre_tokenizer",
                       "pre_tokenizer.pretokenizers", "post_processor"),
    "tokenizer_config.json": ("bos_token", "eos_token", "chat_template", "add_bos_token", "add_eos_token"),
    "generation_config.json": ("eos_token_id", "bos_token_id"),
}


@functools.cache
def _tiny_tokenizer_files() -> dict[str, bytes]:
    from bitnet_convert.tiny import tiny_tokenizer_files

    return tiny_tokenizer_files()


def _set_path(document: dict, dotted: str, value) -> None:
    """document[a][b][c] = value for "a.b.c", making (or replacing) the objects on the way."""
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(document.get(key), dict):
            document[key] = {}
        document = document[key]
    document[last] = value


@_settings(default=200)
@given(name=st.sampled_from(sorted(TOKENIZER_PATHS)), data=st.data())
def test_any_json_value_in_a_tokenizer_field_is_refused_cleanly_or_carried(name, data):
    """Tokenizer files pass `tokenizer_files.check` only when the GGUF writer's reading of them cannot fail
    with anything but a ConvertError."""
    import json

    from bitnet_convert.formats import tokenizer_files
    from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
    from bitnet_convert.tiny import tiny_config

    files = dict(_tiny_tokenizer_files())
    document = json.loads(files.get(name, b"{}"))
    _set_path(document, data.draw(st.sampled_from(TOKENIZER_PATHS[name])), data.draw(JSON_VALUES))
    files[name] = json.dumps(document).encode()
    try:
        tokenizer_files.check(files, lambda n: f"m/{n}")
        gguf_tokenizer.vocab_from_files(files, tiny_config(384), 384, "m")
    except ConvertError as exc:
        assert "\n" not in str(exc)


GGUF_KEYS = ("bitnet.context_length", "bitnet.embedding_length", "bitnet.block_count", "bitnet.feed_forward_length",
             "bitnet.attention.head_count", "bitnet.attention.layer_norm_rms_epsilon", "bitnet.rope.freq_base",
             "general.architecture", "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
             "tokenizer.chat_template", "bitnet_convert.hidden_act")
_SCALAR_VALUES = {
    "u8": st.integers(0, 255), "i8": st.integers(-128, 127), "u32": st.integers(0, 2**32 - 1),
    "i32": st.integers(-(2**31), 2**31 - 1), "u64": st.integers(0, 2**64 - 1), "bool": st.booleans(),
    "f32": st.floats(width=32), "f64": st.floats(), "string": st.text(max_size=12),
}


@st.composite
def gguf_values(draw):
    """(kind, value, item) of any GGUF type: a scalar, a string, or a short array of one of them."""
    kind = draw(st.sampled_from([*_SCALAR_VALUES, "array"]))
    if kind != "array":
        return kind, draw(_SCALAR_VALUES[kind]), None
    item = draw(st.sampled_from(sorted(_SCALAR_VALUES)))
    return kind, draw(st.lists(_SCALAR_VALUES[item], max_size=6)), item


def test_any_gguf_type_in_any_key_is_read_or_refused_cleanly(targets, tmp_path):
    from test_bad_input import gguf_entry, gguf_rebuilt

    valid = targets("gguf-tq2_0").scratch

    @_settings(default=40)
    @given(key=st.sampled_from(GGUF_KEYS), value=gguf_values())
    def check(key, value):
        kind, item_value, item = value
        path = gguf_rebuilt(valid, tmp_path / "key.gguf", changes={key: gguf_entry(key, kind, item_value, item)})
        outcome(path, "gguf")  # anything but ConvertError fails the test

    check()
