"""The default `verify` (weights + function) of a 2B4T-shaped I2_S file against its HF source: wall time and peak
memory of the whole command, and of the weights layer alone, side by side with reading both files (cat > /dev/null).

    python benchmarks/bench_verify.py [WORK_DIR]      # makes WORK_DIR/2b4t-hf (make_2b4t.py) and its I2_S file

Floors (issue: verify that proves it): the weights layer <= 1.5 GiB; the default verify <= 180 s and <= 6 GiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


# Runs CMD and prints its peak RSS (KiB) last on stderr: a fresh parent, so RUSAGE_CHILDREN is CMD's alone.
PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(done.returncode)")


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS GiB, result) of one command."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    return wall, int(done.stderr.strip().splitlines()[-1]) / (1 << 20), done


def main(argv=None) -> int:
    work = Path((argv or sys.argv[1:] or ["bench-out"])[0])
    hf = work / "2b4t-hf"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_2b4t.py"), str(hf)], check=True)
    i2s = work / "2b4t-i2_s.gguf"
    if not i2s.exists():
        subprocess.run([sys.executable, "-m", "bitnet_convert", "hf-to-gguf", str(hf), str(i2s), "--target",
                        "bitnet.cpp", "--quiet"], check=True)
    cli = [sys.executable, "-m", "bitnet_convert", "verify", str(i2s), "--reference", str(hf), "--json"]
    rows = []
    read_s, _, _ = timed(["sh", "-c", f"cat {hf}/model.safetensors {i2s} > /dev/null"])
    rows.append(("read both files (cat)", read_s, None, None))
    for label, levels in (("weights layer", "weights"), ("default verify (weights + function)", "weights,function")):
        wall, peak, done = timed([*cli, "--level", levels])
        report = json.loads(done.stdout) if done.stdout.strip() else {"passed": None, "error": done.stderr}
        rows.append((label, wall, peak, report.get("passed")))
    print(f"{'step':<40} {'wall s':>8} {'peak GiB':>9}  passed")
    for label, wall, peak, passed in rows:
        print(f"{label:<40} {wall:>8.1f} {'' if peak is None else f'{peak:.2f}':>9}  {'' if passed is None else passed}")
    weights, full = rows[1], rows[2]
    ok = weights[2] <= 1.5 and full[1] <= 180 and full[2] <= 6 and full[3] is True
    print("floors met" if ok else "floors missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
