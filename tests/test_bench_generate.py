"""benchmarks/bench_generate.py's verdicts: each side keeps its best over rounds, the floors are checked against
the fastest BitNet runtime of the run per measure, an absent runtime stays in the table, and the bytes a decode
step reads follow each runtime's layout. No runtime runs here: the sides carry made-up results."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_generate.py"
_spec = importlib.util.spec_from_file_location("bench_generate", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_generate", bench)
_spec.loader.exec_module(bench)

ARGS = argparse.Namespace(lengths=[128, 512], rounds=1, threads=2, path="ckpt")


def _side(name, kind, decode_ms, prefill_128, *, load=1.0, startup=None, rss_gib=1.0, absent=None):
    side = bench.Side(name, kind, absent=absent)
    if absent is None:
        side.merge({"decode_s": decode_ms / 1e3, "prefill_s": {"128": prefill_128, "512": 4 * prefill_128},
                    "load_s": load, "generate_rss": int(rss_gib * bench.GIB)})
        if startup is not None:
            side.merge({"startup": {"startup_s": startup, "imports_s": 1.0, "load_s": 1.0, "compile_s": 0.1,
                                    "prefill_s": prefill_128}})
    return side


def test_a_side_keeps_its_best_time_and_its_most_memory():
    side = _side(bench.OURS, "ours", 50, 0.8, rss_gib=1.2, startup=5.0)
    side.merge({"decode_s": 0.060, "prefill_s": {"128": 0.7, "512": 3.9}, "generate_rss": bench.GIB})
    side.merge({"startup": {"startup_s": 6.0}})
    assert side.best["decode_s"] == 0.050 and side.best["prefill_s"] == {"128": 0.7, "512": 3.2}
    assert side.best["generate_rss"] == int(1.2 * bench.GIB) and side.best["startup"]["startup_s"] == 5.0


def _run(sides, capsys):
    ours = sides[0]
    runtimes = [s for s in sides if s.name in bench.RUNTIMES and not s.absent]
    code = bench.check_floors(sides, ours, runtimes, ARGS)
    return code, capsys.readouterr().out


def test_floors_are_checked_against_the_fastest_runtime(capsys):
    sides = [_side(bench.OURS, "ours", 40, 0.6, startup=6.0, rss_gib=1.2),
             _side(bench.LLAMA_CPP, "llama.cpp", 50, 2.8, load=1.0, rss_gib=1.3),
             _side(bench.IK_LLAMA_CPP, "ik_llama.cpp", 44, 1.4, rss_gib=1.25),
             _side(bench.BITNET_CPP, "bitnet.cpp", 45, 2.5, rss_gib=1.1)]
    code, out = _run(sides, capsys)
    assert "ours decode: 1.10x ik_llama.cpp IQ2_BN" in out  # the fastest at decode, not llama.cpp
    assert "ours prefill 128: 2.33x ik_llama.cpp IQ2_BN (floor 2.0x, target 3.0x: missed)" in out
    assert "against 2.0x llama.cpp's load + prefill = 7.60 s" in out
    assert code == 0 and "every floor met" in out
    slower = [_side(bench.OURS, "ours", 46, 0.6, startup=8.0, rss_gib=1.3), *sides[1:]]
    code, out = _run(slower, capsys)
    missed = out.split("floors missed: ")[1]
    assert code == 1
    assert "ours decode: 0.96x ik_llama.cpp IQ2_BN" in missed and "start-up" in missed
    assert "1.30 GiB against ik_llama.cpp IQ2_BN's 1.25 GiB" in missed


def test_ik_llama_cpp_runs_both_its_layouts_and_the_faster_one_sets_the_floor(capsys):
    assert set(bench.FILES) == set(bench.RUNTIMES)  # every runtime side has a file to prepare
    sides = [_side(bench.OURS, "ours", 40, 0.6, startup=6.0, rss_gib=1.2),
             _side(bench.LLAMA_CPP, "llama.cpp", 50, 2.8, load=1.0, rss_gib=1.3),
             _side(bench.IK_LLAMA_CPP, "ik_llama.cpp", 46, 1.4, rss_gib=1.25),
             _side(bench.IK_LLAMA_CPP_R4, "ik_llama.cpp", 42, 1.5, rss_gib=1.25)]
    code, out = _run(sides, capsys)
    assert "ours decode: 1.05x ik_llama.cpp IQ2_BN_R4" in out  # repacked: the faster decode
    assert "ours prefill 128: 2.33x ik_llama.cpp IQ2_BN " in out  # not repacked: the faster prefill
    assert code == 0


def test_an_absent_runtime_is_reported_and_none_at_all_is_no_verdict(capsys):
    sides = [_side(bench.OURS, "ours", 40, 0.6),
             _side(bench.LLAMA_CPP, "llama.cpp", 0, 0, absent="absent: the Python package llama_cpp is not installed")]
    code, out = _run(sides, capsys)
    assert code == 2 and "not checked" in out
    bench.report(sides, ARGS, 30e9, bench.step_bytes(CONFIG))
    table = capsys.readouterr().out
    assert "| absent |" in table and "llama_cpp is not installed" in table


CONFIG = {"hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20,
          "num_key_value_heads": 5, "vocab_size": 128256}


def test_bytes_a_decode_step_reads():
    moved = bench.step_bytes(CONFIG)
    values = 30 * (2560 * 2560 * 2 + 2 * 2560 * 640 + 3 * 2560 * 6912)  # 2B4T's ternary weights
    head = 128256 * 2560 * 2
    assert moved[bench.OURS_FULL_HEAD] == values / 4 + head == pytest.approx(1.18e9, rel=0.01)
    assert moved[bench.LLAMA_CPP] == values * 66 / 256 + head
    rows = 30 * (2560 + 2 * 640 + 2560 + 2 * 6912 + 2560)  # q, k, v, o, gate, up, down: a float scale each
    assert moved[bench.IK_LLAMA_CPP_R4] == moved[bench.IK_LLAMA_CPP] == values / 4 + 4 * rows + head
    assert moved[bench.OURS_INT8] == values / 4 + head / 2 + 4 * 128256
    # the greedy screen (our default): int8 codes, a scale and a bound per row
    assert moved[bench.OURS] == values / 4 + head / 2 + 8 * 128256 == pytest.approx(0.85e9, rel=0.01)
