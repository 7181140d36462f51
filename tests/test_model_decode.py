"""KV-cache decoding (the engine's prefill + decode_step over the reference model's weights) against the
reference model's full causal forward.

The cached path sums attention over a longer, masked key buffer, so it agrees with the plain forward to a few
ulps, not bit for bit; an activation that lands on a rounding tie (see test_model_parity.py) can then quantize
one step apart and perturb that row's later logits by up to ~1% of max|logit|. Hence: most (row, step) pairs
must agree to 1e-4 * max|logit|, all to 2e-2, and every argmax must agree.
"""

import numpy as np
import pytest

from bitnet_convert.tiny import tiny_checkpoint
from bitnet_model import engine, generation, params

SMALL = {"hidden_size": 64, "intermediate_size": 128}


@pytest.fixture(scope="module", params=[{}, {"architecture": "LlamaForCausalLM", "hidden_act": "silu"}],
                ids=["bitnet", "llama"])
def model(request):
    return params.model_from_checkpoint(tiny_checkpoint(seed=3, num_key_value_heads=2, **SMALL, **request.param))


def test_decode_steps_equal_full_forward(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 40)).astype(np.int32)
    full = params.logits(model, ids)  # [2, 40, V]
    prompt = 13  # not a power of two: prefill pads to 16 and must ignore the padding
    weights, opts = engine.weights_from_model(model), engine.Options.for_backend()
    padded = np.zeros((2, generation.prefill_length(prompt)), np.int32)
    padded[:, :prompt] = ids[:, :prompt]
    last, cache = engine.prefill(model.config, opts, weights, padded, np.int32(prompt), 48)
    steps = [np.asarray(last)]
    assert int(cache.length) == prompt
    for t in range(prompt, ids.shape[1]):
        step, cache = engine.decode_step(model.config, opts, weights, ids[:, t], cache)
        steps.append(np.asarray(step))
    assert int(cache.length) == ids.shape[1]
    cached = np.stack(steps, axis=1)  # [2, 28, V]: logits at positions prompt-1 .. 39
    expected = full[:, prompt - 1 :]
    scale = np.abs(full).max()
    diff = np.abs(cached - expected).max(-1)  # [2, 28]
    assert np.mean(diff <= 1e-4 * scale) >= 0.5, diff / scale
    assert diff.max() <= 2e-2 * scale
    np.testing.assert_array_equal(cached.argmax(-1), expected.argmax(-1))


def test_greedy_generate_matches_argmax_of_full_forward(model):
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(1, 9)).astype(np.int32)
    out = generation.greedy_generate(model, prompt, max_new_tokens=6)
    assert out.shape == (1, 15)
    np.testing.assert_array_equal(out[:, :9], prompt)
    full = params.logits(model, out[:, :-1])  # each generated token is the argmax after its prefix
    np.testing.assert_array_equal(out[0, 9:], full[0, 8:].argmax(-1))


def test_greedy_generate_stops_at_eos(model):
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(2, 5)).astype(np.int32)
    free = generation.greedy_generate(model, prompt, max_new_tokens=4)
    eos = int(free[0, 5])  # make row 0's first generated token the end-of-sequence token
    out = generation.greedy_generate(model, prompt, max_new_tokens=4, eos_token_id=eos)
    assert out[0, 5] == eos and (out[0, 5:] == eos).all()
    np.testing.assert_array_equal(out[1, : out.shape[1]], free[1, : out.shape[1]])
