"""The engine's native CPU kernels against XLA's own products, on one layer of 2B4T shapes, in one process.

    python benchmarks/bench_native.py [--tokens 1,2,4,8,16,32,128,512] [--repeat 5]

For each token count, one decoder layer's BitLinear work as the engine groups it (q/k/v from one input,
o, gate/up from one input, down) is timed three ways: XLA (the engine's CPU path without the kernels:
quantize, block-wise unpack + int8 dot, dequantize), the native VNNI loop and native AMX tiles (both:
quantize, product and dequantize inside one kernel call). Then the tied 128256 x 2560 bf16 output projection
for one token, XLA's block-wise widening against the native kernel, and one layer's prefill attention with its
rope at 128 and 512 tokens. Best of --repeat rounds after a warm-up;
ratios are XLA time / native time. The fastest native path per token count is what sets the VNNI/AMX
crossover (`AMX_MIN_TOKENS` in bitnet_model/native); weights are random packed bytes (the speed does not depend on
the values).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_model import engine, native

HIDDEN, FFN, KV, VOCAB = 2560, 6912, 640, 128256
GROUPS = {  # input width -> projections (out features) fed by one input, as in engine._layers
    "q/k/v": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate/up": (HIDDEN, (FFN, FFN)),
    "down": (FFN, (HIDDEN,)),
}


def best(fn, args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def layer_programs(weights):
    names = {group: [f"{group}:{i}" for i in range(len(outs))] for group, (_, outs) in GROUPS.items()}

    def run(opts):
        def program(inputs):
            outs = []
            for group in GROUPS:
                p = {n: weights[n][0] for n in names[group]}
                m = {n: weights[n][1] for n in names[group]}
                if not opts.native:
                    p = {n: v[0] for n, v in p.items()}
                    m = {n: v[0] for n, v in m.items()}
                outs += engine._bitlinear(inputs[group], names[group], p, m, opts, jnp.int32(0))
            return outs
        return jax.jit(program)

    return run(engine.Options.xla_cpu()), run(engine.Options(native=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,2,4,8,16,32,128,512")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not native.available():
        print(f"native kernels unavailable: {native.reason()}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    valid = np.asarray([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3)
                        for d in range(3)], np.uint8)
    weights = {}
    for group, (width, outs) in GROUPS.items():
        for i, out in enumerate(outs):
            packed = valid[rng.integers(0, 81, (1, out // 4, width))]
            weights[f"{group}:{i}"] = (jnp.asarray(packed), jnp.asarray([1.5], jnp.float32))
    xla, ours = layer_programs(weights)
    print(f"CPU kernels: {native.level()}; one 2B4T layer's products (ms, best of {args.repeat})")
    print(f"{'tokens':>6} {'XLA':>9} {'VNNI':>9} {'AMX':>9} {'XLA/best':>9}  faster")
    for tokens in (int(t) for t in args.tokens.split(",")):
        inputs = {group: jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
                  for group, (width, _) in GROUPS.items()}
        xla_s = best(xla, (inputs,), args.repeat)
        native.configure(amx=False)
        vnni_s = best(ours, (inputs,), args.repeat)
        amx_s = math.inf
        if native.level() == "avx512-vnni+amx":
            native.configure(amx=True, amx_min_tokens=1)
            amx_s = best(ours, (inputs,), args.repeat)
        native.configure()  # back to the defaults
        fastest = min(vnni_s, amx_s)
        which = "AMX" if fastest == amx_s else "VNNI"
        print(f"{tokens:>6} {xla_s * 1e3:9.2f} {vnni_s * 1e3:9.2f} {amx_s * 1e3:9.2f} {xla_s / fastest:8.1f}x  {which}")
    table = jnp.asarray(rng.integers(0, 1 << 15, (VOCAB, HIDDEN), dtype=np.uint16))  # bf16 bits
    h = jnp.asarray(rng.standard_normal((1, HIDDEN)), jnp.float32)
    xla_head = jax.jit(lambda h, t: engine._logits(engine.Options.xla_cpu(), engine.Weights(t, None, None, {}, {}, {}), h))
    ours_head = jax.jit(native.table_matmul)
    xla_s, ours_s = best(xla_head, (h, table), args.repeat), best(ours_head, (h, table), args.repeat)
    print(f"output projection, 1 token: XLA {xla_s * 1e3:.1f} ms, native {ours_s * 1e3:.1f} ms "
          f"({xla_s / ours_s:.1f}x)")
    for tokens in (128, 512):
        xla_s, ours_s = attention_times(rng, tokens, args.repeat)
        print(f"prefill attention + rope, one layer, {tokens} tokens: XLA {xla_s * 1e3:.1f} ms, "
              f"native {ours_s * 1e3:.1f} ms ({xla_s / ours_s:.1f}x)")
    return 0


def attention_times(rng, tokens: int, repeat: int) -> tuple[float, float]:
    """One 2B4T layer's prefill attention (20 query heads, 5 kv heads of 128) with its rope, as the engine's
    XLA path (apply_rope + engine._attention, blocks of 128 queries) and as the native kernel."""
    from bitnet_model.modeling import apply_rope, rope_tables

    heads, kv_heads, size = 20, 5, 128
    q = jnp.asarray(rng.standard_normal((1, tokens, heads, size)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, tokens, kv_heads, size)), jnp.float32) for _ in range(2))
    cos, sin = rope_tables(jnp.arange(tokens), size, 500000.0)

    def xla(q, k, v, cos, sin):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return engine._attention(q, k, v, None, None, 0, size, engine.Options().query_block), k

    args = (q, k, v, cos, sin)
    return best(jax.jit(xla), args, repeat), best(jax.jit(native.causal_attention), args, repeat)


if __name__ == "__main__":
    sys.exit(main())
