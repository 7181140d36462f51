"""The engine's native CPU kernels against XLA's own products, on one layer of 2B4T shapes, in one process.

    python benchmarks/bench_native.py [--tokens 1,2,4,8,16,32,128,512] [--repeat 5]

For each token count, one decoder layer's BitLinear work as the engine groups it (q/k/v from one input,
o, gate/up from one input, down) is timed at every kernel level this CPU runs: XLA (the engine's CPU path
without the kernels: quantize, block-wise unpack + int8 dot, dequantize), the native AVX2 loop, the AVX-512
VNNI loop, VNNI + table lookups and AMX tiles (each: quantize, product and dequantize inside one kernel call).
For one token the rate at which each reads the layer's packed weights is shown too (decode is bound by memory
bandwidth). Then the tied 128256 x 2560 bf16 output projection for one token, XLA's block-wise widening against
each native level, greedy decoding's head (the full product's argmax against the greedy screen, medians of
interleaved rounds), and one layer's prefill attention with its rope at 128 and 512 tokens. Best of --repeat
rounds after a warm-up; ratios are XLA time / native time. The fastest native path per token count is what sets
the crossovers from the VNNI loop to AMX and to table lookups (`AMX_MIN_TOKENS`, `LUT_MIN_TOKENS` in
bitnet_model/native); weights are random packed bytes (the speed does not depend on the values).
`BITNET_NATIVE=avx2` limits the run to the AVX2 kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_model import engine, native
from bitnet_model.bitlinear import fused_bitlinear

HIDDEN, FFN, KV, VOCAB = 2560, 6912, 640, 128256
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 20, 5, 128, 30
GROUPS = {  # input width -> projections (out features) fed by one input, as in engine._layers
    "q/k/v": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate/up": (HIDDEN, (FFN, FFN)),
    "down": (FFN, (HIDDEN,)),
}
NAMES = {"avx2": "AVX2", "avx512-vnni": "VNNI", "avx512-vnni+lut": "VNNI+LUT", "avx512-vnni+amx": "AMX"}


def best(fn, args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def product_paths() -> list[str]:
    """The BitLinear paths measured here: each level, and VNNI + table lookups beside the VNNI loop."""
    levels = native.levels()
    return [p for level in levels for p in ([level, "avx512-vnni+lut"] if level == "avx512-vnni" else [level])]


def at_each_level(fn, args, repeat: int, paths: list[str] | None = None) -> dict[str, float]:
    """Best time of fn(*args) at every native level this process may choose, or at each of `paths`: AMX and
    the table lookups from the first token on, the VNNI loop with neither."""
    times = {}
    for path in paths or native.levels():
        level, lookups = path.removesuffix("+lut"), path.endswith("+lut")
        native.configure(level=level, amx_min_tokens=1, lut_min_tokens=1 if lookups else native.NEVER)
        times[path] = best(fn, args, repeat)
    native.configure()  # back to the defaults
    return times


def random_layer(rng, layers: int = 1) -> dict[str, tuple[jax.Array, jax.Array]]:
    """`layers` layers' packed projections (stacks [layers, out/4, in]) and multipliers, by 'group:index'."""
    valid = np.asarray([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3)
                        for d in range(3)], np.uint8)  # bytes of four codes in {0, 1, 2}
    weights = {}
    for group, (width, outs) in GROUPS.items():
        for i, out in enumerate(outs):
            packed = valid[rng.integers(0, 81, (layers, out // 4, width), dtype=np.uint8)]
            weights[f"{group}:{i}"] = (jnp.asarray(packed), jnp.full((layers,), 1.5, jnp.float32))
    return weights


def layer_program(weights, opts: engine.Options):
    """One layer's products as the engine runs them with `opts`: inputs by group -> outputs."""
    names = {group: [f"{group}:{i}" for i in range(len(outs))] for group, (_, outs) in GROUPS.items()}

    def program(inputs):
        outs = []
        for group, group_names in names.items():
            stacks = {n: weights[n] for n in group_names}
            if opts.native:  # the kernel reads its layer out of the stack
                p, m = {n: s[0] for n, s in stacks.items()}, {n: s[1] for n, s in stacks.items()}
            else:  # XLA takes the layer's slices
                p, m = {n: s[0][0] for n, s in stacks.items()}, {n: s[1][0] for n, s in stacks.items()}
            outs += fused_bitlinear(inputs[group], group_names, p, m, native_kernel=opts.native,
                                    layer=jnp.int32(0), block_bytes=opts.block_bytes, reduce_rows=opts.reduce_rows)
        return outs

    return jax.jit(program)


def decode_program(weights):
    """One token through every layer's products, natively (as a decode step reads them: from DRAM)."""
    names = {group: [f"{group}:{i}" for i in range(len(outs))] for group, (_, outs) in GROUPS.items()}
    layers = next(iter(weights.values()))[0].shape[0]

    def program(inputs):
        def body(total, layer):
            for group, group_names in names.items():
                stacks = [weights[n] for n in group_names]
                total += sum(jnp.sum(out) for out in native.bitlinear(inputs[group], layer, stacks))
            return total, None

        return jax.lax.scan(body, jnp.float32(0), jnp.arange(layers, dtype=jnp.int32))[0]

    return jax.jit(program)


def bench_decode(rng, repeat: int) -> None:
    """The rate at which one decode step's products read all 30 layers' packed weights, at each level."""
    weights = random_layer(rng, LAYERS)
    inputs = {group: jnp.asarray(rng.standard_normal((1, width)), jnp.float32) for group, (width, _) in GROUPS.items()}
    times = at_each_level(decode_program(weights), (inputs,), repeat)
    size = layer_bytes(weights)
    rates = ", ".join(f"{NAMES[level]} {t * 1e3:.1f} ms ({size / t / 1e9:.1f} GB/s)" for level, t in times.items())
    print(f"decode products, 1 token through {LAYERS} layers ({size / 1e9:.2f} GB packed): {rates}")


def layer_bytes(weights) -> int:
    return sum(int(packed.size) for packed, _ in weights.values())


def bench_layers(rng, token_counts, repeat: int) -> None:
    weights = random_layer(rng)
    xla, ours = layer_program(weights, engine.Options.xla_cpu()), layer_program(weights, engine.Options(native=True))
    levels = product_paths()
    print(f"one 2B4T layer's products ({layer_bytes(weights) / 1e6:.1f} MB packed), ms, best of {repeat}")
    print(f"{'tokens':>6} {'XLA':>9}" + "".join(f" {NAMES[level]:>9}" for level in levels)
          + "".join(f" {'XLA/' + NAMES[level]:>9}" for level in levels))
    for tokens in token_counts:
        inputs = {group: jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
                  for group, (width, _) in GROUPS.items()}
        xla_s = best(xla, (inputs,), repeat)
        times = at_each_level(ours, (inputs,), repeat, levels)
        print(f"{tokens:>6} {xla_s * 1e3:9.2f}" + "".join(f" {times[level] * 1e3:9.2f}" for level in levels)
              + "".join(f" {xla_s / times[level]:8.1f}x" for level in levels))
        if tokens == 1:
            rates = ", ".join(f"{NAMES[level]} {layer_bytes(weights) / times[level] / 1e9:.1f}" for level in levels)
            print(f"{'':>6} packed weights read at GB/s: XLA {layer_bytes(weights) / xla_s / 1e9:.1f}, {rates}")


def bench_head(rng, repeat: int) -> None:
    table = jnp.asarray(rng.integers(0, 1 << 15, (VOCAB, HIDDEN), dtype=np.uint16))  # bf16 bits
    h = jnp.asarray(rng.standard_normal((1, HIDDEN)), jnp.float32)
    weights = engine.Weights(table, None, None, {}, {}, {})
    xla_s = best(jax.jit(lambda h: engine._logits(engine.Options.xla_cpu(), weights, h)), (h,), repeat)
    times = at_each_level(jax.jit(native.table_matmul), (h, table), repeat)
    size = table.size * 2
    rates = ", ".join(f"{NAMES[level]} {times[level] * 1e3:.1f} ms ({size / times[level] / 1e9:.1f} GB/s, "
                      f"{xla_s / times[level]:.1f}x)" for level in times)
    print(f"output projection, 1 token ({size / 1e6:.0f} MB bf16): XLA {xla_s * 1e3:.1f} ms, {rates}")


def bench_greedy_head(rng, repeat: int) -> None:
    """Greedy decoding's head for 1 token: the argmax of the full bf16 product against the greedy screen
    (engine.with_screen), interleaved, on a table whose logits spread as a model's do (rows 0.02 N(0, 1) as
    engine.synthetic_weights makes them, h ~ N(0, 1))."""
    from bitnet_core.aligned import aligned_empty

    bits = aligned_empty((VOCAB, HIDDEN), np.uint16)
    for start in range(0, VOCAB, 8192):
        rows = (0.02 * rng.standard_normal((min(8192, VOCAB - start), HIDDEN))).astype(np.float32)
        bits[start:start + len(rows)] = (rows.view(np.uint32) >> 16).astype(np.uint16)  # bf16, truncated
    weights = engine.with_screen(engine.Weights(jax.device_put(bits), None, None, {}, {}, {}))
    opts = engine.Options(native=True)
    full = jax.jit(lambda w, h: jnp.argmax(engine._logits(opts, w, h), axis=-1).astype(jnp.int32))
    screened = jax.jit(lambda w, h: engine.greedy_tokens(opts, w, h))
    rescored = jax.jit(lambda w, h: native.greedy_head(h, w.embed, w.screen_codes, w.screen_scale, w.screen_bound)[1])
    times, rows = ([], []), []
    for round_ in range(repeat + 1):
        h = jnp.asarray(rng.standard_normal((1, HIDDEN)), jnp.float32)
        tokens = []
        for side in (0, 1) if round_ % 2 else (1, 0):  # interleaved: both see the same background load
            fn = (full, screened)[side]
            start = time.perf_counter()
            tokens.append(int(jax.block_until_ready(fn(weights, h))[0]))
            if round_:  # the first round compiles
                times[side].append(time.perf_counter() - start)
        assert tokens[0] == tokens[1], tokens
        rows.append(int(rescored(weights, h)[0]))
    a, b = (float(np.median(t)) for t in times)
    print(f"greedy head, 1 token, {native.level()}: full bf16 product + argmax {a * 1e3:.1f} ms, screen "
          f"{b * 1e3:.1f} ms ({a / b:.2f}x; medians of {repeat} interleaved rounds), rows re-scored exactly: "
          f"median {int(np.median(rows))} of {VOCAB}")


def bench_attention(rng, tokens: int, repeat: int) -> None:
    """One 2B4T layer's prefill attention (20 query heads, 5 kv heads of 128) with its rope, as the engine's
    XLA path (apply_rope + modeling.attention, blocks of 128 queries) and as the native kernel."""
    from bitnet_model.modeling import apply_rope, attention, rope_tables

    q = jnp.asarray(rng.standard_normal((1, tokens, HEADS, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, tokens, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
    cos, sin = rope_tables(jnp.arange(tokens), HEAD_DIM, 500000.0)

    def xla(q, k, v, cos, sin):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return attention(q, k, v, None, None, 0, HEAD_DIM, engine.Options().query_block), k

    args = (q, k, v, cos, sin)
    xla_s = best(jax.jit(xla), args, repeat)
    times = at_each_level(jax.jit(native.causal_attention), args, repeat)
    times.pop("avx512-vnni+amx", None)  # the same vector kernels as VNNI
    native_times = ", ".join(f"{NAMES[level]} {t * 1e3:.1f} ms ({xla_s / t:.1f}x)" for level, t in times.items())
    print(f"prefill attention + rope, one layer, {tokens} tokens: XLA {xla_s * 1e3:.1f} ms, {native_times}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,2,4,8,16,32,128,512")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not native.available():
        print(f"native kernels unavailable: {native.reason()}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    print(f"CPU kernels: {native.cpu_level()}, measured: {', '.join(native.levels())}")
    bench_layers(rng, [int(t) for t in args.tokens.split(",")], args.repeat)
    bench_decode(rng, args.repeat)
    bench_head(rng, args.repeat)
    bench_greedy_head(rng, max(args.repeat, 9))
    for tokens in (128, 512):
        bench_attention(rng, tokens, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
