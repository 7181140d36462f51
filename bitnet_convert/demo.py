"""`make demo`: the built-in trained BitNet moved through every format, verified, and run in every runtime.

    python -m bitnet_convert.demo OUT_DIR

The built-in model (bitnet_convert/builtin: 2B4T's layout with SiLU, trained here in JAX) goes HF -> Flax -> HF,
Flax -> npz -> GGUF (bitnet.cpp I2_S, llama.cpp TQ2_0 and TQ1_0) -> HF, each step verified against its own input
(weights exact, logits of the same engine identical); then it continues one prompt greedily in JAX and in each
runtime that is installed and computes its function, and says whether the continuations agree. A random tiny
relu2 model (2B4T's own activation, which only ik_llama.cpp among the runtimes computes) takes the same
conversions, and the JAX model's parity with transformers is shown once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (step, source key, output name, output format, writer options)
STEPS = (
    ("hf -> flax", "hf", "flax", "flax", {}),
    ("flax -> hf", "flax", "hf-roundtrip", "hf", {}),
    ("flax -> npz", "flax", "npz", "npz", {}),
    ("npz -> gguf (bitnet.cpp, i2_s)", "npz", "i2_s.gguf", "gguf", {"target": "bitnet.cpp"}),
    ("npz -> gguf (llama.cpp, tq2_0)", "npz", "tq2_0.gguf", "gguf", {"target": "llama.cpp"}),
    ("npz -> gguf (llama.cpp, tq1_0)", "npz", "tq1_0.gguf", "gguf", {"target": "llama.cpp", "outtype": "tq1_0"}),
    ("gguf -> hf", "i2_s.gguf", "hf-from-gguf", "hf", {}),
)
NEW_TOKENS = 32
# runtime -> the file it runs (ik_llama.cpp: bitnet.cpp's I2_S, requantized to IQ2_BN by its own tool)
RUNTIME_FILES = {"llama.cpp": "tq2_0.gguf", "ik_llama.cpp": "i2_s.gguf", "bitnet.cpp": "i2_s.gguf"}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two HF folders stored with the same name, dtype, shape and bytes."""
    from bitnet_convert.formats import hf

    def stored(path):
        return [(name, bytes(data)) for name, data in hf.stored_tensor_bytes(path)]

    return stored(a) == stored(b)


def convert_and_verify(title: str, source: Path, out: Path, prefix: str) -> tuple[dict[str, Path], bool]:
    """Every step of STEPS from `source`, each verified against its input; prints one table. (paths, passed)"""
    from bitnet_convert import api

    paths = {"hf": source}
    for step, src, name, fmt, options in STEPS:
        paths[name] = out / f"{prefix}-{name}"
        print(f"converting {title}: {step}", file=sys.stderr)
        api.convert(paths[src], paths[name], dst_format=fmt, force=True, **options)

    print(f"\n{title}")
    header = f"{'step':<32} {'output':<28} {'bytes':>10}  {'weights':<26} {'function (same engine)':<28} verify"
    print(header)
    print("-" * len(header))
    passed = True
    for step, src, name, _, _ in STEPS:
        report = api.verify(paths[name], paths[src])  # each move against its own input
        passed &= report.passed
        weights, function = report.layer("weights"), report.layer("function")
        cast = weights.figures["tensors_cast"]
        exact = f"exact{f', {cast} declared casts' if cast else ''}" if weights.passed else "DIFFER"
        same = f"identical (max|dlogit| {function.figures['max_abs_diff']:g})" if function.passed else "DIFFER"
        print(f"{step:<32} {paths[name].name:<28} {_size(paths[name]):>10,}  {exact:<26} {same:<28} "
              f"{'PASS' if report.passed else 'FAIL'}")
    identical = _same_tensors(paths["hf"], paths["hf-roundtrip"])
    passed &= identical
    print(f"HF -> Flax -> HF reproduced every tensor bit for bit: {'yes' if identical else 'NO'}")
    end_to_end = api.verify(paths["hf-from-gguf"], paths["hf"])
    passed &= end_to_end.passed
    print(f"HF -> Flax -> npz -> GGUF -> HF against the original: {'PASS' if end_to_end.passed else 'FAIL'}")
    return paths, passed


def continuations(paths: dict[str, Path], prompt_ids: list[int]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Greedy continuations of the prompt: JAX's, and each runtime's that runs here; why the others do not."""
    from bitnet_convert import api
    from bitnet_convert.runtime_greedy import RUNTIMES, available, greedy
    from bitnet_core.errors import ConvertError

    runs = {"jax": api.generate(paths["flax"], prompt_ids, max_new_tokens=NEW_TOKENS, greedy=True).ids}
    left_out = {}
    for runtime in RUNTIMES:
        why = available(runtime)
        if why is None:
            print(f"generating in {runtime}", file=sys.stderr)
            try:
                runs[runtime] = greedy(runtime, str(paths[RUNTIME_FILES[runtime]]), prompt_ids, NEW_TOKENS)
            except ConvertError as exc:
                why = str(exc)
        if why is not None:
            left_out[runtime] = why
    return runs, left_out


def main(out_dir: str = "demo-out") -> int:
    import logging
    import warnings

    from bitnet_convert import api
    from bitnet_convert.builtin import MODEL_DIR, corpus, tokenizer
    from bitnet_convert.tiny import tiny_checkpoint

    warnings.filterwarnings("ignore")
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, all_passed = convert_and_verify("the built-in trained BitNet (2B4T layout, SiLU: bitnet_convert/builtin)",
                                           MODEL_DIR, out, "trained")

    tok = tokenizer()
    prompt_ids = tok.encode(corpus.DEMO_PROMPT).ids
    runs, left_out = continuations(paths, prompt_ids)
    print(f"\ngreedy continuations of {corpus.DEMO_PROMPT!r} ({NEW_TOKENS} tokens):")
    for runtime, ids in runs.items():
        text = tok.decode(ids, skip_special_tokens=True)
        print(f"generate ({runtime}):{text if text.startswith(' ') else ' ' + text}")  # the text's own space
    for runtime, why in left_out.items():
        print(f"generate ({runtime}): left out: {why}")
    differ = [name for name, ids in runs.items() if ids != runs["jax"]]
    agree = not differ
    all_passed &= agree
    names = ", ".join(runs)
    print(f"the continuations of {names} are identical, token for token: yes" if agree else
          f"the continuations differ from JAX's in: {', '.join(differ)}")

    tiny = out / "relu2-hf"
    print("\nbuilding the random tiny relu2 BitNet (2B4T's activation)", file=sys.stderr)
    api.write(tiny_checkpoint(seed=0), tiny, format="hf", force=True)
    _, passed = convert_and_verify("a random tiny BitNet with 2B4T's relu2 (its conversions; of the runtimes "
                                   "only ik_llama.cpp computes relu2)", tiny, out, "relu2")
    all_passed &= passed
    parity = api.verify(MODEL_DIR, MODEL_DIR, levels="parity").layer("parity")
    all_passed &= bool(parity.passed)
    print(f"\nparity of the JAX model with transformers (the proof of the model, once, on the trained original):\n"
          f"  {parity.verdict()}: layers agree to {parity.figures['max_layer_rel_diff']:.2g} of their largest value "
          f"(float rounding, limit {parity.figures['layer_rtol']:.2g}), {parity.figures['rounding_ties']} rounding "
          f"ties accounted for;\n  without activation quantization the logits agree to "
          f"{parity.figures['continuous_max_rel_diff']:.2g} (limit {parity.figures['continuous_rtol']:.2g})")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
