"""BitLinear's W1.58A8 arithmetic and the checkpoint -> model loader's error reporting."""

import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Checkpoint, Ternary
from bitnet_core.codecs import hf2bit
from bitnet_core.errors import ConvertError
from bitnet_model import bitlinear, packed, params


def test_activation_quantization_rounds_half_to_even_per_token():
    x = jnp.asarray([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
    x_q, scale = bitlinear.quantize_activations(x)
    np.testing.assert_array_equal(np.asarray(x_q[0]), [127, 0, 2, 2, 0, -2])  # as torch.round
    np.testing.assert_array_equal(np.asarray(x_q[1]), 0)  # all-zero token: eps floor, no NaN
    assert float(scale[0, 0]) == 1.0 and x_q.dtype == jnp.int8


def test_the_exact_product_quantizer_rounds_as_bitnet_cpp():
    """float32(x·s) is exactly k + ½ for these x (s = 127/3): half to even rounds that; bitnet.cpp (its rounding
    contracted into an FMA) rounds the exact product, just below or above it."""
    x = jnp.asarray([[3.0, 1.5, 0.17716536, 0.20078741, -1.5]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(x * np.float32(127 / 3)), [[127, 63.5, 7.5, 8.5, -63.5]])
    ours, scale = bitlinear.quantize_activations(x)
    theirs, their_scale = bitlinear.quantize_exact_product(x)
    np.testing.assert_array_equal(np.asarray(ours), [[127, 64, 8, 8, -64]])
    np.testing.assert_array_equal(np.asarray(theirs), [[127, 63, 7, 9, -63]])
    assert float(scale[0, 0]) == float(their_scale[0, 0]) and theirs.dtype == jnp.int8


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


@pytest.mark.parametrize("block_bytes", [0, 4 * 40 * 2])  # whole matrix; blocks of 2 packed rows (8 outputs)
def test_inference_bitlinear_holds_packed_codes_and_computes_exactly(block_bytes):
    """Inference state is uint8 [out/4, in] (rows 4r..4r+3 in packed row r); the product equals the exact int64
    formula, and the blocked (CPU) and whole-matrix unpacks give the same bits, one-token padding included."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, (24, 40)).astype(np.int8)
    layer = bitlinear.BitLinear(40, 24, block_bytes=block_bytes)
    assert layer.packed[...].dtype == jnp.uint8 and layer.packed[...].shape == (6, 40)
    layer.packed[...] = bitlinear.pack_ternary(codes)
    layer.multiplier[...] = jnp.float32(1.5)
    assert (int(layer.packed[...][2, 7]) >> 4) & 3 == codes[2 * 4 + 2, 7] + 1  # field k of row r: code 4r + k
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    y = layer(jnp.asarray(x))
    x_q, s = bitlinear.quantize_activations(jnp.asarray(x))
    acc = np.asarray(x_q, np.int64) @ codes.T.astype(np.int64)
    np.testing.assert_allclose(np.asarray(y), acc.astype(np.float32) / np.asarray(s) * np.float32(1.5), rtol=3e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(bitlinear.ternary_matmul(x_q, s, jnp.asarray(codes), 1.5)))
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x[:1, :1]))), np.asarray(y[:1, :1]))


def test_bitlinear_refuses_out_features_not_a_multiple_of_4():
    for mode in bitlinear.MODES:
        with pytest.raises(ValueError, match="multiple of 4"):
            bitlinear.BitLinear(8, 6, mode=mode)


def test_loader_regroups_hf_packed_bytes_without_int8_codes(hf_checkpoint, monkeypatch):
    """HF packed projections reach the model's packed state straight from their bytes (no hf2bit.unpack), and
    hold exactly the codes of the Ternary path."""
    from bitnet_convert.formats import hf

    ckpt = hf.read(str(hf_checkpoint("autobitlinear")))
    expected = {e.name: e.load() for e in ckpt if e.kind == "ternary"}
    monkeypatch.setattr(hf.hf2bit, "unpack", lambda *a: pytest.fail("int8 codes were made"))
    model = params.model_from_checkpoint(ckpt)
    proj = model.model.layers[1].self_attn.k_proj
    want = expected["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(np.asarray(packed.unpack(proj.packed[...])), want.codes)
    assert np.float32(proj.multiplier[...]) == want.multiplier


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
            stored = back[name].load_packed()  # the packed state, offered in HF's layout for the writers
            assert stored.layout == hf2bit.LAYOUT and np.array_equal(stored.data, hf2bit.pack(got.codes)), name
        else:
            assert got.dtype == entry.dtype and got.tobytes() == entry.load().tobytes(), name
