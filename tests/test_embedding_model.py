"""The BitNet-embedding encoders (Qwen3 / Gemma3 backbones, docs/formats.md §12): reading their HF layout, and
the JAX model against transformers' `Qwen3Model` / `Gemma3TextModel` with BitNet linear layers.

Parity is tie-aware as in tests/test_model_parity.py: both models' activation quantizers are recorded; every
int8 disagreement that no earlier one can explain (same row, same or earlier position: attention is causal)
must sit on a rounding tie of the reference; positions before a row's first tie agree to float rounding, and
pooled embeddings of rows without a tie too. Sequences are 40 tokens, longer than every sliding window.
"""

import reference_extra

reference_extra.require()  # the fixtures are written with torch and transformers

import numpy as np
import pytest
import torch
from embedding_fixtures import config_for, tensors_for, write_embedding_checkpoint
from quantizer_recording import run_recording_codes

from bitnet_convert.formats import hf
from bitnet_convert.reference import load_embedding_reference
from bitnet_core import validate
from bitnet_core.checkpoint import DENSE
from bitnet_core.errors import ConvertError
from bitnet_core.quantize import ternarize_master
from bitnet_model import modeling, params

BATCH, LENGTH = 2, 40
TIE = 1e-3  # |x * s - (k + 1/2)| below this is a rounding tie at float32 noise
CASES = [(b, s) for b in ("qwen3", "gemma3") for s in ("small", "medium")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(backbone, size="small", **kw):
        key = (backbone, size, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = write_embedding_checkpoint(tmp_path_factory.mktemp(f"{backbone}-{size}") / "m",
                                                   backbone, size, **kw)
        return made[key]

    return get


# ------------------------------------------------------------------------------------------------ config


def test_qwen3_config_fields():
    cfg = validate.model_config(config_for("qwen3", "small"), "config.json")
    assert (cfg.architecture, cfg.encoder, cfg.use_rms_norm, cfg.qk_norm) == ("Qwen3Model", True, True, True)
    assert (cfg.head_dim, cfg.q_size, cfg.hidden_act, cfg.rope_theta) == (32, 128, "silu", 1e6)
    assert not (cfg.unit_offset_norms or cfg.sandwich_norms or cfg.scale_embeddings)
    assert cfg.query_pre_attn_scalar is None and cfg.sliding_window is None  # use_sliding_window false
    assert cfg.layer_types == ("full_attention",) * 2


def test_gemma3_config_fields():
    cfg = validate.model_config(config_for("gemma3", "small"), "config.json")
    assert cfg.architecture == "Gemma3TextModel" and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.unit_offset_norms and cfg.sandwich_norms and cfg.scale_embeddings
    assert (cfg.query_pre_attn_scalar, cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (24, 8, 1e6, 1e4)
    assert cfg.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    # transformers 5's form: rope bases per layer type
    nested = dict(config_for("gemma3", "small"), rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
    cfg = validate.model_config(nested, "config.json")
    assert (cfg.rope_theta, cfg.rope_local_theta) == (5e5, 2e4)
    # transformers' defaults for what a Gemma3 config leaves out: window 4096, every 6th layer global
    bare = {k: v for k, v in config_for("gemma3", "small").items() if k not in ("layer_types", "sliding_window")}
    cfg = validate.model_config(dict(bare, num_hidden_layers=7), "config.json")
    assert cfg.sliding_window == 4096 and [t[0] for t in cfg.layer_types] == list("sssssfs")


@pytest.mark.parametrize("change, message", [
    ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    ({"use_bidirectional_attention": True}, "only causal attention"),
    ({"layer_types": ["full_attention"]}, "layer_types lists 1 layers"),
    ({"layer_types": ["full_attention", "chunked", "full_attention"]}, "'chunked'"),
    ({"sliding_window": 0}, "sliding_window is 0"),
    ({"hidden_activation": "gelu"}, "unsupported hidden_activation 'gelu'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "only plain RoPE"),
])
def test_gemma3_config_refusals(change, message):
    with pytest.raises(ConvertError, match=message):
        validate.model_config(dict(config_for("gemma3", "small"), **change), "config.json")


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("backbone", ["qwen3", "gemma3"])
def test_reads_the_real_layout_under_canonical_names(folders, backbone):
    ckpt = hf.read(str(folders(backbone)))
    stored = tensors_for(backbone, "small")
    assert set(ckpt.tensors) == {"model." + name for name in stored}
    assert ckpt.provenance["source_layout"] == "embedding"
    for name, value in stored.items():  # every tensor as stored: bf16 masters and norms, bit for bit
        entry = ckpt["model." + name]
        assert entry.kind == DENSE and entry.dtype == value.dtype
        np.testing.assert_array_equal(entry.load().view(np.uint16), value.view(np.uint16))
    assert "model.layers.0.self_attn.o_proj.norm.weight" in ckpt.tensors
    q = validate.model_config(ckpt.config, "c").q_size
    assert ckpt["model.layers.0.self_attn.o_proj.norm.weight"].shape == (q,)  # o_proj's input: heads x head_dim
    # names with the `model.` prefix (bitnet.cpp's converter strips it too) read the same
    prefixed = hf.read(str(write_embedding_checkpoint(folders(backbone).parent / "prefixed", backbone,
                                                      prefixed=True)))
    assert list(prefixed.tensors) == list(ckpt.tensors)


def test_masters_ternarize_like_transformers(folders):
    """Absmean with the 1e-5 floor in float32 (docs/formats.md §1, §12): codes x multiplier equal transformers' WeightQuant."""
    from transformers.integrations.bitnet import WeightQuant

    ckpt = hf.read(str(folders("qwen3")))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        master = ckpt.load(name)
        t = ternarize_master(master)
        expected = WeightQuant.apply(torch.from_numpy(master.astype(np.float32))).numpy()
        np.testing.assert_array_equal(t.codes.astype(np.float32) * t.multiplier, expected)
    zero = ternarize_master(np.zeros((4, 8), np.float32))  # the floor: no division by zero, all codes 0
    assert zero.multiplier == np.float32(1e-5) and not zero.codes.any()


def test_missing_projection_norm_is_refused(folders, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = folders("qwen3")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["layers.1.mlp.up_proj.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConvertError, match="missing tensor model.layers.1.mlp.up_proj.norm.weight"):
        hf.read(str(bad))


# ------------------------------------------------------------------------------------------------ parity


def reference_run(folder, ids):
    """(last hidden state [B, T, H], per quantizer call x * s [B, T, in]) of transformers, in call order."""
    model = load_embedding_reference(folder)
    scaled = []

    def record(_module, _args, out):  # the BitLinear's RMSNorm output is its activation quantizer's input
        x = out.detach().float()
        scaled.append((x * (127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5))).numpy())

    for module in model.modules():
        if type(module).__name__ == "AutoBitLinear":
            module.rms_norm.register_forward_hook(record)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()
    return hidden, scaled


def our_run(model, ids, monkeypatch):
    """(hidden states, int8 activations of every quantizer call) of an eager forward, in call order."""
    return run_recording_codes(model.model, ids, monkeypatch)


def clean_prefix(our_codes, ref_scaled) -> np.ndarray:
    """Per row, the first position a rounding tie can have reached; asserts every fresh disagreement is a tie."""
    clean_until = np.full(BATCH, LENGTH)
    for row in range(BATCH):
        for ours_q, x_s in zip(our_codes, ref_scaled):
            differ = np.argwhere(ours_q[row] != np.clip(np.round(x_s[row]), -128, 127))
            fresh = differ[differ[:, 0] < clean_until[row]]
            if len(fresh):
                off_tie = np.abs(np.abs(x_s[row][tuple(fresh.T)] % 1.0) - 0.5)
                assert off_tie.max() < TIE, f"row {row}: activations differ away from a rounding tie"
                clean_until[row] = fresh[:, 0].min()
    return clean_until


@pytest.mark.parametrize("backbone, size", CASES)
@pytest.mark.slow
def test_hidden_states_and_embeddings_match_transformers(folders, monkeypatch, backbone, size):
    folder = folders(backbone, size)
    model = params.model_from_checkpoint(hf.read(str(folder)))
    cfg = model.config
    assert cfg.sliding_window is None or cfg.sliding_window < LENGTH
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(BATCH, LENGTH))
    ref, ref_scaled = reference_run(folder, ids)
    ours, our_codes = our_run(model, ids, monkeypatch)
    assert ours.shape == ref.shape == (BATCH, LENGTH, cfg.hidden_size)
    assert len(our_codes) == len(ref_scaled) == 7 * cfg.num_hidden_layers
    scale = np.abs(ref).max()
    assert scale > 1.0
    clean_until = clean_prefix(our_codes, ref_scaled)
    diff = np.abs(ours - ref).max(-1)  # [B, T]
    clean = np.arange(LENGTH)[None, :] < clean_until[:, None]
    assert clean.sum() >= 16, f"too few positions untouched by a rounding tie: {clean_until}"
    # float32 rounding of two summation orders (measured ~2e-6 of the largest value)
    assert diff[clean].max() <= 1e-5 * scale
    # pooled and normalized, every mode, against the reference's own pooling of its hidden states. The ties
    # above are those of the eager run: the pooling functions are checked on its hidden states, and `embed`
    # (jitted, another XLA program that may meet another tie) by cosine.
    lengths = np.array([LENGTH, LENGTH - 7])
    mask = np.arange(LENGTH)[None, :] < lengths[:, None]
    ref_pooled = {"mean": (ref * mask[..., None]).sum(1) / lengths[:, None], "cls": ref[:, 0],
                  "last": ref[np.arange(BATCH), lengths - 1]}
    for pooling, expected in ref_pooled.items():
        expected = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
        pooled = np.asarray(modeling.l2_normalize(modeling.pool(ours, lengths, pooling)))
        untouched = clean_until >= (1 if pooling == "cls" else lengths)  # no tie before any pooled position
        np.testing.assert_allclose(pooled[untouched], expected[untouched], atol=1e-5)
        got = modeling.embed(model, ids, lengths, pooling=pooling)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)
        cosine = (got * expected).sum(-1)
        assert cosine.min() >= 0.999, (pooling, cosine)  # after a tie: both roundings are valid


@pytest.mark.parametrize("backbone", ["qwen3", "gemma3"])
@pytest.mark.slow
def test_padded_batch_equals_each_sequence_alone(folders, backbone):
    """Right padding is invisible to causal attention and per-token quantization: a short sequence embedded in a
    padded batch gives its embedding alone (to float rounding of a differently shaped program)."""
    model = params.model_from_checkpoint(hf.read(str(folders(backbone))))
    rng = np.random.default_rng(5)
    long, short = rng.integers(4, model.config.vocab_size, size=30), rng.integers(4, model.config.vocab_size, size=11)
    batch = np.zeros((2, 30), np.int64)
    batch[0], batch[1, :11] = long, short
    for pooling in ("mean", "last", "cls"):
        together = modeling.embed(model, batch, [30, 11], pooling=pooling)
        alone = modeling.embed(model, short[None], [11], pooling=pooling)
        np.testing.assert_allclose(together[1], alone[0], atol=1e-6)

