"""Start-up (issue 21): `generate --stats` times load, compilation, prefill and decode apart, and a second run
loads its compiled programs from the persistent compilation cache in the project's cache folder.

The fields are checked for consistency, never against a time: compilation happens before the prompt goes in
(so neither the prefill nor any decode step holds it), the decode figure is the median of the steps, and a
second process with the same shapes compiles nothing, writes nothing new to the cache and generates the same ids.
The load reads each tensor one ahead on a thread: the same bytes as the tensor's own loader, in any order.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_convert import generate_command as generator
from bitnet_convert.formats import flax_dir
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_model import compile_cache

REPO = Path(__file__).resolve().parent.parent
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}
STATS = re.compile(r"imports [\d.]+ s; load [\d.]+ s; compilation [\d.]+ s "
                   r"\((\d+) programs from the persistent cache, (\d+) compiled\); prompt 3 tokens: \d+ ms to the "
                   r"first new token; 4 more at [\d.]+ ms/token \(median\); products: ")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return flax_dir.write(tiny_checkpoint(seed=4, **SMALL), str(tmp_path_factory.mktemp("startup") / "tiny-flax"))


def test_stats_time_each_part_apart(folder):
    lines, timings = [], []
    result = generator.run_generate(str(folder), prompt=None, prompt_ids="1 2 3", max_new_tokens=5, greedy=True,
                                    temperature=None, top_p=None, seed=0, revision=None, write=lambda _: None,
                                    stats=timings.append)
    (stats,) = timings
    assert (stats.prompt_tokens, stats.new_tokens) == (3, len(result.new_ids)) == (3, 5)
    assert stats.prefill_s == result.prefill_s and stats.compile_s == result.compile_s
    assert stats.decode_median_s == statistics.median(result.decode_s) and len(result.decode_s) == 4
    assert all(value > 0 for value in (stats.load_s, stats.prefill_s, *result.decode_s)) and stats.imports_s >= 0
    assert set(stats.as_dict()) >= {"imports_s", "load_s", "compile_s", "prefill_s", "decode_median_s"}
    lines.append(stats.line())
    assert "compilation" in lines[0] and "(median)" in lines[0]


def test_a_generator_compiles_once_per_shape(folder):
    """The programs are compiled ahead of the prompt, once: a second request of the same shapes has none to
    compile, and its timings hold only running."""
    gen = generator.load_generator(str(folder))
    gen.eos_ids = set()
    first = gen.generate([1, 2, 3], 5)
    again = gen.generate([4, 5, 6], 5)
    assert first.compile_s > 0 and again.compile_s == 0
    longer = gen.generate(list(range(1, 40)), 2)  # another prompt padding: another prefill program
    assert longer.compile_s > 0
    one = gen.generate([1, 2, 3], 1)  # no decode step: only the prefill program, which it has
    assert one.compile_s == 0 and one.decode_s == [] and one.decode_median_s != one.decode_median_s  # NaN


def _generate_in_a_fresh_process(folder, cache) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", compile_cache.OFF_ENV)}
    env.update(BITNET_CONVERT_CACHE=str(cache), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "bitnet_convert", "generate", str(folder), "--prompt-ids", "1 2 3",
                           "--max-new-tokens", "5", "--stats"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done


def _native_library_in(cache) -> None:
    """The kernels this session built, linked into a fresh cache folder: no second build of them there."""
    from bitnet_model import native

    if native.available():
        mine = native.library_path()
        linked = cache / "native" / mine.name
        linked.parent.mkdir(parents=True)
        linked.symlink_to(mine)


@pytest.mark.slow
def test_a_second_run_loads_its_programs_from_the_cache_folder(folder, tmp_path):
    cache = tmp_path / "cache"
    _native_library_in(cache)
    first = _generate_in_a_fresh_process(folder, cache)
    entries = {p.name for p in (cache / "jax").iterdir()}
    cached, compiled = map(int, STATS.search(first.stderr).groups())
    assert compiled >= 2 and len(entries) >= 2  # the prefill and decode programs at least, written to the folder
    second = _generate_in_a_fresh_process(folder, cache)
    cached, compiled = map(int, STATS.search(second.stderr).groups())
    assert compiled == 0 and cached >= 2
    assert {p.name for p in (cache / "jax").iterdir()} == entries
    assert second.stdout == first.stdout  # the loaded programs (native kernels' calls included) compute the same


def test_read_ahead_gives_every_tensor_as_its_own_loader_does(folder):
    """load_generator reads each tensor one ahead on a thread: the same packed bytes and values, in any order
    the engine takes them, a failed read raised where it is taken, and the thread ended after."""
    import threading

    import numpy as np

    from bitnet_convert.formats import registry
    from bitnet_core.errors import CorruptData

    ckpt = registry.read_checkpoint(str(folder))
    names = list(ckpt.tensors)
    with generator.ReadAhead(ckpt) as ahead:
        for name in [names[3], *names]:  # one out of order first: read then and there
            mine, theirs = ahead.checkpoint[name], ckpt[name]
            if theirs.load_packed is not None:
                np.testing.assert_array_equal(mine.load_packed().data, theirs.load_packed().data)
            else:
                np.testing.assert_array_equal(mine.load(), theirs.load())
    assert not [t for t in threading.enumerate() if t.name.startswith("bitnet-convert-read-ahead")]

    def broken():
        raise CorruptData("bad bytes")

    first = names[0]
    bad = dataclasses.replace(ckpt, tensors={**ckpt.tensors, first: dataclasses.replace(ckpt[first], load=broken)})
    with generator.ReadAhead(bad) as ahead, pytest.raises(CorruptData, match="bad bytes"):
        ahead.checkpoint[first].load()
