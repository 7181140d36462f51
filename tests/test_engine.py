"""The packed decode engine against the reference model (bitnet_model.modeling), and 2-bit packing.

Tolerances as in test_model_decode.py: the engine computes the reference's arithmetic, but XLA fuses the two
programs differently, so activations agree to a few ulps; one that lands on a rounding tie quantizes one step
apart and moves that row's later logits by up to ~1% of max|logit|. So: most positions within 1e-4 of
max|logit|, all within 2e-2, every argmax equal.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.config import ModelConfig
from bitnet_model import engine, native, packed, params

SMALL = {"hidden_size": 64, "intermediate_size": 128}
OPTIONS = {
    "whole": engine.Options(),
    # several blocks per matrix, per output table and per prompt (40 tokens: query blocks of 16, 16, 8)
    "blocked": engine.Options(block_bytes=512, head_block_bytes=8192, query_block=16),
    "reduce": engine.Options(reduce_rows=64, query_block=0),  # the GPU formulation (decode, one query block)
    "native": engine.Options(native=True),  # the CPU kernels (tests/test_native.py tests them alone)
}
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason()}")
OPTION_PARAMS = [pytest.param(name, marks=needs_native) if OPTIONS[name].native else name for name in OPTIONS]


def assert_close(got, want):
    scale = np.abs(want).max()
    diff = np.abs(got - want).max(-1) / scale
    assert np.mean(diff <= 1e-4) >= 0.5, diff
    assert diff.max() <= 2e-2
    # The same next token, except where the reference itself nearly ties: a float-order difference that
    # flips one int8 rounding moves these random tiny models' logits by up to ~5e-3 of their scale.
    top2 = np.sort(want, axis=-1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 1e-3 * scale
    np.testing.assert_array_equal(got.argmax(-1)[decided], want.argmax(-1)[decided])
    assert decided.mean() > 0.9


def test_pack_unpack_and_product_are_exact():
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (48, 40)).astype(np.int8)
    p = packed.pack(codes)
    assert p.shape == (12, 40) and p.dtype == np.uint8
    assert (p[0, 0] >> 2) & 3 == codes[1, 0] + 1  # row 4r + k sits in bits 2k..2k+1 of packed row r
    np.testing.assert_array_equal(np.asarray(packed.unpack(jnp.asarray(p))), codes)
    x = rng.integers(-128, 128, (3, 40)).astype(np.int8)
    exact = x.astype(np.int64) @ codes.T.astype(np.int64)
    for block_bytes in (0, 160, 480):  # one block; 1 packed row per block; 3 rows per block
        got = packed.packed_matmul(jnp.asarray(x), jnp.asarray(p), block_bytes=block_bytes)
        np.testing.assert_array_equal(np.asarray(got), exact)
    one = packed.packed_matmul(jnp.asarray(x[:1]), jnp.asarray(p), block_bytes=160)  # padded to two rows
    np.testing.assert_array_equal(np.asarray(one), exact[:1])


@pytest.fixture(scope="module", params=[{}, {"architecture": "LlamaForCausalLM", "hidden_act": "silu",
                                             "tie_word_embeddings": False}], ids=["bitnet", "llama-untied"])
def ckpt(request):
    return tiny_checkpoint(seed=3, num_key_value_heads=2, **SMALL, **request.param)


@pytest.mark.parametrize("option", OPTION_PARAMS)
@pytest.mark.slow
def test_prefill_and_decode_match_the_reference(ckpt, option):
    model = params.model_from_checkpoint(ckpt)
    cfg, opts = model.config, OPTIONS[option]
    weights = engine.weights_from_checkpoint(ckpt)
    assert weights.embed.dtype == jnp.uint16 and weights.packed["q_proj"].dtype == jnp.uint8  # bf16 bits
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40)).astype(np.int32)
    full = params.logits(model, ids)  # [2, 40, V]
    assert_close(np.asarray(engine.forward(cfg, opts, weights, ids)), full)

    prompt = 13  # padded to 16: the tail must be ignored
    padded = np.zeros((2, 16), np.int32)
    padded[:, :prompt] = ids[:, :prompt]
    logits, cache = engine.prefill(cfg, opts, weights, padded, np.int32(prompt), 48)
    assert int(cache.length) == prompt and cache.max_length == 48
    steps = [np.asarray(logits)]
    for t in range(prompt, ids.shape[1]):
        logits, cache = engine.decode_step(cfg, opts, weights, ids[:, t], cache)
        steps.append(np.asarray(logits))
    assert int(cache.length) == ids.shape[1]
    assert_close(np.stack(steps, axis=1), full[:, prompt - 1 :])


@needs_native
def test_prefill_finishes_only_the_last_token_in_the_last_layer(ckpt):
    """With the native kernels prefill runs the last layer's o_proj and FFN for the last real token only: its
    logits are forward's at that position bit for bit, and its cache holds every layer's keys and values as the
    full layers make them."""
    model = params.model_from_checkpoint(ckpt)
    cfg, opts = model.config, OPTIONS["native"]
    weights = engine.weights_from_checkpoint(ckpt)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 24)).astype(np.int32)
    for prompt in (24, 17, 1):  # the whole row, a padded tail, one token
        logits, cache = engine.prefill(cfg, opts, weights, ids, np.int32(prompt), 32)
        full = np.asarray(engine.forward(cfg, opts, weights, ids[:, :prompt]))
        np.testing.assert_array_equal(np.asarray(logits), full[:, -1])
        want_k, want_v = every_layers_keys(cfg, opts, weights, ids[:, :prompt])
        np.testing.assert_array_equal(np.asarray(cache.keys)[:, :, :prompt], want_k)
        np.testing.assert_array_equal(np.asarray(cache.values)[:, :, :prompt], want_v)


def every_layers_keys(cfg, opts, weights, ids):
    """The rotated keys and values of every layer for ids [B, T], from the layers without the shortcut (the
    rope tables made inside the program, as prefill makes them)."""

    def run(ids):
        cos, sin = engine.rope_tables(jnp.arange(ids.shape[1], dtype=jnp.int32), cfg.head_dim, cfg.rope_theta)
        return engine._layers(cfg, opts, weights, engine._embed(weights, ids), cos, sin, jnp.int32(0), None)[1:]

    keys, values = jax.jit(run)(ids)
    return np.asarray(keys), np.asarray(values)


def test_weights_from_model_equal_weights_from_checkpoint(ckpt):
    a = engine.weights_from_checkpoint(ckpt)
    model = params.model_from_checkpoint(ckpt)
    b = engine.weights_from_model(model)
    for name in engine.PROJECTIONS:
        np.testing.assert_array_equal(np.asarray(a.packed[name]), np.asarray(b.packed[name]))
        # one layout: the engine stacks the reference model's own packed leaves, and they are its codes packed
        suffix = engine.PROJECTIONS[name]
        leaf = model.model.layers[1].mlp if suffix.startswith("mlp") else model.model.layers[1].self_attn
        leaf = getattr(leaf, name).packed[...]
        np.testing.assert_array_equal(np.asarray(b.packed[name][1]), np.asarray(leaf))
        codes = ckpt.load(f"model.layers.1.{suffix}.weight").codes
        np.testing.assert_array_equal(np.asarray(leaf), packed.pack(codes))
        np.testing.assert_array_equal(np.asarray(a.multipliers[name]), np.asarray(b.multipliers[name]))
    assert a.norms.keys() == b.norms.keys()
    np.testing.assert_array_equal(np.asarray(a.embed), np.asarray(b.embed))
    assert a.embed.dtype == b.embed.dtype


@pytest.mark.slow
def test_synthetic_weights_have_valid_codes():
    cfg = params.model_from_checkpoint(tiny_checkpoint(seed=0, **SMALL)).config
    w = engine.synthetic_weights(cfg, seed=1)
    codes = np.asarray(packed.unpack(w.packed["gate_proj"][0]))
    assert set(np.unique(codes)) == {-1, 0, 1}
    assert w.packed["down_proj"].shape == (cfg.num_hidden_layers, cfg.hidden_size // 4, cfg.intermediate_size)
    logits = engine.forward(cfg, engine.Options(), w, np.zeros((1, 4), np.int32))
    assert np.isfinite(np.asarray(logits)).all()


def test_without_native_kernels_the_cpu_options_are_xlas_own():
    """BITNET_NATIVE=0 (or no compiler, or no VNNI) leaves the engine on XLA's products, and says why."""
    code = ("from bitnet_model import engine, native; "
            "assert not native.available() and native.reason() == 'disabled by BITNET_NATIVE=0'; "
            "assert engine.Options.for_backend('cpu') == engine.Options.xla_cpu()")
    env = {**os.environ, "BITNET_NATIVE": "0", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_quantize_rows_is_absmax_round_half_even():
    """scale = max|row| / 127, code = round-half-even(value / scale): the largest value maps to +-127, every
    value moves by at most scale / 2, halves go to the even code, a zero row stays zero."""
    rows = np.array([[0.0, 1.0, -2.0, 127.0 * 0.5 / 127],
                     [0.0, 0.0, 0.0, 0.0],
                     [2.5, -2.5, 1.5, 127.0]], np.float32)
    codes, scale = engine.quantize_rows(rows)
    assert codes.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_array_equal(scale, np.float32([2.0 / 127, 0.0, 1.0]))
    np.testing.assert_array_equal(codes[1], 0)
    np.testing.assert_array_equal(codes[2], [2, -2, 2, 127])  # 2.5 -> 2, -2.5 -> -2, 1.5 -> 2: ties to even
    assert codes[0, 2] == -127
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 300)) * rng.uniform(0.001, 10, (64, 1))).astype(np.float32)
    codes, scale = engine.quantize_rows(x)
    assert np.abs(codes).max(axis=1).tolist() == [127] * 64
    assert np.all(np.abs(codes * scale[:, None] - x) <= scale[:, None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("option", ["native", "xla"])
@pytest.mark.slow
def test_the_int8_head_is_the_model_with_its_table_rounded_once(ckpt, option):
    """weights_from_checkpoint(head="int8") = the engine on the model whose embedding (tied head) is the
    dequantized int8 rows: logits equal to float32 rounding of the output sums (the same function), and the
    int8 table is all the engine holds of it (no second copy)."""
    from bitnet_model.native import available

    if option == "native" and not available():
        pytest.skip("native kernels unavailable")
    cfg = ModelConfig.from_hf(ckpt.config)
    opts = engine.Options(native=True) if option == "native" else engine.Options.xla_cpu()
    exact = engine.weights_from_checkpoint(ckpt)
    int8 = engine.weights_from_checkpoint(ckpt, head="int8")
    assert int8.embed.dtype == jnp.int8 and int8.embed_scale.shape == (cfg.vocab_size,)
    # tied: the same int8 rows serve the lookup and the output projection; untied: both tables are int8
    assert (int8.lm_head is None) == cfg.tie_word_embeddings
    assert int8.nbytes() < exact.nbytes()

    def dequantized(table, int8_table, int8_scale):
        codes, scale = engine.quantize_rows(engine._as_float32(np.asarray(table)))
        np.testing.assert_array_equal(np.asarray(int8_table), codes)
        np.testing.assert_array_equal(np.asarray(int8_scale), scale)
        return jnp.asarray(codes.astype(np.float32) * scale[:, None])

    rounded = dataclasses.replace(
        exact, embed=dequantized(exact.embed, int8.embed, int8.embed_scale),
        lm_head=None if exact.lm_head is None else dequantized(exact.lm_head, int8.lm_head, int8.lm_head_scale))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    got = np.asarray(engine.forward(cfg, opts, int8, ids))
    want = np.asarray(engine.forward(cfg, opts, rounded, ids))
    # the same values either way; the sums of h . row run as (h . codes) * scale against h . (codes * scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert not np.array_equal(got, np.asarray(engine.forward(cfg, opts, exact, ids)))  # it is lossy
