"""Sharded over a 2 x 2 ("data", "model") mesh of 4 CPU devices, the models compute what they compute on one.

XLA fixes the number of host devices when JAX starts, so the check runs in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp
    from bitnet_convert.tiny import tiny_checkpoint
    from bitnet_model import engine, params, sharding

    assert jax.device_count() == 4, jax.devices()
    ckpt = tiny_checkpoint(seed=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2)
    model = params.model_from_checkpoint(ckpt)
    cfg = model.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24)).astype(np.int32)
    mesh = sharding.make_mesh(data=2, model=2)

    # engine: full forward, prefill and decode steps
    opts = engine.Options.for_backend(sharded=True)
    weights = engine.weights_from_checkpoint(ckpt)
    plain = np.asarray(engine.forward(cfg, opts, weights, ids))
    sharded_w = sharding.shard_weights(cfg, weights, mesh)
    gate = sharded_w.packed["gate_proj"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    assert gate.addressable_shards[0].data.shape[1] == gate.shape[1] // 2  # really split
    assert sharded_w.packed["down_proj"].addressable_shards[0].data.shape[2] == cfg.intermediate_size // 2
    split = np.asarray(engine.forward(cfg, opts, sharded_w, sharding.shard_batch(ids, mesh)))
    np.testing.assert_allclose(split, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    np.testing.assert_array_equal(split.argmax(-1), plain.argmax(-1))

    def run(w, shard):
        tokens = np.zeros((2, 16), np.int32); tokens[:, :10] = ids[:, :10]
        tokens = sharding.shard_batch(tokens, mesh) if shard else tokens
        logits, cache = engine.prefill(cfg, opts, w, tokens, np.int32(10), 32)
        if shard:
            cache = sharding.shard_cache(cfg, cache, mesh)
        out = [np.asarray(logits)]
        for t in range(10, 24):
            step = sharding.shard_batch(ids[:, t], mesh) if shard else ids[:, t]
            logits, cache = engine.decode_step(cfg, opts, w, step, cache)
            out.append(np.asarray(logits))
        return np.stack(out, 1)

    a, b = run(weights, False), run(sharded_w, True)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    np.testing.assert_array_equal(b.argmax(-1), a.argmax(-1))

    # reference model: its state placed on the mesh, same logits
    sharding.shard_model(model, mesh)
    q = model.model.layers[0].self_attn.q_proj.packed[...]
    assert q.addressable_shards[0].data.shape[0] == q.shape[0] // 2
    ref = params.logits(params.model_from_checkpoint(ckpt), ids)
    np.testing.assert_allclose(params.logits(model, ids), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    print("SHARDED-OK")
    """
)


@pytest.mark.slow
def test_sharded_logits_equal_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
