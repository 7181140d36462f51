"""Run commands as child processes and measure each one's wall time and peak resident memory.

How a measurement is taken, and why:
- Wall time: `time.perf_counter()` from just before `fork/exec` to the child's exit, so interpreter start-up and
  imports count, as they do for a user typing the command.
- Peak RSS: `os.wait4(pid)` returns the rusage of *that* child (and of any grandchildren it waited for), never
  of the benchmark process or of earlier children: `ru_maxrss` is the child's high-water mark, the number
  `/usr/bin/time -v` prints as "Maximum resident set size". It counts file pages the child has memory-mapped and
  touched, as well as its own (anonymous) memory, which is why a converter that maps the whole 1.2 GB input and
  never lets go of it shows a 1.2 GB+ peak even if it "streams".
- To tell those apart, a thread polls /proc/PID/status every 20 ms and keeps the peaks of RssAnon (the child's
  own memory) and RssFile (mapped file pages); a poll can miss a spike shorter than 20 ms, ru_maxrss cannot.
- Page cache: the input is read once (`warm_file`) right before *every* timed command, cp included, so each one
  starts with the whole input in the page cache (the machine has far more RAM than the input) and none pays for
  disk reads that another one was spared. Outputs are deleted before each run, so every run writes a new file.
- Durability: every bitnet-convert output is fsync'ed before it is renamed into place (bitnet_convert/atomic.py),
  so the baseline is `cp` followed by an fsync of the copy (`cp+fsync`); plain `cp` is timed too and shown.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass
class Measurement:
    """One run of one command."""

    label: str
    argv: list[str]
    wall_s: float
    max_rss: int  # bytes, ru_maxrss of the child
    peak_anon: int  # bytes, polled RssAnon peak (0 if never sampled)
    peak_file: int  # bytes, polled RssFile peak
    user_s: float
    sys_s: float
    returncode: int
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _read_status(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a live process in bytes; (0, 0) once it is gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(b"RssFile:") or line.startswith(b"RssShmem:"):
                    file += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return anon, file


class _Poller(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_anon = self.peak_file = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            anon, file = _read_status(self.pid)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, file)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def best_time(fn, repeats: int, warm_up: bool = True) -> tuple[float, object]:
    """(the shortest of `repeats` timed calls of fn(), the last result), after one untimed call with
    `warm_up` (compilation, first touch)."""
    result = fn() if warm_up else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_extensions() -> str:
    """What the kernels can use on this CPU, from /proc/cpuinfo: "AVX2, AVX-512 VNNI, no AMX" and the like
    (every table records it: the same code runs 2-10x apart with and without these)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "unknown"
    names = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"))
             if flag in flags]
    names.append("AMX" if {"amx_tile", "amx_int8"} <= flags else "no AMX")
    return ", ".join(names)


def measure(label: str, argv: Sequence[str], *, env: dict | None = None, cwd: str | None = None,
            timeout: float | None = None) -> Measurement:
    """Run `argv` to completion; stdout is discarded, the end of stderr is kept for error reports."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=env, cwd=cwd)
        poller = _Poller(proc.pid)
        poller.start()
        deadline = None if timeout is None else start + timeout
        while True:
            # wait4 on this pid only: its rusage is this child's, not the sum of every child we ever had.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting for it again
        poller.stop()
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return Measurement(label, list(argv), wall, usage.ru_maxrss * 1024, poller.peak_anon, poller.peak_file,
                       usage.ru_utime, usage.ru_stime, proc.returncode, tail)


def warm_file(path: str | os.PathLike, block: int = 8 * MIB) -> None:
    """Read a file (or every file under a folder) once, so it sits in the page cache."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    buf = bytearray(block)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def remove(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def output_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
    return p.stat().st_size if p.exists() else 0


def cp_command(src: str, dst: str, fsync: bool) -> list[str]:
    """`cp SRC DST`, or `cp SRC DST && sync DST` (coreutils sync FILE = fsync of that file)."""
    if not fsync:
        return ["cp", src, dst]
    return ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "cp+fsync", src, dst]


@dataclasses.dataclass
class Case:
    """A command to time: `argv` writes `output`, which is removed before and after each run."""

    label: str
    argv: list[str]
    output: str
    rss_limit: int | None = None  # bytes
    time_limit_x: float | None = None  # most wall time allowed, as a multiple of the baseline's
    output_bytes: int = 0
    env: dict | None = None  # extra environment variables for this command only
    runs: list[Measurement] = dataclasses.field(default_factory=list)

    @property
    def wall_s(self) -> float:
        """Median over the runs (the runs are interleaved with the baseline's)."""
        return statistics.median(m.wall_s for m in self.runs)

    @property
    def max_rss(self) -> int:
        return max(m.max_rss for m in self.runs)

    @property
    def peak_anon(self) -> int:
        return max(m.peak_anon for m in self.runs)

    @property
    def peak_file(self) -> int:
        return max(m.peak_file for m in self.runs)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(m.ok for m in self.runs)


def run_cases(cases: Sequence[Case], warm: str, repeat: int = 1, env: dict | None = None, log=None,
              keep_outputs: bool = False, timeout: float | None = None) -> None:
    """Run every case `repeat` times, round-robin (case 1..n, then again), warming `warm` before each run.

    Interleaving puts the baseline and the conversions under the same background load, which matters on a
    shared machine; each case reports its median."""
    for r in range(repeat):
        for case in cases:
            remove(case.output)
            warm_file(warm)
            m = measure(case.label, case.argv, env={**(env or os.environ), **(case.env or {})}, timeout=timeout)
            case.runs.append(m)
            case.output_bytes = output_size(case.output)
            if log:
                status = "ok" if m.ok else f"FAILED (exit {m.returncode})"
                log(f"[{r + 1}/{repeat}] {case.label:<34} {m.wall_s:7.2f} s  maxrss {m.max_rss / GIB:5.2f} GiB  "
                    f"anon {m.peak_anon / GIB:5.2f}  file {m.peak_file / GIB:5.2f}  {status}")
                if not m.ok:
                    log(m.stderr_tail.rstrip())
            if not keep_outputs or r + 1 < repeat:
                remove(case.output)


@dataclasses.dataclass
class Row:
    label: str
    wall_s: float
    ratio: float | None
    ratio_other: float | None  # against a second baseline, shown beside the first (None: not asked for)
    max_rss: int
    peak_anon: int
    peak_file: int
    output_bytes: int
    verdict: str  # "", "pass", "FAIL: ..."


def rows(cases: Sequence[Case], baseline: Case, other: Case | None = None) -> list[Row]:
    """One row per case; floors are checked against `baseline`, `other` only adds a column of ratios."""
    out = []
    base = baseline.wall_s
    for case in cases:
        if not case.ok:
            out.append(Row(case.label, float("nan"), None, None, 0, 0, 0, 0, "FAIL: command failed"))
            continue
        ratio = case.wall_s / base if case is not baseline else 1.0
        ratio_other = None if other is None or not other.ok else case.wall_s / other.wall_s
        failures = []
        if case.time_limit_x is not None and ratio > case.time_limit_x:
            failures.append(f"time {ratio:.2f}x > {case.time_limit_x:g}x")
        if case.rss_limit is not None and case.max_rss > case.rss_limit:
            failures.append(f"RSS {case.max_rss / GIB:.2f} GiB > {case.rss_limit / GIB:g} GiB")
        checked = case.time_limit_x is not None or case.rss_limit is not None
        verdict = ("FAIL: " + "; ".join(failures)) if failures else ("pass" if checked else "")
        out.append(Row(case.label, case.wall_s, ratio, ratio_other, case.max_rss, case.peak_anon, case.peak_file,
                       case.output_bytes, verdict))
    return out


def _floor(case: Case) -> str:
    parts = []
    if case.time_limit_x is not None:
        parts.append(f"<= {case.time_limit_x:g}x")
    if case.rss_limit is not None:
        parts.append(f"< {case.rss_limit / GIB:g} GiB")
    return ", ".join(parts)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def text_table(cases: Sequence[Case], baseline: Case, other: Case | None = None) -> str:
    extra = f" {'x ' + other.label:>8}" if other is not None else ""
    head = (f"{'command':<34} {'wall s':>7} {'x base':>6}{extra} {'peak RSS':>9} {'anon':>6} {'file':>6} "
            f"{'output MB':>10}  {'floor':<18} verdict")
    lines = [head, "-" * len(head)]
    for case, row in zip(cases, rows(cases, baseline, other)):
        extra = f" {_ratio(row.ratio_other):>8}" if other is not None else ""
        lines.append(f"{row.label:<34} {row.wall_s:7.2f} {_ratio(row.ratio):>6}{extra} {row.max_rss / GIB:7.2f}Gi "
                     f"{row.peak_anon / GIB:6.2f} {row.peak_file / GIB:6.2f} {row.output_bytes / 1e6:10.1f}  "
                     f"{_floor(case):<18} {row.verdict}")
    return "\n".join(lines)


def markdown_table(cases: Sequence[Case], baseline: Case, other: Case | None = None) -> str:
    extra_head, extra_rule = (f" × `{other.label}` |", "---:|") if other is not None else ("", "")
    lines = [f"| command | wall time (s) | × baseline |{extra_head} peak RSS (GiB) | own memory (GiB) "
             "| mapped file (GiB) | output (MB) | floor | verdict |",
             f"|---|---:|---:|{extra_rule}---:|---:|---:|---:|---|---|"]
    for case, row in zip(cases, rows(cases, baseline, other)):
        extra = f" {_ratio(row.ratio_other)} |" if other is not None else ""
        lines.append(f"| `{row.label}` | {row.wall_s:.2f} | {_ratio(row.ratio)} |{extra} {row.max_rss / GIB:.2f} | "
                     f"{row.peak_anon / GIB:.2f} | {row.peak_file / GIB:.2f} | {row.output_bytes / 1e6:.1f} | "
                     f"{_floor(case)} | {row.verdict} |")
    return "\n".join(lines)


def failures(cases: Sequence[Case], baseline: Case) -> list[str]:
    return [f"{row.label}: {row.verdict[6:]}" for row in rows(cases, baseline) if row.verdict.startswith("FAIL")]


def update_between(path: Path, md: str, begin: str, end: str) -> None:
    """Replace the text between the `begin` and `end` marker lines of `path` with `md` (markers appended to
    the file when it lacks them)."""
    text = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{md}\n{end}{tail}")
