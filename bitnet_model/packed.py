"""2-bit packed ternary weights and their exact W1.58A8 product: how every BitLinear holds its weights.

Layout ("rows4", bitnet_convert/codecs/rows4.py, which also packs on the host and transcodes HF bytes): a
projection's int8 codes T [out, in] in {-1, 0, +1} are held as uint8 `packed [out/4, in]`, byte (r, i) holding
`T[4r + k, i] + 1` in bits 2k..2k+1. Four consecutive output rows share a byte, so unpacking a block of packed rows gives a contiguous block of output rows (`reshape`, no
interleave or concatenate), and slicing packed rows over devices slices output rows (heads, FFN columns)
contiguously. 2B4T's 2.08 G ternary weights take 0.52 GB this way (int8: 2.08 GB, more than the 2 GiB the
whole `generate` process may use). The reference model (bitlinear.py), the Flax format and the engine all hold
this one layout.

The product (`packed_matmul`) is exact: int8 activations x unpacked int8 codes, int32 accumulation. On the CPU
it unpacks block by block inside `lax.map`, one int8 dot per block of about BLOCK_BYTES (it stays in L2): as fast
as a dot over codes already unpacked, reading 4x fewer bytes, where XLA's fused multiply-reduce is not vectorized
and a whole-matrix unpack writes and reads back the int8 codes (BENCHMARKS.md, design measurements). Other
backends (a GPU fuses the unpack into its operand loads) and sharded runs unpack the whole matrix
(`block_bytes=0`). One row is padded to two: XLA's CPU int8 dot of a single row takes a slow path. On an x86 CPU with
AVX2 or better the BitLinear product reads the packed bytes in native kernels instead (bitnet_model/native).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_core.codecs.rows4 import VALUES_PER_BYTE, pack  # noqa: F401  (pack: numpy, host side)

BLOCK_BYTES = 2 << 20  # unpacked int8 codes per block on the CPU: fits the 2 MB L2 of one core


def default_block_bytes(backend: str | None = None) -> int:
    """Block size for an unsharded product on `backend` (default: JAX's default backend); see above."""
    return BLOCK_BYTES if (backend or jax.default_backend()) == "cpu" else 0



def unpack(packed: jax.Array) -> jax.Array:
    """uint8 [..., R, in] -> int8 codes [..., 4R, in] (row 4r + k from bits 2k..2k+1 of packed row r)."""
    shifts = jnp.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=jnp.uint8)  # [4]
    fields = (packed[..., :, None, :] >> shifts[:, None]) & jnp.uint8(3)  # [..., R, 4, in]
    codes = fields.astype(jnp.int8) - jnp.int8(1)
    return codes.reshape(*packed.shape[:-2], packed.shape[-2] * VALUES_PER_BYTE, packed.shape[-1])


def block_rows(rows: int, row_bytes: int, block_bytes: int) -> int:
    """Rows per block: the largest divisor of `rows` whose block of `row_bytes`-byte rows fits `block_bytes`
    (block_bytes 0: one block, all rows)."""
    if block_bytes <= 0:
        return rows
    limit = max(1, block_bytes // row_bytes)
    return max(d for d in range(1, min(limit, rows) + 1) if rows % d == 0)


def int8_dot(x_q: jax.Array, codes: jax.Array) -> jax.Array:  # int8 [N, in] x int8 [M, in] -> int32 [N, M]
    # Weights as the left operand: XLA's CPU int8 kernel runs codes @ x.T faster than x @ codes.T, most of all
    # for decode's two rows (BENCHMARKS.md, design measurements); the transpose of the small [M, N] result
    # fuses into what follows.
    return jax.lax.dot_general(codes, x_q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32).T


def packed_matmul(x_q: jax.Array, packed: jax.Array, *, block_bytes: int = 0) -> jax.Array:
    """Exact x_q @ T.T: int8 [..., in] x packed uint8 [out/4, in] -> int32 [..., out]."""
    lead, inp = x_q.shape[:-1], x_q.shape[-1]
    rows = x_q.reshape(-1, inp)  # [N, in]
    n = rows.shape[0]
    if n == 1:  # XLA CPU's one-row int8 dot takes a slow path; two rows do not (design measurements)
        rows = jnp.concatenate([rows, rows])
    packed_rows = packed.shape[0]
    out = packed_rows * VALUES_PER_BYTE
    per_block = block_rows(packed_rows, VALUES_PER_BYTE * inp, block_bytes)  # int8 bytes per packed row
    if per_block == packed_rows:
        acc = int8_dot(rows, unpack(packed))  # [N, out]
    else:
        blocks = packed.reshape(packed_rows // per_block, per_block, inp)  # [nb, rb, in]
        acc = jax.lax.map(lambda block: int8_dot(rows, unpack(block)), blocks)  # [nb, N, 4 rb]
        acc = jnp.moveaxis(acc, 0, 1).reshape(rows.shape[0], out)  # block b holds output rows b*4rb ..
    return acc[:n].reshape(*lead, out)
