"""Codec kernels on 2B4T-sized projections: each direct HF -> X transcoder against unpack-then-pack.

    python benchmarks/bench_codecs.py [--repeat 5]

Times each kernel (best of --repeat) on one projection of every 2B4T shape and reports the total for the whole
model (30 layers of q, k, v, o, gate, up, down: 2.08 G ternary values), which is what a conversion pays. The
"two steps" column makes int8 codes first (hf2bit.unpack), as a writer must for a source that is not HF
packed; "direct" is what the HF -> GGUF / npz conversions run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitnet_convert.formats.gguf import tq as tq  # noqa: E402
from bitnet_core.codecs import hf2bit, i2s, trits

# (out, in) -> projections of that shape per layer in 2B4T
SHAPES = {(2560, 2560): 2, (640, 2560): 2, (6912, 2560): 2, (2560, 6912): 1}
LAYERS = 30


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    unpack = hf2bit.unpack
    kernels = {  # name -> (two steps, direct); None: a single kernel
        "HF 2-bit -> int8 codes": (None, lambda p, c: unpack(p, c.shape[0])),
        "int8 codes -> I2_S": (None, lambda p, c: i2s.pack(c, 1.5)),
        "int8 codes -> TQ2_0": (None, lambda p, c: tq.pack_tq2_0(c)),
        "int8 codes -> base-3 (npz)": (None, lambda p, c: trits.pack(c)),
        "HF 2-bit -> I2_S": (lambda p, c: i2s.pack(unpack(p, c.shape[0]), 1.5),
                             lambda p, c: i2s.from_hf2bit(p, c.shape[0], 1.5)),
        "HF 2-bit -> TQ2_0": (lambda p, c: tq.pack_tq2_0(unpack(p, c.shape[0])),
                              lambda p, c: tq.tq2_0_from_hf2bit(p, c.shape[0])),
        "HF 2-bit -> base-3": (lambda p, c: trits.pack(unpack(p, c.shape[0])),
                               lambda p, c: trits.from_hf2bit(p, c.shape[0])),
    }
    totals = {name: [0.0, 0.0] for name in kernels}
    for shape, per_layer in SHAPES.items():
        codes = rng.choice(np.array([-1, 0, 1], np.int8), size=shape)
        packed = hf2bit.pack(codes)
        for name, (two, direct) in kernels.items():
            if two is not None:
                assert two(packed, codes).tobytes() == direct(packed, codes).tobytes(), name
                totals[name][0] += best(lambda: two(packed, codes), args.repeat) * per_layer * LAYERS
            totals[name][1] += best(lambda: direct(packed, codes), args.repeat) * per_layer * LAYERS
    print(f"{'kernel, whole 2B4T model':<30} {'two steps s':>12} {'direct s':>9} {'speed-up':>9}")
    for name, (two_s, direct_s) in totals.items():
        if two_s:
            print(f"{name:<30} {two_s:12.2f} {direct_s:9.2f} {two_s / direct_s:8.1f}x")
        else:
            print(f"{name:<30} {'':12} {direct_s:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
