"""Every path between the four formats, and every GGUF type, keeps every ternary weight and multiplier.

Precision of the multiplier along a path is that of the weakest format on it:

| format (option)                     | multiplier stored as          |
|-------------------------------------|-------------------------------|
| hf autobitlinear / bitlinear        | bf16 `weight_scale` (the inverse for bitlinear); `--scale-dtype f32` keeps float32 |
| flax, npz                           | float32                       |
| gguf tq1_0 / tq2_0                  | the blocks' f16 `d`, times a float32 `.scale` where f16 cannot hold it |
| gguf f16 / bf16 / f32               | float32 `.scale` tensor (the values are the codes) |
| gguf i2_s                           | float32 in the I2_S tail      |

The tiny model's multipliers are bf16-exact, so every path here must keep them bit for bit; the lossy hop
(a float32 multiplier into a bf16 HF weight_scale) is tested separately.
"""

import itertools

import ml_dtypes
import numpy as np
import pytest

from bitnet_convert.formats import registry
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Checkpoint, Ternary

FORMATS = list(registry.FORMATS)
OUT_NAMES = {"hf": "m-hf", "flax": "m-flax", "npz": "m.npz", "gguf": "m.gguf"}
GGUF_VARIANTS = [
    {"target": "llama.cpp", "outtype": t} for t in ("tq1_0", "tq2_0", "f16", "bf16", "f32")
] + [{"target": "bitnet.cpp", "outtype": t} for t in ("i2_s", "f16", "f32")]


@pytest.fixture(scope="module")
def original() -> Checkpoint:
    return tiny_checkpoint(seed=3)


@pytest.fixture(scope="module")
def sources(original, tmp_path_factory):
    """The original model written once in each format."""
    root = tmp_path_factory.mktemp("sources")
    return {fmt: registry.write_checkpoint(original, str(root / OUT_NAMES[fmt]), fmt) for fmt in FORMATS}


def assert_same_model(expected: Checkpoint, actual: Checkpoint, dense_exact: bool = True):
    assert list(actual.tensors) == list(expected.tensors)
    for name, entry in expected.tensors.items():
        want, got = entry.load(), actual[name].load()
        if isinstance(want, Ternary):
            assert isinstance(got, Ternary), name
            np.testing.assert_array_equal(got.codes, want.codes, err_msg=name)
            assert got.multiplier.tobytes() == want.multiplier.tobytes(), name
        elif dense_exact:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name)
        else:  # f16 embeddings: bf16 values below f16's normal range lose low bits
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-3,
                                       atol=1e-7, err_msg=name)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "hidden_act", "rms_norm_eps", "tie_word_embeddings"):
        assert actual.config[key] == expected.config[key], key


@pytest.mark.parametrize("src, dst", list(itertools.permutations(FORMATS, 2)))
def test_every_pair_keeps_the_model(original, sources, src, dst, tmp_path):
    out = registry.convert(str(sources[src]), str(tmp_path / OUT_NAMES[dst]), src, dst)
    assert registry.detect_input_format(str(out)) == dst
    assert_same_model(original, registry.read_checkpoint(str(out)), dense_exact=True)


@pytest.mark.parametrize("options", GGUF_VARIANTS, ids=lambda o: f"{o['target']}-{o['outtype']}")
@pytest.mark.parametrize("embed_type", ["f16", "bf16", "f32"])
def test_every_gguf_type_round_trips_through_hf(original, sources, options, embed_type, tmp_path):
    gguf_path = registry.convert(str(sources["hf"]), str(tmp_path / "m.gguf"), "hf", "gguf",
                                 embed_type=embed_type, **options)
    back = registry.convert(str(gguf_path), str(tmp_path / "back-hf"), "gguf", "hf")
    assert_same_model(original, registry.read_checkpoint(str(back)), dense_exact=embed_type != "f16")


def test_float32_multiplier_into_bf16_weight_scale_is_the_only_lossy_hop(original, tmp_path):
    arrays = original.materialize()
    odd = np.float32(0.0123456789)  # not representable in bf16
    name = "model.layers.1.mlp.down_proj.weight"
    arrays[name] = Ternary(arrays[name].codes, odd)
    ckpt = Checkpoint.from_arrays(original.config, arrays, tokenizer_files=original.tokenizer_files)

    bf16 = registry.read_checkpoint(str(registry.write_checkpoint(ckpt, str(tmp_path / "bf16-hf"), "hf")))
    assert bf16[name].load().multiplier == np.float32(odd.astype(ml_dtypes.bfloat16))
    assert abs(bf16[name].load().multiplier / odd - 1) <= 2.0**-8

    exact = registry.write_checkpoint(ckpt, str(tmp_path / "f32-hf"), "hf", scale_dtype="f32")
    assert registry.read_checkpoint(str(exact))[name].load().multiplier == odd
    for fmt in ("flax", "npz", "gguf"):
        out = registry.write_checkpoint(ckpt, str(tmp_path / OUT_NAMES[fmt]), fmt)
        assert registry.read_checkpoint(str(out))[name].load().multiplier == odd, fmt
