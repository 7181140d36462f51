"""Generation speed and memory: our `generate` path against every BitNet runtime on the same CPU, in one run.

    python benchmarks/bench_generate.py HF_DIR            # a 2B4T-shaped checkpoint (benchmarks/make_2b4t.py)
    python benchmarks/bench_generate.py --synthetic       # ours only, random 2B4T weights made in-process (GPU)

The sides, each on the same prompt ids with the same thread count (--threads, default: every core):
- ours: `generate`'s engine as it runs by default, greedy: the stored (exact) 16-bit head read in place from
  the checkpoint's memory map and decoded through the greedy screen (an int8 copy of the head is read, and the
  16-bit rows only where they can still win: the same tokens as the stored head's argmax); `--native-levels
  avx2` adds it with its kernels capped at AVX2, `--int8-head` with the opt-in int8 head (lossy: a side of its
  own, no floor's), `--full-head` without the screen (`generate --no-greedy-screen`: the whole 16-bit table
  every step, as sampling reads it);
- llama.cpp TQ2_0: llama-cpp-python on our TQ2_0 file of the checkpoint;
- ik_llama.cpp IQ2_BN: ik-llama-cpp-python on what its llama-quantize makes of our I2_S file, and ik_llama.cpp
  IQ2_BN_R4 on its llama-quantize's repacked layout of it (the same codes, rows interleaved by four for its CPU
  kernels; each of the two may be the faster at a measure);
- bitnet.cpp I2_S: its `llama-bench` ($BITNET_CPP_DIR/build/bin, else the build of
  ../shared/runtimes/bitnet.cpp/build.sh in ~/.cache/bitnet-cpp-4645960) on our I2_S file of a SiLU variant of
  the checkpoint: bitnet.cpp cannot read 2B4T's architecture `bitnet-b1.58` (relu2), so its file is `bitnet`,
  the 1bitLLM graph, which reads the same bytes per step (another activation: the same work);
- transformers' BitNetForCausalLM (bf16), unless --skip-transformers.
A runtime that is not installed stays in the table as "absent", with why.

Every side runs in fresh child processes, so each one's peak RSS is its own (`ru_maxrss` from os.wait4). There
are --rounds rounds, and in each every side runs once, in turn (interleaved: a slow minute of a shared machine
falls on all of them); each side reports its best over rounds and repeats. Measured: prefill of each --lengths
prompt (prompt in, last token's logits out; best of --repeats after a warm-up run that compiles) and decode
after the shortest prompt (median s/token of --decode-tokens steps; bitnet.cpp's llama-bench: the mean of its
best run of as many steps, from an empty context). Start-up, second run: a fresh process from its first line
of Python (imports included) to the first new token after the shortest prompt, once the same command has run
before (our compiled programs then come from the persistent compilation cache); bitnet.cpp's llama-bench does
not show it. Peak RSS generating: one more child per side that reads only the shortest prompt and decodes.
Decode also shows the bytes a step must read (ternary weights in each runtime's layout and the 16-bit head)
over its time, as a share of the machine's read bandwidth (a plain --threads read of a 1 GiB array, measured
in the same run).

The floors (exit 1 when one is missed) are checked against the fastest BitNet runtime in the run, per
measure: decode with the stored head >= 1.0x, prefill of 128 tokens >= 2x, peak RSS generating at most that of
the runtime fastest at decode, second-run start-up <= 2x llama.cpp's load + prefill; and decode capped at
AVX2 >= 1.0x llama.cpp TQ2_0, our peak RSS generating <= 1.5 GiB (issue 14), against transformers decode >= 3x
and prefill >= 2x (issue 4's, set with AMX: without it the prefill one is reported, not failed). Targets
(decode 1.25x, prefill 3x) are reported as met or missed. The output is the markdown table BENCHMARKS.md
holds, with the machine, the read bandwidth and the date; `--update BENCHMARKS.md` writes it there, between
the `<!-- generate:begin -->` and `<!-- generate:end -->` lines.

--synthetic needs no file, no transformers and no torch (the import chain is bitnet_model + jax): it prints
our decode ms/token and prefill ms at 128 and 512 tokens on whatever backend JAX picks, with the targets for
a GPU (decode < 5 ms/token, prefill-512 < 20 ms).
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # a child's start-up clock: imports included (the interpreter's own start not)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402

GIB = 1 << 30
SEED = 1234
OURS, OURS_INT8 = "ours", "ours int8 head"
LLAMA_CPP, IK_LLAMA_CPP, BITNET_CPP = "llama.cpp TQ2_0", "ik_llama.cpp IQ2_BN", "bitnet.cpp I2_S"
IK_LLAMA_CPP_R4 = "ik_llama.cpp IQ2_BN_R4"
RUNTIMES = (LLAMA_CPP, IK_LLAMA_CPP, IK_LLAMA_CPP_R4, BITNET_CPP)  # the BitNet runtimes: the floors' "fastest peer"
TRANSFORMERS = "transformers"
# ours / ours capped at AVX2 against the fastest runtime per measure (peer time / ours), and targets beyond
FLOORS = {"decode": 1.0, "prefill 128": 2.0}
TARGETS = {"decode": 1.25, "prefill 128": 3.0}
STARTUP_FLOOR = 2.0  # ours, second run, at most this times llama.cpp's load + prefill of the shortest prompt
AVX2_FLOOR = 1.0  # "ours avx2" decode against llama.cpp TQ2_0
RSS_FLOOR_GIB = 1.5  # issue 14: our peak RSS generating
TRANSFORMERS_FLOORS = {"decode": 3.0, "prefill": 2.0}  # issue 4's, every prompt length
# Issue 4 set prefill >= 2x transformers on a Xeon with AMX, where AMX tiles run our prompt products; without
# AMX (VNNI against torch's AVX-512 BF16) it measured 1.5-1.9x, and it is reported, not failed, there.
AMX_ONLY = {"prefill"}
GPU_TARGETS_MS = {"decode": 5.0, "prefill_512": 20.0}
HEAD_ENV = "BENCH_GENERATE_HEAD"  # our child's `head` (load_generator): the --int8-head side sets it
BITNET_CPP_BUILD = Path.home() / ".cache" / "bitnet-cpp-4645960"
MARKERS = ("<!-- generate:begin -->", "<!-- generate:end -->")  # --update writes the report between these
SCREEN_ENV = "BENCH_GENERATE_SCREEN"  # "0": our child decodes without the greedy screen (screen=False)
OURS_FULL_HEAD = "ours full head"


def prompt_ids(vocab_size: int, length: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(SEED).integers(0, vocab_size, length)]


# ------------------------------------------------------------------------------------------ our side


def measure_ours(gen, lengths: list[int], decode_tokens: int, repeats: int) -> dict:
    """Prefill seconds per prompt length and decode s/token after the shortest prompt, on a loaded Generator."""
    gen.eos_ids = set()  # random weights: never stop early
    ids = prompt_ids(gen.cfg.vocab_size, max(lengths))
    result = {"prefill_s": {}, "decode_s": None}
    for length in lengths:
        steps = decode_tokens + 1 if length == min(lengths) else 2
        runs = [gen.generate(ids[:length], steps) for _ in range(repeats + 1)][1:]  # the first one compiles
        result["prefill_s"][str(length)] = min(r.prefill_s for r in runs)
        if length == min(lengths):
            result["decode_s"] = min(r.decode_median_s for r in runs)
            result["first_ids"] = runs[0].new_ids[:8]
    return result


def child_ours(path: str, args) -> dict:
    import bitnet_model.generation  # noqa: F401  (JAX and the model's modules: timed as imports, not load)
    from bitnet_convert.generate_command import load_generator

    start = time.perf_counter()
    gen = load_generator(path, head=os.environ.get(HEAD_ENV, "stored"), screen=False if os.environ.get(SCREEN_ENV) == "0"
                         else None)
    if args.startup:
        loaded = time.perf_counter()
        run = gen.generate(prompt_ids(gen.cfg.vocab_size, min(args.lengths)), 1)
        return {"startup_s": time.perf_counter() - PROCESS_START, "imports_s": start - PROCESS_START,
                "load_s": loaded - start, "compile_s": run.compile_s, "prefill_s": run.prefill_s}
    load_s = time.perf_counter() - start
    out = measure_ours(gen, args.lengths, args.decode_tokens, args.repeats)
    out["load_s"] = load_s
    import jax

    from bitnet_model import native

    out["device"] = str(jax.devices()[0].device_kind) + f", kernels {native.level() if native.available() else 'XLA'}"
    return out


# ---------------------------------------------------------------------------------- transformers side


def child_transformers(path: str, args) -> dict:
    import torch
    from transformers import BitNetForCausalLM

    start = time.perf_counter()
    model = BitNetForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    lengths = args.lengths
    ids = torch.tensor([prompt_ids(model.config.vocab_size, max(lengths))])
    out = {"prefill_s": {}, "load_s": load_s}
    with torch.inference_mode():
        for length in lengths:
            times = []
            for _ in range(args.repeats + 1):
                t = time.perf_counter()
                logits = model(ids[:, :length], use_cache=False).logits[:, -1]
                float(logits[0, 0])
                times.append(time.perf_counter() - t)
            out["prefill_s"][str(length)] = min(times[1:])
        step = model(ids[:, : min(lengths)], use_cache=True)
        past, token = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
        first, times = [int(token)], []
        for _ in range(args.decode_tokens):
            t = time.perf_counter()
            step = model(token, past_key_values=past, use_cache=True)
            past, token = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
            first.append(int(token))
            times.append(time.perf_counter() - t)
        out["decode_s"] = statistics.median(times)
        out["first_ids"] = first[:8]
    return out


# ------------------------------------------------------------------------- llama.cpp and ik_llama.cpp


class LlamaCppSession:
    """llama-cpp-python: one context, a prompt evaluated from an empty cache, one token at a time after it."""

    def __init__(self, path: str, args):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=max(args.lengths) + args.decode_tokens + 8,
                                   n_batch=max(args.lengths), n_threads=args.threads, n_threads_batch=args.threads,
                                   n_gpu_layers=0, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def prompt(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._greedy()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._greedy()

    def _greedy(self) -> int:  # llama-cpp-python keeps no scores without logits_all: read the context's row
        import numpy as np

        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))))


class IkLlamaCppSession:
    """ik-llama-cpp-python's context (its wrapper's defaults, flash attention on), driven as LlamaCppSession."""

    def __init__(self, path: str, args):
        from ik_llama_cpp import _internals as ik

        self.ik = ik
        self.model = ik.IkModel(path)
        self.context = ik.IkContext(self.model, n_ctx=max(args.lengths) + args.decode_tokens + 8,
                                    n_threads=args.threads)
        self.position = 0

    def prompt(self, ids: list[int]) -> int:
        self.context.kv_cache_clear()
        self._decode(self.ik.make_batch(ids, logits_last=True))
        self.position = len(ids)
        return self._greedy()

    def step(self, token: int) -> int:
        self._decode(self.ik.make_batch_single(token, self.position))
        self.position += 1
        return self._greedy()

    def _decode(self, batch) -> None:
        try:
            if self.context.decode(batch) != 0:
                raise RuntimeError("ik_llama.cpp could not decode the batch")
        finally:
            self.ik.C.llama_batch_free(batch)

    def _greedy(self) -> int:
        import numpy as np

        return int(np.argmax(np.ctypeslib.as_array(self.context.get_logits(-1), shape=(self.model.n_vocab,))))


SESSIONS = {"llama.cpp": LlamaCppSession, "ik_llama.cpp": IkLlamaCppSession}


def child_runtime(kind: str, path: str, args) -> dict:
    start = time.perf_counter()
    session = SESSIONS[kind](path, args)
    load_s = time.perf_counter() - start
    ids = prompt_ids(args.vocab_size, max(args.lengths))
    shortest = min(args.lengths)
    if args.startup:
        session.prompt(ids[:shortest])
        return {"startup_s": time.perf_counter() - PROCESS_START, "load_s": load_s}
    out = {"prefill_s": {}, "load_s": load_s}
    for length in args.lengths:
        times = []
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            session.prompt(ids[:length])
            times.append(time.perf_counter() - t)
        out["prefill_s"][str(length)] = min(times[1:])
    token, first, times = session.prompt(ids[:shortest]), [], []
    for _ in range(args.decode_tokens):
        first.append(token)
        t = time.perf_counter()
        token = session.step(token)
        times.append(time.perf_counter() - t)
    out["decode_s"] = statistics.median(times)
    out["first_ids"] = first[:8]
    return out


# --------------------------------------------------------------------------------- bitnet.cpp's bench


def llama_bench_binary() -> Path:
    base = Path(os.environ["BITNET_CPP_DIR"]) if os.environ.get("BITNET_CPP_DIR") else BITNET_CPP_BUILD
    return base / "build" / "bin" / "llama-bench"


def run_llama_bench(path: str, args, *, prompt: list[int] | None = None, generate: int = 0,
                    repeats: int = 1) -> tuple[list[dict], int]:
    """llama-bench's JSON records (one per prompt length or generation) and its peak RSS in bytes."""
    argv = [str(llama_bench_binary()), "-m", path, "-t", str(args.threads), "-r", str(repeats), "-o", "json",
            "-p", ",".join(map(str, prompt or [0])), "-n", str(generate)]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"bitnet.cpp's llama-bench failed ({proc.returncode}): {err.read().strip()[-500:]}")
    return json.loads(stdout), usage.ru_maxrss * 1024


def measure_bitnet_cpp(path: str, args) -> dict:
    """Prefill per length (best run) and decode (the best run of --decode-tokens steps, per token)."""
    records, rss = run_llama_bench(path, args, prompt=args.lengths, repeats=args.repeats)
    out = {"prefill_s": {str(r["n_prompt"]): min(r["samples_ns"]) / 1e9 for r in records}, "max_rss": rss}
    (record,), rss = run_llama_bench(path, args, generate=args.decode_tokens, repeats=args.repeats)
    out["decode_s"] = min(record["samples_ns"]) / 1e9 / args.decode_tokens
    out["max_rss"] = max(out["max_rss"], rss)
    return out


# ------------------------------------------------------------------------- the files each runtime runs


def _beside(hf_dir: str, suffix: str) -> Path:
    return Path(hf_dir).with_name(Path(hf_dir).name + suffix)


def llama_cpp_file(hf_dir: str) -> str:
    """Our TQ2_0 file of the checkpoint, written once beside it (llama.cpp's own converter cannot read 2B4T)."""
    from bitnet_convert import api

    out = _beside(hf_dir, "-tq2_0.gguf")
    if not out.exists():
        api.convert(hf_dir, out, outtype="tq2_0", quiet=True)
    return str(out)


def i2_s_file(hf_dir: str) -> str:
    from bitnet_convert import api

    out = _beside(hf_dir, "-i2_s.gguf")
    if not out.exists():
        api.convert(hf_dir, out, target="bitnet.cpp", outtype="i2_s", quiet=True)
    return str(out)


def ik_llama_cpp_file(hf_dir: str, layout: str = "iq2_bn") -> str:
    """ik_llama.cpp's IQ2_BN (or `layout`) of our I2_S file (its `bitnet-b1.58` graph computes 2B4T's relu2)."""
    from bitnet_convert.verification.runtime import requantize_iq2_bn

    out = _beside(hf_dir, f"-{layout}.gguf")
    if not out.exists():
        refused = requantize_iq2_bn(i2_s_file(hf_dir), out, layout)
        if refused is not None:
            raise SystemExit(f"ik_llama.cpp's llama-quantize refused {i2_s_file(hf_dir)}: {refused}")
    return str(out)


def bitnet_cpp_file(hf_dir: str) -> str:
    """Our I2_S file of the checkpoint with hidden_act silu: architecture `bitnet`, which bitnet.cpp reads (the
    same tensors; its FFN computes SiLU where 2B4T has relu2, the same work per step)."""
    from bitnet_convert import api

    out = _beside(hf_dir, "-silu-i2_s.gguf")
    if out.exists():
        return str(out)
    silu = _beside(hf_dir, "-silu")
    silu.mkdir(exist_ok=True)
    for item in Path(hf_dir).iterdir():
        if item.is_file() and item.name != "config.json" and not (silu / item.name).exists():
            (silu / item.name).symlink_to(item.resolve())
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    (silu / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}, indent=2) + "\n")
    api.convert(str(silu), out, target="bitnet.cpp", outtype="i2_s", quiet=True)
    return str(out)


# ------------------------------------------------------------------------------------------------ sides


@dataclasses.dataclass
class Side:
    """One column of the table: what runs, on which file, and what it measured (best over rounds)."""

    name: str
    kind: str  # ours | llama.cpp | ik_llama.cpp | bitnet.cpp | transformers: the code that runs it
    env: dict = dataclasses.field(default_factory=dict)
    path: str = ""  # the checkpoint or file it runs
    absent: str | None = None  # why it could not run
    best: dict = dataclasses.field(default_factory=dict)

    @property
    def startup(self) -> bool:  # llama-bench cannot show a start-up
        return self.kind in ("ours", "llama.cpp", "ik_llama.cpp")

    def merge(self, result: dict) -> None:
        """Keep the best (least) time per measure, the most memory, and the fastest start-up whole."""
        for key, value in result.items():
            old = self.best.get(key)
            if key == "startup":
                if old is None or value["startup_s"] < old["startup_s"]:
                    self.best[key] = value
            elif key == "prefill_s":
                self.best[key] = {k: min(v, (old or {}).get(k, v)) for k, v in value.items()}
            elif key in ("max_rss", "generate_rss"):
                self.best[key] = max(value, old or 0)
            elif isinstance(value, float) and old is not None:
                self.best[key] = min(value, old)
            elif old is None:
                self.best[key] = value


# The file each runtime side runs, by side name (--prepare writes one).
FILES = {LLAMA_CPP: llama_cpp_file, IK_LLAMA_CPP: ik_llama_cpp_file,
         IK_LLAMA_CPP_R4: lambda hf_dir: ik_llama_cpp_file(hf_dir, "iq2_bn_r4"), BITNET_CPP: bitnet_cpp_file}


def prepared_file(name: str, hf_dir: str) -> str:
    """The file side `name` runs, written (once) by a child process: a conversion in this process would raise
    its peak RSS, which every child it starts inherits in ru_maxrss (the high-water mark survives fork and
    exec)."""
    done = subprocess.run([sys.executable, __file__, "--prepare", name, hf_dir], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not write the file {name} runs (exit {done.returncode})")
    return done.stdout.strip().splitlines()[-1]


def runtime_sides(hf_dir: str) -> list[Side]:
    """The BitNet runtimes, each on its file, or absent with the reason."""
    sides = []
    for name, kind, module in ((LLAMA_CPP, "llama.cpp", "llama_cpp"), (IK_LLAMA_CPP, "ik_llama.cpp", "ik_llama_cpp"),
                               (IK_LLAMA_CPP_R4, "ik_llama.cpp", "ik_llama_cpp"), (BITNET_CPP, "bitnet.cpp", None)):
        side = Side(name, kind)
        if module is not None and importlib.util.find_spec(module) is None:
            side.absent = f"absent: the Python package {module} is not installed"
        elif kind == "bitnet.cpp" and not llama_bench_binary().is_file():
            side.absent = f"absent: no {llama_bench_binary()} (../shared/runtimes/bitnet.cpp/build.sh builds it)"
        else:
            side.path = prepared_file(name, hf_dir)
        sides.append(side)
    return sides


def run_child(side: Side, args, *, startup: bool = False, short: bool = False) -> dict:
    """One measurement of a side in a fresh interpreter; its JSON result plus its peak RSS in bytes."""
    if side.kind == "bitnet.cpp":
        if short:
            _, rss = run_llama_bench(side.path, args, generate=args.decode_tokens)
            return {"max_rss": rss}
        return measure_bitnet_cpp(side.path, args)
    lengths = [min(args.lengths)] if short else args.lengths
    argv = [sys.executable, __file__, "--child", side.kind, side.path, "--decode-tokens", str(args.decode_tokens),
            "--repeats", "1" if short else str(args.repeats), "--lengths", ",".join(map(str, lengths)),
            "--threads", str(args.threads), "--vocab-size", str(args.vocab_size)] + (["--startup"] if startup else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, **side.env})
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if proc.returncode != 0:
        raise SystemExit(f"{side.name} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["max_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


# ------------------------------------------------------------------------------------------ bandwidth


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes/s of a plain read of a `gib` GiB array split over `threads` threads (numpy's reductions release
    the GIL), best of 5: the rate a memory-bound decode step can at most reach."""
    import threading

    import numpy as np

    data = np.ones(int(gib * GIB) // 8, np.uint64)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(6):
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(part,)) for part in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    return data.nbytes / best


def step_bytes(config: dict) -> dict[str, float]:
    """Bytes one decode step reads on each side: every projection once in its runtime's layout, and the 16-bit
    head (bf16 for us, the f16 token_embd the GGUF files hold)."""
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    q = config["num_attention_heads"] * head_dim
    values = layers * (h * q * 2 + 2 * h * kv + 3 * h * f)
    rows = layers * (q + 2 * kv + h + 2 * f + h)  # output rows of every projection
    head = config["vocab_size"] * h * 2
    return {
        # the greedy screen (our default) reads the int8 copy and its scales and bounds; the few 16-bit rows it
        # re-scores are left out
        OURS: values / 4 + head / 2 + 8 * config["vocab_size"],
        OURS_INT8: values / 4 + head / 2 + 4 * config["vocab_size"],
        OURS_FULL_HEAD: values / 4 + head,
        LLAMA_CPP: values * 66 / 256 + head,  # TQ2_0: 64 bytes of 2-bit codes + an f16 scale per 256 values
        IK_LLAMA_CPP: values / 4 + 4 * rows + head,  # IQ2_BN: 2 bits a value and a float per row
        IK_LLAMA_CPP_R4: values / 4 + 4 * rows + head,  # the same bytes, rows interleaved by four
        BITNET_CPP: values / 4 + 32 * 7 * layers + head,  # I2_S: 2 bits a value and a 32-byte tail per tensor
    }


# ---------------------------------------------------------------------------------------------- report


def seconds(side: Side, measure: str) -> float | None:
    """A side's best time for one measure of the table (None where it has none)."""
    b = side.best
    if measure == "decode":
        return b.get("decode_s")
    if measure.startswith("prefill "):
        return (b.get("prefill_s") or {}).get(measure.split()[1])
    if measure == "start-up":
        return (b.get("startup") or {}).get("startup_s")
    return b.get("load_s")


def fastest(peers: list[Side], measure: str) -> Side | None:
    timed = [p for p in peers if seconds(p, measure) is not None]
    return min(timed, key=lambda p: seconds(p, measure)) if timed else None


def report(sides: list[Side], args, bandwidth: float, moved: dict) -> int:
    ours = next(s for s in sides if s.name == OURS)
    runtimes = [s for s in sides if s.name in RUNTIMES and not s.absent]
    present = [s for s in sides if not s.absent]
    shortest = min(args.lengths)

    def cell(side: Side, value, fmt: str) -> str:
        if side.absent:
            return "absent"
        return "-" if value is None else format(value, fmt)

    rows = [(f"prefill {n} tokens (s)", lambda s, n=n: seconds(s, f"prefill {n}"), ".3f") for n in args.lengths]
    rows += [
        ("decode (ms/token)", lambda s: None if seconds(s, "decode") is None else seconds(s, "decode") * 1e3, ".1f"),
        ("decode: GB read per step", lambda s: None if s.name not in moved else moved[s.name] / 1e9, ".3f"),
        ("decode: share of read bandwidth", lambda s: None if s.name not in moved or seconds(s, "decode") is None
         else 100 * moved[s.name] / seconds(s, "decode") / bandwidth, ".0f"),
        ("start-up to first token, second run (s)", lambda s: seconds(s, "start-up"), ".2f"),
        ("load (s)", lambda s: seconds(s, "load"), ".2f"),
        ("peak RSS generating (GiB)", lambda s: None if "generate_rss" not in s.best else s.best["generate_rss"] / GIB,
         ".2f"),
    ]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Machine: {harness.cpu_model()} ({harness.cpu_extensions()}), {os.cpu_count()} cores; {args.threads} "
          f"threads every side; read bandwidth {bandwidth / 1e9:.1f} GB/s ({args.threads} threads, 1 GiB); "
          f"{date}; {args.rounds} rounds, best of each side; checkpoint {args.path}")
    print()
    print("| | " + " | ".join(s.name for s in sides) + " |")
    print("|---|" + "---:|" * len(sides))
    for label, value, fmt in rows:
        print(f"| {label} | " + " | ".join(cell(s, value(s), fmt) for s in sides) + " |")
    print()
    notes = [f"{s.name}: {s.absent}" for s in sides if s.absent]
    if any(s.name == BITNET_CPP and not s.absent for s in sides):
        notes.append(f"{BITNET_CPP}: architecture `bitnet` (SiLU; bitnet.cpp cannot read 2B4T's `bitnet-b1.58`), "
                     "llama-bench, decode from an empty context")
    if "device" in ours.best:
        notes.append(f"ours: {ours.best['device']}")
    if "startup" in ours.best:
        up = ours.best["startup"]
        notes.append(f"ours, second-run start-up {up['startup_s']:.2f} s: imports {up['imports_s']:.2f} s, load "
                     f"{up['load_s']:.2f} s, compilation (from the persistent cache) {up['compile_s']:.2f} s, "
                     f"prefill and first token {up['prefill_s']:.2f} s")
    for note in notes:
        print(f"- {note}")
    for s in present:
        if "first_ids" in s.best:
            print(f"- first greedy ids after the {shortest}-token prompt, {s.name}: {s.best['first_ids']}")
    return check_floors(sides, ours, runtimes, args)


def check_floors(sides: list[Side], ours: Side, runtimes: list[Side], args) -> int:
    failures, lines = [], []

    def against(side: Side, peer: Side | None, measure: str, floor: float | None, target: float | None = None):
        if peer is None or seconds(side, measure) is None:
            lines.append(f"{side.name} {measure}: not checked (no peer measured it)")
            return
        ratio = seconds(peer, measure) / seconds(side, measure)
        text = f"{side.name} {measure}: {ratio:.2f}x {peer.name}"
        if floor is not None:
            text += f" (floor {floor}x" + (f", target {target}x: {'met' if ratio >= target else 'missed'})"
                                           if target else ")")
            if ratio < floor:
                failures.append(text)
        lines.append(text)

    shortest = min(args.lengths)
    against(ours, fastest(runtimes, "decode"), "decode", FLOORS["decode"], TARGETS["decode"])
    against(ours, fastest(runtimes, f"prefill {shortest}"), f"prefill {shortest}",
            FLOORS["prefill 128"] if shortest == 128 else None, TARGETS["prefill 128"] if shortest == 128 else None)
    for n in args.lengths[1:]:
        against(ours, fastest(runtimes, f"prefill {n}"), f"prefill {n}", None)
    llama = next((s for s in runtimes if s.name == LLAMA_CPP), None)
    startup = seconds(ours, "start-up")
    if llama is not None and startup is not None and seconds(llama, f"prefill {shortest}") is not None:
        budget = STARTUP_FLOOR * (seconds(llama, "load") + seconds(llama, f"prefill {shortest}"))
        text = (f"ours start-up, second run: {startup:.2f} s against {STARTUP_FLOOR}x llama.cpp's load + prefill "
                f"= {budget:.2f} s (floor)")
        lines.append(text)
        if startup > budget:
            failures.append(text)
    avx2 = next((s for s in sides if s.name == "ours avx2"), None)
    if avx2 is not None:
        against(avx2, llama, "decode", AVX2_FLOOR)
    rss = ours.best.get("generate_rss", 0)
    if rss > RSS_FLOOR_GIB * GIB:
        failures.append(f"our peak RSS generating {rss / GIB:.2f} GiB > {RSS_FLOOR_GIB} GiB")
    leader = fastest(runtimes, "decode")
    if leader is not None and "generate_rss" in leader.best:
        text = (f"ours peak RSS generating {rss / GIB:.2f} GiB against {leader.name}'s "
                f"{leader.best['generate_rss'] / GIB:.2f} GiB (at most, the fastest runtime at decode)")
        lines.append(text)
        if rss > leader.best["generate_rss"]:
            failures.append(text)
    transformers = next((s for s in sides if s.name == TRANSFORMERS and not s.absent), None)
    if transformers is not None:
        no_amx = "no AMX" in harness.cpu_extensions()
        against(ours, transformers, "decode", TRANSFORMERS_FLOORS["decode"])
        for n in args.lengths:
            floor = None if no_amx else TRANSFORMERS_FLOORS["prefill"]
            against(ours, transformers, f"prefill {n}", floor)
        if no_amx:
            lines.append(f"(without AMX, prefill against transformers is reported, not failed: floor "
                         f"{TRANSFORMERS_FLOORS['prefill']}x where the CPU has AMX)")
    print()
    for line in lines:
        print(f"- {line}")
    if not runtimes:
        print("no BitNet runtime is installed: the floors against the fastest one are not checked")
        return 2
    if failures:
        print("floors missed: " + "; ".join(failures))
        return 1
    print("every floor met")
    return 0


# --------------------------------------------------------------------------------------------- parent


def compare(args) -> int:
    config = json.loads((Path(args.path) / "config.json").read_text())
    args.vocab_size = config["vocab_size"]
    sides = [Side(OURS, "ours", path=args.path)]
    sides += [Side(f"ours {level}", "ours", {"BITNET_NATIVE": level}, args.path) for level in args.native_levels]
    if args.int8_head:
        sides.append(Side(OURS_INT8, "ours", {HEAD_ENV: "int8"}, args.path))
    if args.full_head:  # the stored head read whole every step: what sampling reads
        sides.append(Side(OURS_FULL_HEAD, "ours", {SCREEN_ENV: "0"}, args.path))
    sides += runtime_sides(args.path)
    if not args.skip_transformers:
        transformers = Side(TRANSFORMERS, "transformers", path=args.path)
        if importlib.util.find_spec("transformers") is None:
            transformers.absent = "absent: the Python package transformers is not installed"
        sides.append(transformers)
    present = [s for s in sides if not s.absent]
    for side in present:  # start-up is measured on a second run: this first one fills our compilation cache
        if side.startup:
            run_child(side, args, startup=True)
    for round_ in range(args.rounds):
        for side in present:
            side.merge(run_child(side, args))
            if side.startup:
                up = run_child(side, args, startup=True)
                side.merge({"startup": up})
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    # Peak RSS while generating as a user does (the shortest prompt, then decode), each side in a child of its
    # own: the timing children also read the longer prompts, whose caches and activations generation after a
    # short prompt does not hold.
    for side in present:
        side.merge({"generate_rss": run_child(side, args, short=True)["max_rss"]})
    bandwidth = read_bandwidth(args.threads)
    moved = step_bytes(config)
    for side in sides:
        if side.name.startswith("ours ") and side.name not in (OURS_INT8, OURS_FULL_HEAD):
            moved[side.name] = moved[OURS]
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        code = report(sides, args, bandwidth, moved)
    print(table.getvalue(), end="")
    if args.update:
        harness.update_between(Path(args.update), table.getvalue().rstrip(), *MARKERS)
    return code


def synthetic(args) -> int:
    import jax

    from bitnet_core.config import ModelConfig
    from bitnet_model import engine
    from bitnet_model.generation import Generator
    from make_2b4t import CONFIG_2B4T

    cfg = ModelConfig.from_hf(CONFIG_2B4T)
    start = time.perf_counter()
    weights = engine.synthetic_weights(cfg, seed=0)
    jax.block_until_ready(weights)
    made = time.perf_counter() - start
    gen = Generator(cfg, weights)
    result = measure_ours(gen, args.lengths, args.decode_tokens, args.repeats)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); options {gen.opts}")
    print(f"weights: {weights.nbytes() / GIB:.2f} GiB made in {made:.1f} s")
    for length, secs in result["prefill_s"].items():
        target = f"  (target < {GPU_TARGETS_MS['prefill_512']} ms on a GPU)" if length == "512" else ""
        print(f"prefill {length:>4s} tokens: {secs * 1e3:9.2f} ms{target}")
    print(f"decode:             {result['decode_s'] * 1e3:9.2f} ms/token  (target < {GPU_TARGETS_MS['decode']} ms on a GPU)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="2B4T-shaped Hugging Face checkpoint folder")
    parser.add_argument("--synthetic", action="store_true", help="random in-process weights, our model only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every side in turn; each side's best")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs in each child after the warm-up run (run to run, every side varies by "
                             "+-25%% on the 2-core VM)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512],
                        help="prompt lengths, comma separated, shortest first (decode runs after the shortest)")
    parser.add_argument("--skip-transformers", action="store_true", help="leave transformers out")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every side")
    parser.add_argument("--native-levels", type=lambda s: [x for x in s.split(",") if x], default=[],
                        help="also run our engine with its kernels capped at these levels (e.g. avx2,0)")
    parser.add_argument("--int8-head", action="store_true",
                        help="also run our engine with the opt-in int8 head (generate --head int8; lossy)")
    parser.add_argument("--full-head", action="store_true",
                        help="also run our engine without the greedy screen (generate --no-greedy-screen)")
    parser.add_argument("--update", metavar="FILE",
                        help="also write the report into FILE between its generate markers (BENCHMARKS.md)")
    parser.add_argument("--child", choices=("ours", "transformers", "llama.cpp", "ik_llama.cpp"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", choices=tuple(FILES), help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        print(FILES[args.prepare](args.path))
        return 0
    if args.child:
        if args.child == "ours":
            result = child_ours(args.path, args)
        elif args.child == "transformers":
            result = child_transformers(args.path, args)
        else:
            result = child_runtime(args.child, args.path, args)
        print(json.dumps(result))
        return 0
    if args.synthetic:
        return synthetic(args)
    if not args.path:
        parser.error("give a checkpoint folder, or --synthetic")
    if args.lengths != sorted(args.lengths):
        parser.error("--lengths: shortest first")
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
