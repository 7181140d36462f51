"""The native CPU kernels (bitnet_model/native): BitLinear bit for bit against bitlinear.py's arithmetic in XLA,
the output table and prefill attention against float64, at every kernel level this CPU runs (AVX2 on any
machine with it, AVX-512 VNNI and AMX where present).

Shapes are chosen to reach every edge of the kernels: token counts on both sides of the VNNI/AMX and the AVX2
16-token (unpacked panel) crossovers and not multiples of the 2- or 3-token (AVX2), 4-token (VNNI, table
lookups) or 32-token (AMX) blocks, over one 128-token slab of the table lookups, inputs not multiples of 32 or 64
(partial loads), of 4 (a partial activation group) or of the lookups' 288-column chunk, over one chunk and over
the AVX2 int16 block of 2048, output rows not multiples of the 32-row AMX panel or the lookups' 64-row block,
and a layer of a stack.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_core.codecs.rows4 import pack
from bitnet_model import native
from bitnet_model.bitlinear import quantize_activations

CPU_FLAGS = set()
if Path("/proc/cpuinfo").exists():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            CPU_FLAGS = set(line.split(":", 1)[1].split())
            break

needs_kernels = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason()}")

SHAPES = [  # tokens, output rows, inputs, layers
    (1, 8, 64, 1), (1, 4, 3, 1), (2, 12, 70, 2), (3, 36, 130, 3), (5, 40, 64, 1), (8, 64, 64, 1),
    (9, 100, 200, 2), (17, 4, 3, 1), (33, 68, 129, 2), (40, 96, 256, 1), (64, 256, 512, 1), (3, 8, 2100, 1),
    # decode's streaming tasks (kStreamTaskBytes of rows each): several per projection, the last one short
    (1, 1200, 2560, 2), (2, 1208, 2100, 1), (4, 1200, 2561, 1),
    # the table lookups' slabs of at most 128 tokens (kLutSlabTokens): three of 100
    (300, 68, 130, 1),
]


def select(level: str, amx_min_tokens: int = native.AMX_MIN_TOKENS, lut_min_tokens: int = native.LUT_MIN_TOKENS):
    """Run the test at kernel level `level` (skipped where this CPU, or BITNET_NATIVE, does not allow it)."""
    if level not in native.levels():
        pytest.skip(f"{level} kernels not available here (CPU: {native.cpu_level()})")
    native.configure(level=level, amx_min_tokens=amx_min_tokens, lut_min_tokens=lut_min_tokens)


NEVER = native.NEVER


@pytest.fixture(params=[("avx2", NEVER), ("avx512-vnni", NEVER), ("avx512-vnni", 1), ("avx512-vnni+amx", NEVER)],
                ids=["avx2", "vnni", "lut", "amx"])
def path(request):
    """Every BitLinear loop from the first token: AVX2, the VNNI loop (AMX and table lookups off), VNNI + table
    lookups, AMX tiles."""
    level, lut_min_tokens = request.param
    select(level, amx_min_tokens=1, lut_min_tokens=lut_min_tokens)
    yield level
    native.configure()  # the defaults


@pytest.fixture(params=["avx2", "avx512-vnni"], ids=["avx2", "avx512"])
def vector_path(request):
    """The float kernels (output table, attention): one set per vector width."""
    select(request.param)
    yield request.param
    native.configure()


def expected_cpu_level() -> str:
    """The level kernels.cc must find on this CPU, read from /proc/cpuinfo."""
    if not {"avx2", "fma"} <= CPU_FLAGS:
        return "none"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= CPU_FLAGS:
        return "avx2"
    return "avx512-vnni+amx" if {"amx_tile", "amx_int8"} <= CPU_FLAGS else "avx512-vnni"


def test_kernels_build_where_the_cpu_has_avx2():
    """A CPU with AVX2 and FMA must get the kernels at its best level: a build failure must not pass silently
    as a fallback."""
    if expected_cpu_level() == "none":
        pytest.skip("CPU without AVX2 and FMA: the engine uses XLA's products")
    if os.environ.get("BITNET_NATIVE", "1") == "0":
        pytest.skip("kernels turned off by BITNET_NATIVE=0")
    assert native.available(), native.reason()
    assert native.cpu_level() == expected_cpu_level()
    if os.environ.get("BITNET_NATIVE", "1") == "1":
        assert native.level() == expected_cpu_level()
        assert native.levels()[-1] == expected_cpu_level()


def load_with(setting: str) -> dict:
    """What a fresh process loads with BITNET_NATIVE=setting (the library from the same cache folder)."""
    script = (
        "import json; from bitnet_model import native\n"
        "try:\n    native.configure(level='avx512-vnni'); above = 'accepted'\n"
        "except ValueError:\n    above = 'refused'\n"
        "native.configure()\n"
        "print(json.dumps({'available': native.available(), 'level': native.level(), 'levels': native.levels(),"
        " 'reason': native.reason(), 'vnni': above}))"
    )
    env = {**os.environ, "BITNET_NATIVE": setting}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@needs_kernels
def test_bitnet_native_selects_the_level():
    """BITNET_NATIVE=avx2 holds an AVX-512 machine to the AVX2 kernels (configure() refuses more), 0 turns the
    kernels off, an unknown value too, saying why."""
    forced = load_with("avx2")
    assert forced == {"available": True, "level": "avx2", "levels": ["avx2"], "reason": "", "vnni": "refused"}
    off = load_with("0")
    assert off["available"] is False and off["level"] == "none" and off["reason"] == "disabled by BITNET_NATIVE=0"
    unknown = load_with("avx3")
    assert unknown["available"] is False and "BITNET_NATIVE='avx3'" in unknown["reason"]


EVEX_REGISTERS = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")  # only AVX-512 encodes these
YMM_REGISTERS = re.compile(r"%ymm")  # AVX and later


def registers_by_function(pattern) -> dict[str, int]:
    """Disassembled functions of the library (demangled names) -> instructions naming a `pattern` register."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(native.library_path())],
                             capture_output=True, text=True, check=True).stdout
    found, function = {}, None
    for line in listing.splitlines():
        if (name := re.match(r"^[0-9a-f]+ <(.*)>:$", line)) is not None:
            function = name.group(1)
        elif function is not None and pattern.search(line.split("<", 1)[0]):  # the operands, not a call's target
            found[function] = found.get(function, 0) + 1
    return found


@needs_kernels
@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to disassemble the library")
def test_each_instruction_set_stays_in_its_kernels():
    """A CPU without AVX-512 runs the handlers, the static initializers, the threading and the avx2 kernels:
    none of them may use an AVX-512 register; and only the kernels use 256-bit registers at all, so the
    library loads (and says "none") on a CPU without AVX. Nothing inlined or hoisted across the pragmas."""
    evex, ymm = registers_by_function(EVEX_REGISTERS), registers_by_function(YMM_REGISTERS)
    assert any("avx512::" in f for f in evex) and any("avx2::" in f for f in ymm)  # the check sees them
    assert [f for f in evex if "avx512::" not in f] == []
    assert [f for f in ymm if "avx512::" not in f and "avx2::" not in f] == []


def reference(x, codes, multiplier):
    """bitlinear.py's arithmetic in XLA: the float32 quantizer, an exact product, acc / s * multiplier."""
    x_q, scale = quantize_activations(jnp.asarray(x))
    acc = np.asarray(x_q).astype(np.int64) @ codes.astype(np.int64).T
    dequantize = jax.jit(lambda a, s, m: a.astype(jnp.float32) / s * m)
    return np.asarray(dequantize(acc.astype(np.int32), scale, jnp.float32(multiplier)))


def activations(rng, tokens, inputs):
    x = (rng.standard_normal((tokens, inputs)) * rng.uniform(0.1, 10, (tokens, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero token: max|x| is floored at 1e-5
    if tokens > 1 and inputs >= 6:  # max 127 -> s = 1: x * s lands on halves, rounded to even (0, 2, 2, -2)
        x[1, :6] = [127.0, 0.5, 1.5, 2.5, -1.5, -127.0]
    return x


@needs_kernels
@pytest.mark.parametrize("tokens,out_features,inputs,layers", SHAPES)
def test_bitlinear_is_bitlinear_bit_for_bit(path, tokens, out_features, inputs, layers):
    rng = np.random.default_rng(tokens * 1000 + inputs)
    codes = rng.integers(-1, 2, size=(layers, out_features, inputs)).astype(np.int8)
    stack = np.stack([pack(c) for c in codes])
    multipliers = rng.uniform(0.5, 2.0, layers).astype(np.float32)
    x = activations(rng, tokens, inputs)
    product = jax.jit(lambda x, layer: native.bitlinear(x, layer, [(stack, multipliers)])[0])
    for layer in range(layers):
        got = np.asarray(product(x, layer))
        assert got.dtype == np.float32 and got.shape == (tokens, out_features)
        np.testing.assert_array_equal(got, reference(x, codes[layer], multipliers[layer]))


@needs_kernels
def test_one_call_through_several_projections_and_inside_a_scan(path):
    """q/k/v in one call (one quantization, different widths), the layer number scanned as the engine does."""
    rng = np.random.default_rng(1)
    widths = {"q": 64, "k": 16, "v": 16}
    codes = {n: rng.integers(-1, 2, size=(3, w, 96)).astype(np.int8) for n, w in widths.items()}
    stacks = [(jnp.asarray(np.stack([pack(c) for c in codes[n]])), jnp.asarray([1.5, 0.75, 2.0], jnp.float32))
              for n in widths]
    x = activations(rng, 40, 96)

    def body(carry, layer):
        return carry, native.bitlinear(x, layer, stacks)

    _, per_layer = jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32)))()
    for (name, c), (_, multipliers), got in zip(codes.items(), stacks, per_layer):
        for layer in range(3):
            want = reference(x, c[layer], multipliers[layer])
            np.testing.assert_array_equal(np.asarray(got[layer]), want, err_msg=f"{name} layer {layer}")
    single = native.bitlinear(x[:2], 0, [(stacks[0][0][1], stacks[0][1][1])])[0]  # an unstacked [R, K]
    np.testing.assert_array_equal(np.asarray(single), reference(x[:2], codes["q"][1], 0.75))



@needs_kernels
@pytest.mark.parametrize("act", [None, "relu2", "silu"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("tokens,inputs", [(1, 70), (3, 64), (40, 130)])
def test_bitlinear_prepares_its_input_as_the_engine_does(path, act, norm, tokens, inputs):
    """act(x) * up, then RMSNorm, then BitLinear: the engine's layer steps (computed here in float64) within
    float rounding: the scale moves by an ulp, and at most a few activations round to the neighbouring int8
    (one step: acc +-1)."""
    rng = np.random.default_rng(tokens + inputs)
    codes = rng.integers(-1, 2, size=(1, 48, inputs)).astype(np.int8)
    stack, multipliers = np.stack([pack(c) for c in codes]), np.array([1.25], np.float32)
    x, up = activations(rng, tokens, inputs), rng.standard_normal((tokens, inputs)).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, inputs).astype(np.float32)
    prepared = x.astype(np.float64)
    if act == "relu2":
        prepared = np.maximum(prepared, 0) ** 2 * up
    elif act == "silu":
        prepared = prepared / (1 + np.exp(-prepared)) * up
    if norm:
        prepared = prepared / np.sqrt(np.mean(prepared**2, -1, keepdims=True) + 1e-5) * weight
    prepared = prepared.astype(np.float32)
    got = np.asarray(jax.jit(lambda x, up: native.bitlinear(
        x, 0, [(stack, multipliers)], norm=weight if norm else None, eps=1e-5, act=act, up=up if act else None,
    )[0])(x, up))
    want = reference(prepared, codes[0], multipliers[0])
    step = multipliers[0] * np.abs(prepared).max(-1, keepdims=True) / 127  # one int8 step of each token
    assert np.all(np.abs(got - want) <= 3 * step + 1e-6)
    assert np.mean(np.isclose(got, want, rtol=1e-5, atol=1e-6)) > 0.9  # most outputs: no int8 moved



@needs_kernels
def test_bitlinear_adds_the_residual_bit_for_bit(path):
    """residual + BitLinear(x), rounded as XLA rounds the engine's `x + y`."""
    rng = np.random.default_rng(5)
    codes = rng.integers(-1, 2, size=(2, 40, 96)).astype(np.int8)
    stack, multipliers = np.stack([pack(c) for c in codes]), np.array([0.5, 1.75], np.float32)
    x = activations(rng, 37, 96)
    residual = rng.standard_normal((37, 40)).astype(np.float32) * 10
    got = np.asarray(jax.jit(lambda x, r: native.bitlinear(x, 1, [(stack, multipliers)], residual=r)[0])(x, residual))
    want = jax.jit(lambda r, y: r + y)(residual, reference(x, codes[1], multipliers[1]))
    np.testing.assert_array_equal(got, np.asarray(want))
    with pytest.raises(ValueError, match="one projection"):
        native.bitlinear(x, 1, [(stack, multipliers)] * 2, residual=residual)


@needs_kernels
def test_bitlinear_sums_at_their_largest(path):
    """Rows of all +1, all -1 and alternating codes against tokens of all +127, all -127 and alternating
    activations, over 4133 inputs: the largest sums any loop carries (the AVX2 loop's int16 partial sums,
    64 x 508 at most per 2048 inputs, included), exact."""
    inputs = 4133
    signs = np.where(np.arange(inputs) % 2 == 0, 1, -1)
    codes = np.stack([np.ones(inputs), -np.ones(inputs), signs, -signs] * 2).astype(np.int8)[None]  # [1, 8, K]
    x = np.stack([np.ones(inputs), -np.ones(inputs), signs, np.zeros(inputs)]).astype(np.float32)
    stack, multipliers = pack(codes[0])[None], np.array([1.0], np.float32)
    product = jax.jit(lambda x: native.bitlinear(x, 0, [(stack, multipliers)])[0])
    for tokens in (np.tile(x, (5, 1))[:17], x, x[:2], x[:1], x[1:2]):  # each loop of each level
        want = reference(tokens, codes[0], 1.0)
        assert np.abs(want).max() == 127 * inputs / np.float32(127.0)  # the sums are at their extremes
        np.testing.assert_array_equal(np.asarray(product(tokens)), want)


@needs_kernels
def test_bitlinear_refuses_act_without_up():
    with pytest.raises(ValueError, match="act and up"):
        native.bitlinear(np.ones((1, 8), np.float32), 0, [(np.zeros((1, 2, 8), np.uint8), np.ones(1, np.float32))],
                         act="relu2")


@needs_kernels
@pytest.mark.parametrize("tokens,rows,width", [(1, 7, 16), (2, 9, 37), (3, 5, 45), (5, 130, 64), (1, 1003, 2560)])
@pytest.mark.parametrize("dtype", ["bf16", "f32", "int8"])
def test_table_matmul_matches_float64(vector_path, tokens, rows, width, dtype):
    rng = np.random.default_rng(rows)
    h = rng.standard_normal((tokens, width)).astype(np.float32)
    values = rng.standard_normal((rows, width)).astype(np.float32)
    if dtype == "bf16":  # the engine holds a bf16 table as its bits; the product reads them exactly
        values = values.astype(jnp.bfloat16).astype(np.float32)
        table = values.astype(jnp.bfloat16).view(np.uint16)
    elif dtype == "int8":  # the int8 head's codes (their scales multiply the result outside the kernel)
        table = rng.integers(-127, 128, (rows, width)).astype(np.int8)
        values = table.astype(np.float32)
    else:
        table = values
    want = h.astype(np.float64) @ values.astype(np.float64).T
    got = np.asarray(jax.jit(native.table_matmul)(h, table))
    assert got.shape == (tokens, rows) and got.dtype == np.float32
    # float32 sums of `width` products in another order: ~sqrt(width) roundings of the terms' size (|h| ~ 1,
    # table values of rms ~1, or ~73 for the int8 codes)
    rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(width) * rms)



def bf16_table(values):
    """float rows -> (uint16 bf16 bits, their float32 values)."""
    bits = np.asarray(values, np.float32).astype(jnp.bfloat16).view(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def greedy_both(h, table):
    """(the screened greedy tokens, rows re-scored, the argmax of the full product) of h against table."""
    from bitnet_model.engine import _as_float32, screen_rows

    codes, scales, bounds = screen_rows(_as_float32(table))
    tokens, rescored = jax.jit(native.greedy_head)(h, table, codes, scales, bounds)
    full = jnp.argmax(jax.jit(native.table_matmul)(h, table), axis=-1)
    return np.asarray(tokens), np.asarray(rescored), np.asarray(full)


def test_screen_bounds_hold_every_rows_rounding():
    """engine.screen_rows' bound is at least each row's largest |value - scale * code| (computed exactly in
    float64), for rows from subnormal-range to huge magnitudes, and infinite where the scale is too small for
    the relative bound."""
    from bitnet_model.engine import screen_rows

    rng = np.random.default_rng(9)
    magnitudes = 10.0 ** rng.uniform(-40, 37, 400)
    rows = (rng.standard_normal((400, 300)) * magnitudes[:, None]).astype(np.float32)
    rows[5] = 0.0
    rows[6, :] = (rng.integers(-126, 126, 300) + 0.5) * 0.5  # scale 0.5: every quotient a tie, off by s / 2
    rows[6, 0] = 63.5
    codes, scales, bounds = screen_rows(rows)
    gap = np.abs(rows.astype(np.float64) - scales.astype(np.float64)[:, None] * codes).max(axis=1)
    assert (bounds >= gap).all() and bounds[5] == 0.0 and scales[6] == 0.5 and gap[6] == 0.25
    normal = scales >= 2.0 ** -100
    assert np.isinf(bounds[~normal & (scales > 0)]).all() and normal.sum() > 300
    assert (bounds[normal] <= scales[normal] * 0.5001).all()  # and not loose


@needs_kernels
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_greedy_head_is_the_argmax_and_screens(vector_path, dtype):
    """The screen picks argmax(table_matmul) exactly, re-scoring a small share of the rows (random tables
    whose logits spread like a model's: rows ~0.02 N(0, 1), h ~ N(0, 1))."""
    rng = np.random.default_rng(5)
    for tokens, rows, width in [(1, 4000, 256), (3, 2500, 130), (2, 300, 37), (1, 9, 3)]:
        values = rng.standard_normal((rows, width)).astype(np.float32) * 0.02
        table = bf16_table(values)[0] if dtype == "bf16" else values
        for _ in range(4):
            h = rng.standard_normal((tokens, width)).astype(np.float32)
            got, rescored, full = greedy_both(h, table)
            np.testing.assert_array_equal(got, full)
            assert (rescored >= 1).all() and (rescored <= rows).all()
            if rows >= 2500:
                assert rescored.max() < rows // 10, rescored  # it screens: few rows read exactly


@needs_kernels
def test_greedy_head_breaks_ties_and_near_ties_as_argmax(vector_path):
    """Equal best logits give the first index; a best row duplicated with one bf16 step changed anywhere wins
    or loses by that step alone, far inside the screen's error bound; every row nearly the same (all of them
    candidates)."""
    rng = np.random.default_rng(6)
    rows, width = 600, 96
    h = rng.standard_normal((1, width)).astype(np.float32)
    base = rng.standard_normal((rows, width)).astype(np.float32) * 0.02
    table = bf16_table(base)[0]
    best = int(greedy_both(h, table)[2][0])
    tied = table.copy()
    tied[[3, 400]] = tied[best]  # ties before and after the winner
    got, _, full = greedy_both(h, tied)
    assert got[0] == full[0] == min(3, best)
    for column in rng.integers(0, width, 12):
        for step in (1, -1):  # one bf16 ulp up or down in one value of a copy of the best row placed first
            near = table.copy()
            near[0] = table[best]
            near[0, column] = np.uint16(int(near[0, column]) + step)
            got, _, full = greedy_both(h, near)
            assert got[0] == full[0]
    same = np.repeat(table[best][None], rows, axis=0)
    same[np.arange(rows), rng.integers(0, width, rows)] += np.uint16(1)  # each row one step off somewhere
    got, rescored, full = greedy_both(h, same)
    assert got[0] == full[0] and rescored[0] == rows


@needs_kernels
def test_greedy_head_nan_inf_and_zero_as_argmax(vector_path):
    """argmax takes the first NaN; an inf row, an all-zero h (every logit 0: the first row) and a NaN in h
    (every row re-scored) give argmax's token too."""
    rng = np.random.default_rng(8)
    rows, width = 200, 40
    values = rng.standard_normal((rows, width)).astype(np.float32)
    h = rng.standard_normal((2, width)).astype(np.float32)
    h[1] = 0.0
    for row, value in [(50, np.nan), (70, np.inf), (90, -np.inf)]:
        table = values.copy()
        table[row, 3] = value
        table[120, 5] = np.nan
        got, _, full = greedy_both(h, table)
        np.testing.assert_array_equal(got, full)
    h[0, 7] = np.nan
    got, rescored, full = greedy_both(h, values)
    np.testing.assert_array_equal(got, full)
    assert rescored[0] == rows


def attention_float64(q, k, v):
    """Causal softmax(q . k / sqrt(D)) . v per query head, kv head h // G, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = np.zeros((B, T, Hq, D))
    for h in range(Hq):
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // G]) / np.sqrt(D)
        scores = np.where(np.tri(T, dtype=bool), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[:, :, h // G]
    return out.reshape(B, T, Hq * D)


def rope_float64(x, cos, sin):
    half = x.shape[-1] // 2
    x = np.asarray(x, np.float64)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


ATTENTION_SHAPES = [  # batch, tokens, query heads, kv heads, head size
    (1, 1, 1, 1, 2), (1, 5, 4, 2, 16), (2, 40, 4, 2, 16), (1, 33, 3, 1, 20), (2, 17, 8, 8, 8),
    (1, 70, 6, 3, 130), (1, 100, 20, 5, 128),
]


@needs_kernels
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,size", ATTENTION_SHAPES)
def test_causal_attention_matches_float64_and_xla(vector_path, batch, tokens, heads, kv_heads, size):
    """Rope, then attention. Partial 16-query and 16-key blocks, head sizes off the 16-float vector and over
    the 128-float tile, odd and single heads per kv head: equal to float64 within float32 rounding, as XLA's
    attention is; the rotated keys too."""
    from bitnet_model.modeling import apply_rope, attention, rope_tables

    rng = np.random.default_rng(tokens * 100 + size)
    q = (rng.standard_normal((batch, tokens, heads, size)) * 2).astype(np.float32)
    k = (rng.standard_normal((batch, tokens, kv_heads, size)) * 2).astype(np.float32)
    v = rng.standard_normal((batch, tokens, kv_heads, size)).astype(np.float32)
    cos, sin = (np.asarray(t) for t in rope_tables(jnp.arange(tokens), size, 10000.0))
    out, rotated = (np.asarray(a) for a in jax.jit(native.causal_attention)(q, k, v, cos, sin))
    assert out.shape == (batch, tokens, heads * size) and out.dtype == np.float32
    want_k = rope_float64(k, cos, sin)
    np.testing.assert_allclose(rotated, want_k, rtol=1e-6, atol=1e-6)
    exact = attention_float64(rope_float64(q, cos, sin), want_k, v)
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=2e-5)

    def xla(q, k, v):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return attention(q, k, v, None, None, 0, size, 16)

    np.testing.assert_allclose(out, np.asarray(jax.jit(xla)(q, k, v)), rtol=1e-5, atol=2e-5)


@needs_kernels
def test_causal_attention_never_reads_later_keys(vector_path):
    """Changing the last token's key and value leaves every earlier query's output bit for bit the same."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 50, 4, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 50, 2, 32)).astype(np.float32) for _ in range(2))
    cos, sin = np.ones((50, 32), np.float32), np.zeros((50, 32), np.float32)  # no rotation
    first, same_k = (np.asarray(a) for a in native.causal_attention(q, k, v, cos, sin))
    np.testing.assert_array_equal(same_k, k)
    k[:, -1], v[:, -1] = 1e3, -1e3
    second = np.asarray(native.causal_attention(q, k, v, cos, sin)[0])
    np.testing.assert_array_equal(first[:, :-1], second[:, :-1])
    assert not np.allclose(first[:, -1], second[:, -1])


CACHED_SHAPES = [  # batch, new tokens, cached positions, cache slots, query heads, kv heads, head size, layers
    (1, 1, 0, 4, 1, 1, 2, 1), (1, 1, 7, 16, 4, 2, 16, 2), (2, 3, 33, 40, 6, 2, 20, 3), (1, 1, 127, 130, 20, 5, 128, 2),
    (2, 2, 5, 9, 3, 3, 130, 1), (1, 4, 60, 64, 5, 1, 8, 2),
]


@needs_kernels
@pytest.mark.parametrize("batch,tokens,start,slots,heads,kv_heads,size,layers", CACHED_SHAPES)
def test_cached_attention_matches_float64_and_xla(vector_path, batch, tokens, start, slots, heads, kv_heads, size,
                                                  layers):
    """Decode attention over one layer of stacked caches: the new tokens attend to the `start` cached slots and
    causally among themselves; slots from `start` on hold garbage that must not count. An empty cache, odd
    heads per kv head (a pair and a single), head sizes off the 8-float vector; equal to float64 within float32
    rounding, as XLA's cached attention is; the new keys come back rotated."""
    from bitnet_model.modeling import apply_rope, attention, rope_tables

    rng = np.random.default_rng(start * 10 + size)
    q = (rng.standard_normal((batch, tokens, heads, size)) * 2).astype(np.float32)
    k = (rng.standard_normal((batch, tokens, kv_heads, size)) * 2).astype(np.float32)
    v = rng.standard_normal((batch, tokens, kv_heads, size)).astype(np.float32)
    cache_k = (rng.standard_normal((layers, batch, slots, kv_heads, size)) * 2).astype(np.float32)
    cache_v = rng.standard_normal((layers, batch, slots, kv_heads, size)).astype(np.float32)
    cache_k[:, :, start:], cache_v[:, :, start:] = 1e4, -1e4  # unfilled slots: never attended
    cos, sin = (np.asarray(t) for t in rope_tables(jnp.arange(start, start + tokens), size, 10000.0))
    layer = layers - 1
    out, rotated = (np.asarray(a) for a in jax.jit(native.cached_attention)(q, k, v, cos, sin, cache_k, cache_v,
                                                                               layer, start))
    assert out.shape == (batch, tokens, heads * size) and out.dtype == np.float32
    want_k = rope_float64(k, cos, sin)
    np.testing.assert_allclose(rotated, want_k, rtol=1e-6, atol=1e-6)

    G = heads // kv_heads
    qr = rope_float64(q, cos, sin)
    keys = np.concatenate([cache_k[layer, :, :start], want_k], axis=1)  # [B, start + T, KV, D]
    values = np.concatenate([cache_v[layer, :, :start], v], axis=1).astype(np.float64)
    exact = np.zeros((batch, tokens, heads, size))
    visible = np.arange(start + tokens)[None, :] <= start + np.arange(tokens)[:, None]  # [T, start + T]
    for h in range(heads):
        scores = np.einsum("btd,bsd->bts", qr[:, :, h], keys[:, :, h // G]) / np.sqrt(size)
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        exact[:, :, h] = (probs / probs.sum(-1, keepdims=True)) @ values[:, :, h // G]
    np.testing.assert_allclose(out, exact.reshape(out.shape), rtol=1e-5, atol=2e-5)

    def xla(q, k, v):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return attention(q, k, v, cache_k[layer], cache_v[layer], start, size, 0)

    np.testing.assert_allclose(out, np.asarray(jax.jit(xla)(q, k, v)), rtol=1e-5, atol=2e-5)


@needs_kernels
def test_cached_attention_refuses_a_layer_or_start_out_of_range():
    q = np.zeros((1, 1, 2, 4), np.float32)
    k = v = np.zeros((1, 1, 1, 4), np.float32)
    cos, sin = np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32)
    cache = np.zeros((2, 1, 8, 1, 4), np.float32)
    for layer, start in [(2, 0), (-1, 0), (0, 9)]:
        with pytest.raises(Exception, match="layer or start out of range"):
            np.asarray(native.cached_attention(q, k, v, cos, sin, cache, cache, layer, start)[0])


@pytest.mark.slow
def test_cache_folder_and_library_key(tmp_path, monkeypatch):
    """The library is keyed by source, jaxlib and flags, and lives in the cache folder the user chose."""
    monkeypatch.setenv("BITNET_CONVERT_CACHE", str(tmp_path))
    path = native.library_path()
    assert path.parent == tmp_path / "native" and path.name.startswith("bitnet_kernels-")
    assert native.build() == path and path.stat().st_size > 0
    assert list(path.parent.glob("*.so")) == [path]  # the temporary file was renamed, nothing left behind


def test_library_key_covers_the_included_kernels(tmp_path, monkeypatch):
    """kernels.cc includes vector_kernels.inc: a change there must build a new library, not load the old one."""
    before = native.library_path()
    changed = tmp_path / "vector_kernels.inc"
    changed.write_bytes(native.INCLUDES[0].read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(native, "INCLUDES", (changed,))
    assert native.library_path() != before
