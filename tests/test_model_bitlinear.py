"""BitLinear's W1.58A8 arithmetic and the checkpoint -> model loader's error reporting."""

import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_convert.checkpoint import Checkpoint, Ternary
from bitnet_convert.errors import ConvertError
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_model import bitlinear, params


def test_activation_quantization_rounds_half_to_even_per_token():
    x = jnp.asarray([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
    x_q, scale = bitlinear.quantize_activations(x)
    np.testing.assert_array_equal(np.asarray(x_q[0]), [127, 0, 2, 2, 0, -2])  # as torch.round
    np.testing.assert_array_equal(np.asarray(x_q[1]), 0)  # all-zero token: eps floor, no NaN
    assert float(scale[0, 0]) == 1.0 and x_q.dtype == jnp.int8


def test_integer_product_equals_the_formula_and_one_row_padding_is_harmless():
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (24, 40)).astype(np.int8)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    x_q, s = bitlinear.quantize_activations(jnp.asarray(x))
    y = bitlinear.ternary_matmul(x_q, s, jnp.asarray(codes), jnp.float32(1.5))
    acc = np.asarray(x_q, np.int64) @ codes.T.astype(np.int64)  # exact reference
    expected = (acc.astype(np.float32) / np.asarray(s)) * np.float32(1.5)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=3e-7, atol=0)  # XLA's f32 divide: within 1 ulp
    one = bitlinear.ternary_matmul(x_q[:1], s[:1], jnp.asarray(codes), jnp.float32(1.5))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(y[:1]))


def test_ternarize_is_absmean():
    w = jnp.asarray([[0.3, -0.1, 0.05, -0.6]], jnp.float32)  # mean|W| = 0.2625
    codes, m = bitlinear.ternarize(w)
    np.testing.assert_array_equal(np.asarray(codes), [[1, 0, 0, -1]])
    assert abs(float(m) - 0.2625) < 1e-7


def test_loader_reports_every_bad_tensor_at_once():
    ckpt = tiny_checkpoint(seed=1)
    arrays = ckpt.materialize()
    q = "model.layers.0.self_attn.q_proj.weight"
    arrays[q] = Ternary(np.full(arrays[q].shape, 3, np.int8), arrays[q].multiplier)
    arrays["model.norm.weight"] = arrays["model.norm.weight"][:-1]
    with pytest.raises(ConvertError) as err:
        params.model_from_checkpoint(Checkpoint.from_arrays(ckpt.config, arrays))
    assert "model.norm.weight" in str(err.value)  # validate.check_tensors names the mis-shaped norm
    arrays["model.norm.weight"] = ckpt.load("model.norm.weight")
    with pytest.raises(ConvertError, match="outside"):
        params.model_from_checkpoint(Checkpoint.from_arrays(ckpt.config, arrays))


def test_model_to_checkpoint_keeps_stored_dtypes():
    ckpt = tiny_checkpoint(seed=1)
    model = params.model_from_checkpoint(ckpt)
    assert model.model.embed_tokens.weight[...].dtype == jnp.float32  # bf16 on disk, float32 in the model
    back = params.checkpoint_from_model(model)
    assert back.config == ckpt.config
    for name, entry in ckpt.tensors.items():
        got = back.load(name)
        if isinstance(got, Ternary):
            np.testing.assert_array_equal(got.codes, entry.load().codes)
            assert got.multiplier == entry.load().multiplier
        else:
            assert got.dtype == entry.dtype and got.tobytes() == entry.load().tobytes(), name
