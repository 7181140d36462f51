"""From a trained model (float32 masters) to the inference form (packed codes + multiplier) and a loss to train.

Training-mode BitLinear computes its forward through the same integer path as inference (see bitlinear.py),
so the exported model's logits equal the training model's to the last bit.
"""

from __future__ import annotations

import jax
from flax import nnx

from bitnet_core.extras import require
from bitnet_core.names import MULTIPLIER, PACKED, WEIGHT
from bitnet_model.bitlinear import INFERENCE, TRAINING, pack_ternary, ternarize
from bitnet_model.modeling import BitNetForCausalLM


def export_inference(model: BitNetForCausalLM) -> BitNetForCausalLM:
    """A new inference-mode model: every projection's masters ternarized and packed, everything else copied."""
    if model.mode != TRAINING:
        raise ValueError(f"export_inference needs a training-mode model, got mode {model.mode!r}")
    abstract = nnx.eval_shape(lambda: BitNetForCausalLM(model.config, mode=INFERENCE))
    graphdef, state = nnx.split(abstract)
    source = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    for path, var in nnx.to_flat_state(state):
        leaf = path[-1]
        if leaf in (PACKED, MULTIPLIER):
            codes, multiplier = ternarize(source[(*path[:-1], WEIGHT)])
            var.set_value(pack_ternary(codes) if leaf == PACKED else multiplier)
        else:
            var.set_value(source[path])
    exported = nnx.merge(graphdef, state)
    exported.stored_dtypes = model.stored_dtypes
    exported.hf_config_json = model.hf_config_json
    return exported


def next_token_loss(model: BitNetForCausalLM, token_ids: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting token t+1 from tokens <= t, for int [B, T]."""
    optax = require("optax", "training")
    logits = model(token_ids[:, :-1])  # [B, T-1, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, token_ids[:, 1:]).mean()


def train_step(model: BitNetForCausalLM, optimizer: nnx.Optimizer, token_ids: jax.Array) -> jax.Array:
    """One optimizer step on the master weights (nnx.Param only); returns the loss before the step."""
    loss, grads = nnx.value_and_grad(next_token_loss)(model, token_ids)
    optimizer.update(model, grads)
    return loss


train_step_jit = nnx.jit(train_step)
