"""Native CPU kernels of the generation engine (kernels.cc), called through XLA's FFI.

XLA's CPU backend has no kernel for what generation needs most: it multiplies int8 by int8 at ~25-60 GMAC/s
without VNNI, must unpack 2-bit weights to int8 in memory first, and widens a bf16 output table to float32
before a dot. kernels.cc reads the packed bytes and the 16-bit table directly: with AVX2 (VPMADDUBSW) on any
x86-64 CPU since Haswell / Zen, with AVX-512 VNNI for a few tokens and AMX tiles for many where the CPU has
them. Every level is the engine's own arithmetic: `bitlinear` is BitLinear bit for bit (the same float32
quantizer, an exact int32 product, the same dequantization), `table_matmul` a float32 sum in another order
than XLA's.

The library is compiled on first use with the system C++ compiler (`$CXX`, default g++) against the FFI
headers jaxlib ships, into a cache folder keyed by the source and jaxlib version (`$BITNET_CONVERT_CACHE`,
else `$XDG_CACHE_HOME/bitnet-convert`, else `~/.cache/bitnet-convert`); `python -m bitnet_model.native`
builds it ahead of time (`make install` does). One library holds every level; the best the CPU has is taken
when it loads (`level()`). `BITNET_NATIVE` chooses: `0` turns the kernels off, a level name (`avx2`,
`avx512-vnni`, `avx512-vnni+amx`) uses at most that one (the AVX2 kernels run on an AVX-512 machine too),
`1` or unset the best. Where the library cannot be built or the CPU lacks AVX2 and FMA, or with
`BITNET_NATIVE=0`, `available()` is false and the engine keeps XLA's own products; `reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from bitnet_core import cache
from bitnet_model.tables import MappedTable

SOURCE = Path(__file__).with_name("kernels.cc")
# What SOURCE includes: the kernels written once for every vector width (compiled once per instruction set)
INCLUDES = (Path(__file__).with_name("vector_kernels.inc"),)
BITLINEAR_TARGET = "bitnet_bitlinear"
TABLE_TARGET = "bitnet_table_matmul"
TABLE_ROWS_TARGET = "bitnet_table_rows"
GREEDY_TARGET = "bitnet_greedy_head"
ATTENTION_TARGET = "bitnet_causal_attention"
CACHED_ATTENTION_TARGET = "bitnet_cached_attention"
# -ffp-contract=off: BitLinear's dequantization and residual add must round as XLA's separate products and
# sums do; with FMA in the target, GCC may otherwise fuse a product and a sum into one rounding.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]
# From this many tokens AMX tiles beat the VNNI loop (benchmarks/bench_native.py on 2B4T shapes; BENCHMARKS.md's
# kernel notes); set in the library when it loads.
AMX_MIN_TOKENS = 8
# From this many tokens, where AMX does not take a product, VNNI + table lookups beat the VNNI loop (measured the
# same way); set in the library when it loads.
LUT_MIN_TOKENS = 32
NEVER = 1 << 40  # a token count no call reaches: configure()'s way to turn AMX or the table lookups off
LEVELS = {0: "none", 1: "avx2", 2: "avx512-vnni", 3: "avx512-vnni+amx"}  # Level in kernels.cc
BEST = "1"  # BITNET_NATIVE's default: the best level of this CPU

_reason = ""
_cpu_level = 0  # the best this CPU runs
_default_level = 0  # what the loader chose: the CPU's best, at most BITNET_NATIVE's
_active_level = 0  # what runs now (configure() changes it)


def cache_dir() -> Path:
    return cache.cache_dir("native")


def library_path() -> Path:
    """Where the library for this source, jaxlib and compiler lives (built or not)."""
    return cache.library_path("native", "bitnet_kernels", [SOURCE, *INCLUDES], FLAGS, key=jaxlib.__version__)


def build(force: bool = False) -> Path:
    """Compile kernels.cc (unless built already); a temporary file renamed into place, so concurrent builds
    (test workers) never load a half-written library. Raises RuntimeError with the compiler's message."""
    return cache.build_library(library_path(), SOURCE, [*FLAGS, "-I", jax.ffi.include_dir()], force=force)


def _requested_level() -> int | None:
    """The highest level BITNET_NATIVE allows (0: off); None for a value it does not know."""
    setting = os.environ.get("BITNET_NATIVE", BEST)
    if setting == BEST:
        return max(LEVELS)
    names = {name: number for number, name in LEVELS.items()}
    return 0 if setting == "0" else names.get(setting)


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _reason, _cpu_level, _default_level, _active_level
    requested = _requested_level()
    if requested is None:
        choices = ", ".join(name for number, name in LEVELS.items() if number > 0)
        _reason = f"BITNET_NATIVE={os.environ['BITNET_NATIVE']!r} is not 0, 1 or a level ({choices})"
        return None
    if requested == 0:
        _reason = "disabled by BITNET_NATIVE=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"no kernels for {platform.machine()}"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        lib.bitnet_native_level.restype = ctypes.c_int
        lib.bitnet_native_configure.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long]
        lib.bitnet_native_configure.restype = ctypes.c_int
        handlers = {target: getattr(lib, target) for target in (BITLINEAR_TARGET, TABLE_TARGET, TABLE_ROWS_TARGET,
                                                             GREEDY_TARGET, ATTENTION_TARGET, CACHED_ATTENTION_TARGET)}
    except (OSError, RuntimeError, AttributeError) as exc:  # AttributeError: a symbol missing from the library
        _reason = str(exc)
        return None
    _cpu_level = lib.bitnet_native_level()
    if _cpu_level == 0:
        _reason = "this CPU lacks AVX2 and FMA"
        return None
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _default_level = min(_cpu_level, requested)
    _active_level = lib.bitnet_native_configure(_default_level, AMX_MIN_TOKENS, LUT_MIN_TOKENS)
    return lib


def available() -> bool:
    """True where the kernels are built, loaded and registered for JAX's CPU backend."""
    return _library() is not None


def reason() -> str:
    """Why `available()` is false ("" when it is true)."""
    _library()
    return _reason


def level() -> str:
    """The kernels in use: "none", "avx2", "avx512-vnni" or "avx512-vnni+amx" (LEVELS)."""
    return LEVELS[_active_level] if _library() is not None else "none"


def cpu_level() -> str:
    """The best kernels this CPU runs, whatever BITNET_NATIVE says ("none" where the library did not load)."""
    _library()
    return LEVELS[_cpu_level]


def levels() -> list[str]:
    """The levels `configure` may choose here, lowest first: the CPU's, up to the one BITNET_NATIVE allows."""
    _library()
    return [LEVELS[number] for number in range(1, _default_level + 1)]


def configure(*, level: str | None = None, amx_min_tokens: int = AMX_MIN_TOKENS,
              lut_min_tokens: int = LUT_MIN_TOKENS) -> None:
    """Tests and benchmarks: run the kernels of `level` (one of `levels()`; "avx512-vnni" turns AMX off) and
    move the token counts from which AMX, or else VNNI + table lookups, take a product; `configure()` restores
    the loader's choice. Takes effect at the next call of a kernel, compiled programs included."""
    global _active_level
    lib = _library()
    if lib is None:
        return
    if level is not None and level not in levels():
        raise ValueError(f"kernel level {level!r} is not available here (choose from {', '.join(levels())})")
    number = _default_level if level is None else {name: n for n, name in LEVELS.items()}[level]
    _active_level = lib.bitnet_native_configure(number, int(amx_min_tokens), int(lut_min_tokens))


def _require() -> None:
    if _library() is None:  # loads and registers the handlers on first use
        raise RuntimeError(f"native kernels unavailable: {_reason}")


ACTIVATIONS = {None: 0, "relu2": 1, "silu": 2}  # the act attribute of bitnet_bitlinear


def bitlinear(x: jax.Array, layer: jax.Array | int, projections, *, norm: jax.Array | None = None,
              eps: float = 0.0, act: str | None = None, up: jax.Array | None = None,
              residual: jax.Array | None = None) -> list[jax.Array]:
    """BitLinear of float32 x [N, K] through each (packed uint8 [L, R, K], multipliers float32 [L]) of
    `projections` at layer `layer` -> float32 [N, 4R] each: quantize x per token to int8, exact product with
    the ternary codes, `acc / s * multiplier` (bitlinear.py's arithmetic, bit for bit). A packed [R, K] with a
    scalar multiplier is a stack of one.

    The input can be prepared on the way in, as the engine's layers do it: `act` ("relu2" or "silu") with
    `up` [N, K] takes act(x) * up, then `norm` [K] takes the RMSNorm x / sqrt(mean(x^2) + eps) * norm (the
    mean summed in another order than XLA's: equal to float rounding). With one projection, `residual` [N, 4R]
    is added to its output (residual + y, as XLA adds them: bit for bit)."""
    _require()
    if (act is None) != (up is None):
        raise ValueError("act and up go together")
    empty = jnp.zeros((0,), jnp.float32)
    operands, shapes = [], []
    for packed, multipliers in projections:
        if packed.ndim == 2:
            packed, multipliers = packed[None], jnp.reshape(multipliers, (1,))
        operands += [packed, jnp.asarray(multipliers, jnp.float32)]
        shapes.append(jax.ShapeDtypeStruct((x.shape[0], packed.shape[1] * 4), jnp.float32))
    call = jax.ffi.ffi_call(BITLINEAR_TARGET, shapes)
    up = empty if up is None else up.astype(jnp.float32)
    norm = empty if norm is None else norm.astype(jnp.float32)
    if residual is not None and len(projections) != 1:
        raise ValueError("a residual goes with one projection")
    residual = empty if residual is None else residual.astype(jnp.float32)
    return list(call(x.astype(jnp.float32), up, norm, residual, jnp.asarray(layer, jnp.int32), *operands,
                     eps=np.float32(eps), act=np.int32(ACTIVATIONS[act])))


def _table(table) -> tuple[jax.Array, dict]:
    """A table operand and the attributes that say where it is: an array [V, H] as it is, or a MappedTable
    (tables.py: bytes of the file mapping, the table `offset` into them)."""
    if isinstance(table, MappedTable):
        return table.data, table.attributes()
    return table, {"offset": np.int64(0), "kind": np.int32(0), "rows": np.int64(table.shape[0])}


def table_matmul(h: jax.Array, table) -> jax.Array:
    """float32 h [N, H] x table [V, H] (uint16 bf16 bits, float32 or int8; or a MappedTable) -> float32 [N, V]."""
    _require()
    operand, where = _table(table)
    call = jax.ffi.ffi_call(TABLE_TARGET, jax.ShapeDtypeStruct((h.shape[0], table.shape[0]), jnp.float32))
    return call(h.astype(jnp.float32), operand, **where)


def table_rows(ids: jax.Array, table) -> jax.Array:
    """The embedding lookup: int ids [...] -> float32 rows [..., H] of a bf16-bits or float32 table [V, H] (an array
    or a MappedTable), exactly; an id outside [0, V) is clamped into it (never read past the table)."""
    _require()
    operand, where = _table(table)
    call = jax.ffi.ffi_call(TABLE_ROWS_TARGET, jax.ShapeDtypeStruct((*ids.shape, table.shape[1]), jnp.float32))
    return call(ids.astype(jnp.int32), operand, **where)


def greedy_head(h: jax.Array, table, codes: jax.Array, scales: jax.Array, bounds: jax.Array):
    """The argmax over v of h [N, H] . table [V, H] (uint16 bf16 bits or float32; or a MappedTable) -> (int32 tokens
    [N], int32 rows re-scored per token [N]): the token jnp.argmax(table_matmul(h, table)) picks, the first of equal
    maxima, from the int8 screen (codes [V, H], scales [V], bounds [V]: engine.screen_rows) and exact scores of the
    few rows whose error bound still lets them win (kernels.cc, greedy_rows)."""
    _require()
    N = h.shape[0]
    operand, where = _table(table)
    call = jax.ffi.ffi_call(GREEDY_TARGET, (jax.ShapeDtypeStruct((N,), jnp.int32), jax.ShapeDtypeStruct((N,), jnp.int32)))
    return call(h.astype(jnp.float32), operand, codes, scales, bounds, **where)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array):
    """Prefill attention: float32 q [B, T, Hq, D], k and v [B, T, KV, D], rope tables cos, sin [T, D] ->
    (out [B, T, Hq * D], rotated k [B, T, KV, D]). q and k are rotated as modeling.apply_rope does it, then
    query t of head h attends to keys 0..t of kv head h // (Hq / KV): softmax(q . k / sqrt(D)) . v, summed in
    another order than XLA's (equal to float rounding)."""
    _require()
    B, T, Hq, D = q.shape
    call = jax.ffi.ffi_call(ATTENTION_TARGET, (jax.ShapeDtypeStruct((B, T, Hq * D), jnp.float32),
                                               jax.ShapeDtypeStruct(k.shape, jnp.float32)))
    out, rotated = call(*(a.astype(jnp.float32) for a in (q, k, v, cos, sin)))
    return out, rotated


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array,
                     cache_v: jax.Array, layer: jax.Array | int, start: jax.Array | int):
    """Decode attention: float32 q [B, T, Hq, D], new k and v [B, T, KV, D] at positions start.. (cos, sin
    [T, D]), the stacked float32 caches [L, B, S, KV, D] of which layer `layer` holds `start` positions ->
    (out [B, T, Hq * D], rotated k [B, T, KV, D]). As modeling.attention with a cache: query t attends to the
    cached slots before `start` and to the new keys 0..t; the cache is read in place (summed in another order
    than XLA's: equal to float rounding)."""
    _require()
    B, T, Hq, D = q.shape
    call = jax.ffi.ffi_call(CACHED_ATTENTION_TARGET, (jax.ShapeDtypeStruct((B, T, Hq * D), jnp.float32),
                                                      jax.ShapeDtypeStruct(k.shape, jnp.float32)))
    out, rotated = call(*(a.astype(jnp.float32) for a in (q, k, v, cos, sin)), cache_k, cache_v,
                        jnp.asarray(layer, jnp.int32), jnp.asarray(start, jnp.int32))
    return out, rotated
