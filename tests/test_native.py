"""The native CPU kernels (bitnet_model/native) against exact integer / float64 products.

Shapes are chosen to reach every edge of the kernels: token counts on both sides of the VNNI/AMX crossover and
not multiples of the 4-token (VNNI) or 32-token (AMX) blocks, inputs not multiples of 64 (masked tails) or of 4
(a partial activation group), output rows not multiples of the 32-row AMX panel, and a layer of a stack.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_convert.codecs.rows4 import pack
from bitnet_model import native

CPU_FLAGS = set()
if Path("/proc/cpuinfo").exists():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            CPU_FLAGS = set(line.split(":", 1)[1].split())
            break

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason()}")

SHAPES = [  # tokens, output rows, inputs, layers
    (1, 8, 64, 1), (1, 4, 3, 1), (2, 12, 70, 2), (3, 36, 130, 3), (5, 40, 64, 1), (8, 64, 64, 1),
    (9, 100, 200, 2), (17, 4, 3, 1), (33, 68, 129, 2), (40, 96, 256, 1), (64, 256, 512, 1),
]


@pytest.fixture(params=["vnni", "amx"])
def path(request):
    if request.param == "amx" and native.level() != "avx512-vnni+amx":
        pytest.skip("no AMX on this CPU")
    native.configure(amx=request.param == "amx", amx_min_tokens=1)
    yield request.param
    native.configure(amx=True, amx_min_tokens=8)  # the defaults


def test_kernels_build_where_the_cpu_has_vnni():
    """A CPU with AVX-512 VNNI must get the kernels: a build failure must not pass silently as a fallback."""
    if "avx512_vnni" not in CPU_FLAGS:
        pytest.skip("CPU without AVX-512 VNNI: the engine uses XLA's products")
    assert native.available(), native.reason()
    assert native.level() == ("avx512-vnni+amx" if {"amx_tile", "amx_int8"} <= CPU_FLAGS else "avx512-vnni")


@pytest.mark.parametrize("tokens,out_features,inputs,layers", SHAPES)
def test_ternary_matmul_is_exact(path, tokens, out_features, inputs, layers):
    rng = np.random.default_rng(tokens * 1000 + inputs)
    codes = rng.integers(-1, 2, size=(layers, out_features, inputs)).astype(np.int8)
    stack = np.stack([pack(c) for c in codes])
    x = rng.integers(-128, 128, size=(tokens, inputs)).astype(np.int8)
    x[0, :] = -128  # the int8 extremes: -128 x -1 and -128 x +1 sum without overflow in int32
    product = jax.jit(native.ternary_matmul)
    for layer in range(layers):
        want = x.astype(np.int64) @ codes[layer].astype(np.int64).T
        got = np.asarray(product(x, stack, layer))
        assert got.dtype == np.int32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_ternary_matmul_of_an_unstacked_matrix_and_inside_a_scan():
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, size=(3, 32, 96)).astype(np.int8)
    stack = jnp.asarray(np.stack([pack(c) for c in codes]))
    x = rng.integers(-128, 128, size=(2, 96)).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(native.ternary_matmul(x, stack[1])), x.astype(np.int64) @ codes[1].T)

    def body(carry, layer):  # the engine's use: the whole stack closed over, the layer number scanned
        return carry, native.ternary_matmul(x, stack, layer)

    _, per_layer = jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32)))()
    want = np.einsum("ti,loi->lto", x.astype(np.int64), codes.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(per_layer), want)


@pytest.mark.parametrize("tokens,rows,width", [(1, 7, 16), (2, 9, 37), (5, 130, 64), (1, 1003, 2560)])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_table_matmul_matches_float64(tokens, rows, width, dtype):
    rng = np.random.default_rng(rows)
    h = rng.standard_normal((tokens, width)).astype(np.float32)
    values = rng.standard_normal((rows, width)).astype(np.float32)
    if dtype == "bf16":  # the engine holds a bf16 table as its bits; the product reads them exactly
        values = values.astype(jnp.bfloat16).astype(np.float32)
        table = values.astype(jnp.bfloat16).view(np.uint16)
    else:
        table = values
    want = h.astype(np.float64) @ values.astype(np.float64).T
    got = np.asarray(jax.jit(native.table_matmul)(h, table))
    assert got.shape == (tokens, rows) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(width))


def test_cache_folder_and_library_key(tmp_path, monkeypatch):
    """The library is keyed by source, jaxlib and flags, and lives in the cache folder the user chose."""
    monkeypatch.setenv("BITNET_CONVERT_CACHE", str(tmp_path))
    path = native.library_path()
    assert path.parent == tmp_path / "native" and path.name.startswith("bitnet_kernels-")
    assert native.build() == path and path.stat().st_size > 0
    assert list(path.parent.glob("*.so")) == [path]  # the temporary file was renamed, nothing left behind
