"""Training-mode BitLinear: STE gradients reach the masters, adam lowers the loss, export is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Ternary
from bitnet_core.config import ModelConfig
from bitnet_model import bitlinear, packed, params, training

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(seed=5, **SMALL)


def toy_sequence(vocab: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, size=(2, 24)), jnp.int32)


@pytest.mark.slow
def test_ternary_checkpoint_loads_as_masters_with_the_same_function(ckpt):
    """Masters built from ternary codes ternarize back to the same codes and multiplier."""
    trained = params.model_from_checkpoint(ckpt, mode="training")
    frozen = params.model_from_checkpoint(ckpt)
    master = trained.model.layers[0].self_attn.q_proj.weight[...]
    codes, multiplier = bitlinear.ternarize(master)
    original = ckpt.load("model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_array_equal(np.asarray(codes), original.codes)
    np.testing.assert_allclose(float(multiplier), original.multiplier, rtol=1e-6)
    ids = toy_sequence(ckpt.config["vocab_size"])
    np.testing.assert_allclose(trained(ids), frozen(ids), rtol=0, atol=1e-4 * float(jnp.abs(frozen(ids)).max()))


@pytest.mark.slow
def test_gradients_reach_every_master_weight(ckpt):
    model = params.model_from_checkpoint(ckpt, mode="training")
    grads = nnx.grad(training.next_token_loss)(model, toy_sequence(ckpt.config["vocab_size"]))
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    projections = [k for k in flat if k.endswith("_proj.weight")]
    assert len(projections) == 7 * ckpt.config["num_hidden_layers"]
    for key, grad in flat.items():
        assert np.isfinite(grad).all(), key
        assert np.abs(grad).max() > 0, f"no gradient reaches {key}"


def test_ste_gradient_is_the_dequantized_linear_gradient():
    """d/dx and d/dW of the quantized layer are those of x_dq @ W_q.T (straight through both quantizers)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 16)) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
    gx, gw = jax.grad(lambda x, w: jnp.sum(bitlinear.ternary_linear_ste(x, w) * g), argnums=(0, 1))(x, w)
    x_q, s = bitlinear.quantize_activations(x)
    codes, m = bitlinear.ternarize(w)
    x_dq, w_q = x_q / s, codes * m
    np.testing.assert_allclose(gx, jnp.einsum("bto,oi->bti", g, w_q), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, jnp.einsum("bto,bti->oi", g, x_dq), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_adam_lowers_the_loss_and_export_matches_training_forward(ckpt):
    model = params.model_from_checkpoint(ckpt, mode="training")
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    ids = toy_sequence(ckpt.config["vocab_size"])
    losses = [float(training.train_step_jit(model, optimizer, ids)) for _ in range(8)]
    final = float(training.next_token_loss(model, ids))
    assert final < losses[0] - 0.5, losses + [final]

    exported = training.export_inference(model)
    assert exported.mode == "inference"
    proj = exported.model.layers[1].mlp.up_proj
    assert proj.packed[...].dtype == jnp.uint8 and proj.multiplier[...].shape == ()
    assert proj.packed[...].shape == (proj.out_features // 4, proj.in_features)  # 2-bit: 4 rows per byte
    codes, multiplier = bitlinear.ternarize(model.model.layers[1].mlp.up_proj.weight[...])
    np.testing.assert_array_equal(np.asarray(packed.unpack(proj.packed[...])), np.asarray(codes))
    assert np.float32(proj.multiplier[...]) == np.float32(multiplier)
    np.testing.assert_array_equal(exported(ids), model(ids))  # same integer path: bit-identical

    # ... and to a Checkpoint: ternary projections, float32 masters nowhere
    out = params.checkpoint_from_model(exported, keep_stored_dtypes=False)
    assert isinstance(out.load("model.layers.1.mlp.up_proj.weight"), Ternary)
    np.testing.assert_array_equal(params.logits(params.model_from_checkpoint(out), ids), params.logits(exported, ids))


@pytest.mark.slow
def test_training_from_scratch_config():
    cfg = ModelConfig.from_hf(tiny_checkpoint(**SMALL).config)
    model = bitnet_model_from_scratch(cfg)
    ids = toy_sequence(cfg.vocab_size)
    loss = training.next_token_loss(model, ids)
    assert abs(float(loss) - np.log(cfg.vocab_size)) < 1.0  # small random init: near-uniform predictions


def bitnet_model_from_scratch(cfg):
    from bitnet_model import BitNetForCausalLM

    return BitNetForCausalLM(cfg, mode="training", rngs=nnx.Rngs(0))
