"""Codec kernels on 2B4T-sized projections: the reference codecs against bitnet_convert.codecs.fast.

    python benchmarks/bench_codecs.py [--repeat 5]

Times each kernel (best of --repeat) on one projection of every 2B4T shape and reports the total for the whole
model (30 layers of q, k, v, o, gate, up, down: 2.08 G ternary values), which is what a conversion pays.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitnet_convert.codecs import fast, hf2bit, i2s, tq, trits  # noqa: E402

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
    kernels = {
        "HF 2-bit -> int8 codes": (lambda p, c: hf2bit.unpack(p, c.shape[0]),
                                   lambda p, c: fast.hf2bit_unpack(p, c.shape[0])),
        "int8 codes -> I2_S": (lambda p, c: i2s.pack(c, 1.5), lambda p, c: fast.i2s_pack(c, 1.5)),
        "int8 codes -> TQ2_0": (lambda p, c: tq.pack_tq2_0(c), lambda p, c: fast.tq2_0_pack(c)),
        "int8 codes -> base-3 (npz)": (lambda p, c: trits.pack(c), lambda p, c: fast.trits_pack(c)),
        "HF 2-bit -> I2_S (direct)": (lambda p, c: i2s.pack(hf2bit.unpack(p, c.shape[0]), 1.5),
                                      lambda p, c: fast.hf2bit_to_i2s(p, c.shape[0], 1.5)),
        "HF 2-bit -> TQ2_0 (direct)": (lambda p, c: tq.pack_tq2_0(hf2bit.unpack(p, c.shape[0])),
                                       lambda p, c: fast.hf2bit_to_tq2_0(p, c.shape[0])),
    }
    totals = {name: [0.0, 0.0] for name in kernels}
    for shape, per_layer in SHAPES.items():
        codes = rng.choice(np.array([-1, 0, 1], np.int8), size=shape)
        packed = hf2bit.pack(codes)
        for name, (ref, new) in kernels.items():
            assert ref(packed, codes).tobytes() == new(packed, codes).tobytes(), name
            totals[name][0] += best(lambda: ref(packed, codes), args.repeat) * per_layer * LAYERS
            totals[name][1] += best(lambda: new(packed, codes), args.repeat) * per_layer * LAYERS
    print(f"{'kernel, whole 2B4T model':<30} {'reference s':>12} {'fast s':>8} {'speed-up':>9}")
    for name, (ref_s, new_s) in totals.items():
        print(f"{name:<30} {ref_s:12.2f} {new_s:8.2f} {ref_s / new_s:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
