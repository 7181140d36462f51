"""`make demo`: a tiny deterministic BitNet in the 2B4T layout, moved through every format and verified.

    python -m bitnet_convert.demo OUT_DIR

Builds the model offline (bitnet_convert.tiny), writes it as a Hugging Face checkpoint, converts
HF -> Flax -> HF, Flax -> npz -> GGUF (bitnet.cpp I2_S and llama.cpp TQ2_0), runs `verify` on every step
against transformers, and checks that the HF round trip reproduced every tensor bit for bit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (step, source key, output name, output format, writer options)
STEPS = (
    ("hf -> flax", "hf", "tiny-flax", "flax", {}),
    ("flax -> hf", "tiny-flax", "tiny-hf-roundtrip", "hf", {}),
    ("flax -> npz", "tiny-flax", "tiny.npz", "npz", {}),
    ("npz -> gguf (bitnet.cpp, i2_s)", "tiny.npz", "tiny-i2_s.gguf", "gguf", {"target": "bitnet.cpp"}),
    ("npz -> gguf (llama.cpp, tq2_0)", "tiny.npz", "tiny-tq2_0.gguf", "gguf", {"target": "llama.cpp"}),
    ("gguf -> hf", "tiny-i2_s.gguf", "tiny-hf-from-gguf", "hf", {}),
)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main(out_dir: str = "demo-out") -> int:
    import logging
    import warnings

    from . import registry
    from .tiny import tiny_checkpoint
    from .verify import run_verify

    warnings.filterwarnings("ignore")
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"hf": out / "tiny-hf"}
    print(f"building the tiny BitNet (2B4T layout) in {paths['hf']}", file=sys.stderr)
    registry.write_checkpoint(tiny_checkpoint(seed=0), str(paths["hf"]), "hf", force=True)
    for step, source, name, fmt, options in STEPS:
        paths[name] = out / name
        print(f"converting {step}", file=sys.stderr)
        registry.convert(str(paths[source]), str(paths[name]), None, fmt, force=True, quiet=True, **options)

    header = f"{'step':<32} {'output':<22} {'bytes':>10} {'max|dlogit|':>12} {'tolerance':>10} {'top-1':>7} {'mean KL':>9}  verify"
    print(header)
    print("-" * len(header))
    all_passed = True
    for step, _, name, _, _ in STEPS:
        result = run_verify(str(paths[name]), str(paths["hf"]))
        all_passed &= result.passed
        print(f"{step:<32} {name:<22} {_size(paths[name]):>10,} {result.max_abs_diff:>12.3g} "
              f"{result.tolerance:>10.3g} {result.top1_agreement:>7.3f} {result.mean_kl:>9.2g}  "
              f"{'PASS' if result.passed else 'FAIL'}")
    identical = _same_tensors(paths["hf"], paths["tiny-hf-roundtrip"])
    all_passed &= identical
    print(f"\nHF -> Flax -> HF reproduced every tensor bit for bit: {'yes' if identical else 'NO'}")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
