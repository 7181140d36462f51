"""Generation speed and memory: transformers' BitNetForCausalLM (bf16) against our `generate` path, side by side.

    python benchmarks/bench_generate.py HF_DIR            # a 2B4T-shaped checkpoint (benchmarks/make_2b4t.py)
    python benchmarks/bench_generate.py --synthetic       # ours only, random 2B4T weights made in-process (GPU)

With HF_DIR, each side runs in a fresh child process on the same prompt ids, so each one's peak RSS is its
own (`ru_maxrss` of the child from os.wait4, load included). Measured per side: prefill of 128 and 512 tokens
(prompt in, logits of the last token out; best of --repeats after a warm-up run that compiles), and
--decode-tokens single-token steps after the 128-token prompt (median s/token). Prints a table with the
ratios and exits 1 when a floor of issue #4 is missed: decode >= 3x transformers' tokens/s, prefill >= 2x,
our peak RSS < 2 GiB.

--synthetic needs no file, no transformers and no torch (the import chain is bitnet_model + jax): it prints
our decode ms/token and prefill ms at 128 and 512 tokens on whatever backend JAX picks, with the targets for
a GPU (decode < 5 ms/token, prefill-512 < 20 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1 << 30
FLOORS = {"decode": 3.0, "prefill": 2.0, "rss_gib": 2.0}
GPU_TARGETS_MS = {"decode": 5.0, "prefill_512": 20.0}
SEED = 1234


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
            result["decode_s"] = min(statistics.median(r.decode_s) for r in runs)
            result["first_ids"] = runs[0].new_ids[:8]
    return result


def child_ours(path: str, lengths, decode_tokens, repeats) -> dict:
    from bitnet_convert.generator import load_generator

    start = time.perf_counter()
    gen = load_generator(path)
    load_s = time.perf_counter() - start
    out = measure_ours(gen, lengths, decode_tokens, repeats)
    out["load_s"] = load_s
    import jax

    out["device"] = str(jax.devices()[0].device_kind)
    return out


# ---------------------------------------------------------------------------------- transformers side


def child_transformers(path: str, lengths, decode_tokens, repeats) -> dict:
    import torch
    from transformers import BitNetForCausalLM

    start = time.perf_counter()
    model = BitNetForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt_ids(model.config.vocab_size, max(lengths))])
    out = {"prefill_s": {}, "load_s": load_s, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for length in lengths:
            times = []
            for _ in range(repeats + 1):
                t = time.perf_counter()
                logits = model(ids[:, :length], use_cache=False).logits[:, -1]
                float(logits[0, 0])
                times.append(time.perf_counter() - t)
            out["prefill_s"][str(length)] = min(times[1:])
        step = model(ids[:, : min(lengths)], use_cache=True)
        past, token = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
        first, times = [int(token)], []
        for _ in range(decode_tokens):
            t = time.perf_counter()
            step = model(token, past_key_values=past, use_cache=True)
            past, token = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
            first.append(int(token))
            times.append(time.perf_counter() - t)
        out["decode_s"] = statistics.median(times)
        out["first_ids"] = first[:8]
    return out


# --------------------------------------------------------------------------------------------- parent


def run_child(side: str, path: str, args) -> dict:
    """Run one side in a fresh interpreter; returns its JSON result plus its peak RSS in bytes."""
    argv = [sys.executable, __file__, "--child", side, path, "--decode-tokens", str(args.decode_tokens),
            "--repeats", str(args.repeats), "--lengths", ",".join(map(str, args.lengths))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if proc.returncode != 0:
        raise SystemExit(f"{side} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["max_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


def compare(args) -> int:
    ours = run_child("ours", args.path, args)
    theirs = None if args.skip_transformers else run_child("transformers", args.path, args)
    rows, failures = [], []

    def row(label, ref, mine, floor=None, higher_is_better=False):
        ratio = (ref / mine if not higher_is_better else mine / ref) if ref and mine else None
        ok = "" if floor is None or ratio is None else ("ok" if ratio >= floor else f"MISSED (floor {floor}x)")
        if ok.startswith("MISSED"):
            failures.append(label)
        rows.append((label, ref, mine, ratio, ok))

    for length in args.lengths:
        row(f"prefill {length} tokens (s)", theirs and theirs["prefill_s"][str(length)],
            ours["prefill_s"][str(length)], FLOORS["prefill"])
    row("decode (s/token)", theirs and theirs["decode_s"], ours["decode_s"], FLOORS["decode"])
    row("peak RSS (GiB)", theirs and theirs["max_rss"] / GIB, ours["max_rss"] / GIB)
    row("load (s)", theirs and theirs["load_s"], ours["load_s"])
    if ours["max_rss"] >= FLOORS["rss_gib"] * GIB:
        failures.append("peak RSS")

    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"{'':28s} {'transformers bf16':>18s} {'bitnet-convert':>15s} {'ratio':>8s}")
    for label, ref, mine, ratio, ok in rows:
        print(f"{label:28s} {fmt(ref):>18s} {fmt(mine):>15s} {fmt(ratio):>8s}  {ok}")
    print(f"our peak RSS {ours['max_rss'] / GIB:.2f} GiB (floor < {FLOORS['rss_gib']} GiB); our device: {ours['device']}"
          + (f"; torch threads: {theirs['threads']}" if theirs else ""))
    if theirs:
        print(f"first greedy ids after the 128-token prompt: ours {ours['first_ids']}, transformers {theirs['first_ids']}")
    if failures:
        print("floors missed: " + ", ".join(failures))
        return 1
    return 0


def synthetic(args) -> int:
    import jax

    from bitnet_core.config import ModelConfig
    from bitnet_model import engine
    from bitnet_model.generation import Generator

    sys.path.insert(0, str(REPO / "benchmarks"))
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
    for length, seconds in result["prefill_s"].items():
        target = f"  (target < {GPU_TARGETS_MS['prefill_512']} ms on a GPU)" if length == "512" else ""
        print(f"prefill {length:>4s} tokens: {seconds * 1e3:9.2f} ms{target}")
    print(f"decode:             {result['decode_s'] * 1e3:9.2f} ms/token  (target < {GPU_TARGETS_MS['decode']} ms on a GPU)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="2B4T-shaped Hugging Face checkpoint folder")
    parser.add_argument("--synthetic", action="store_true", help="random in-process weights, our model only")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs after the warm-up run; each side reports its best (run to run, both sides "
                             "vary by +-25%% on the 2-core VM)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512],
                        help="prompt lengths, comma separated (decode runs after the shortest)")
    parser.add_argument("--skip-transformers", action="store_true", help="measure our side only")
    parser.add_argument("--child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = child_ours if args.child == "ours" else child_transformers
        print(json.dumps(run(args.path, args.lengths, args.decode_tokens, args.repeats)))
        return 0
    if args.synthetic:
        return synthetic(args)
    if not args.path:
        parser.error("give a checkpoint folder, or --synthetic")
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
