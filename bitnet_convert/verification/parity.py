"""verify, layer 3: parity of the JAX model with transformers' own BitNet, on a Hugging Face reference.

Two implementations of W1.58A8 agree to float rounding going into each activation quantizer; where a value
x * s lands within that rounding of k + 1/2 the two round it to neighbouring int8 values, and on a chaotic model
the step grows into percent-level logit differences (docs/formats.md §11). So nothing here compares a whole
forward with quantization on. Instead, robust to ties by construction:

1. Layer by layer, teacher forced: every transformers decoder layer gets the exact hidden state our layer got,
   so a difference cannot carry over from an earlier layer. Inside the layer, each activation quantizer's
   input must agree with ours to float rounding (below). Given that, an element that the two round to
   different int8 values is a rounding tie by definition (the two values straddle a boundary while agreeing to
   rounding): transformers takes our int8 value there, and the ties are counted. Then each layer's output
   must agree to float rounding.
2. End to end with activation quantization switched off on both sides (the continuous function x @ (T w)^T):
   the logits must agree to float rounding.

"Float rounding" is measured, not assumed: a chaotic model (2B4T-sized multipliers on random weights) turns every
ulp at a layer's input into far more at its output (sharp softmaxes, relu^2). So each bound is our own model's
response to one ulp of random noise on the input of that layer (or of the embedding, end to end), run without
activation quantization (so that no tie of ours enters the estimate), times ULPS: the two implementations
round each sum differently, a few ulps each. It never goes below RTOL_FLOOR.

A real difference (a changed norm, a wrong multiplier, a wrong layout) moves a quantizer's input or a layer's
output beyond rounding, and ties cannot hide it: an int8 value is taken from our side only where the inputs
were shown to agree to rounding.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np

from bitnet_convert.verification.function import token_batches
from bitnet_convert.verification.report import LayerReport
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.names import PROJECTIONS

# Float32 summation in another order: a layer's output is the residual stream plus two products of width up to
# the FFN size, each sum of n terms off by ~sqrt(n) ulps of its largest term; 2^-14 (6e-5) of the layer's largest
# value holds that with a wide margin, and is 100x below the smallest loss the tests inject.
RTOL_FLOOR = 2.0**-14
# In units of the model's measured response to one ulp of input noise (tiny stable and chaotic models, relu2
# and SiLU, every layout: transformers differs from us by 0.8-2.6 such units end to end).
ULPS = 32
PARITY_BATCHES = ((2, 72), (1, 17))  # > 64 tokens: RoPE far from position 0
_PROJECTION_ORDER = [role.name for role in PROJECTIONS.values()]  # the order a layer calls its BitLinears in
# a causal LM's decoder is `model.`; the encoders' backbone (Qwen3Model, Gemma3TextModel) is the model itself
_LAYER_MODULE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


def check_parity(reference: Checkpoint, folder) -> LayerReport:
    """Parity of the JAX model of `reference` (an HF checkpoint read from `folder`) with transformers'. For an
    embedding model the "logits" are the encoder's last hidden state (after the final norm), against
    transformers' backbone (reference.load_embedding_reference)."""
    from bitnet_convert.reference import load_embedding_reference, load_reference
    from bitnet_model.params import model_from_checkpoint

    model = model_from_checkpoint(reference)
    cfg = model.config
    hf_model = (load_embedding_reference if cfg.encoder else load_reference)(folder)
    outputs = "hidden states" if cfg.encoder else "logits"
    report = LayerReport("parity", True)
    layer_worst = np.zeros(cfg.num_hidden_layers)
    input_worst = np.zeros(cfg.num_hidden_layers)  # quantizer inputs, per layer
    layer_rtol = np.full(cfg.num_hidden_layers, RTOL_FLOOR)  # bounds, per layer: outputs
    input_rtol = np.full(cfg.num_hidden_layers, RTOL_FLOOR)  # and quantizer inputs
    ties = 0
    e2e_worst = logits_worst = e2e_rtol = 0.0
    for ids in token_batches(cfg.vocab_size, cfg.bos_token_id, PARITY_BATCHES, seed=4321):
        ours = _our_layers(model, ids)
        for index, (outputs, inputs) in enumerate(ours.sensitivity):
            layer_rtol[index] = max(layer_rtol[index], ULPS * outputs)
            input_rtol[index] = max(input_rtol[index], ULPS * inputs)
        theirs, tied = _their_layers(hf_model, ids, ours, input_worst)
        ties += tied
        for index, ((_, y, _), y_hf) in enumerate(zip(ours.layers, theirs.layers)):
            layer_worst[index] = max(layer_worst[index], _relative(y_hf, y))
        logits_worst = max(logits_worst, _relative(theirs.logits, ours.logits))
        continuous = _our_continuous(model, ids)
        e2e_worst = max(e2e_worst, _relative(_their_continuous(hf_model, ids), continuous))
        e2e_rtol = max(e2e_rtol, RTOL_FLOOR, ULPS * _one_ulp_response(model, ids, continuous))
    for index, worst in enumerate(input_worst):
        if not worst <= input_rtol[index]:
            report.failures.append(f"decoder layer {index}: an activation quantizer's inputs differ by {worst:.3g} "
                                   f"of their largest value (float rounding stays below {input_rtol[index]:.3g})")
    for index, worst in enumerate(layer_worst):
        if not worst <= layer_rtol[index]:
            report.failures.append(f"decoder layer {index}: outputs differ by {worst:.3g} of their largest value "
                                   f"(float rounding stays below {layer_rtol[index]:.3g})")
    if not logits_worst <= layer_rtol[-1]:
        report.failures.append(f"final norm and head: {outputs} differ by {logits_worst:.3g} of the largest value")
    if not e2e_worst <= e2e_rtol:
        report.failures.append(f"without activation quantization, {outputs} differ by {e2e_worst:.3g} of the "
                               f"largest value (float rounding, as this model amplifies it, stays below "
                               f"{e2e_rtol:.3g})")
    report.figures = {"max_layer_rel_diff": float(layer_worst.max()), "layer_rtol": float(layer_rtol.max()),
                      "max_quantizer_input_rel_diff": float(input_worst.max()),
                      "quantizer_input_rtol": float(input_rtol.max()),
                      "max_logit_rel_diff": logits_worst, "continuous_max_rel_diff": e2e_worst,
                      "continuous_rtol": e2e_rtol, "rounding_ties": ties}
    report.notes.append(f"{ties} activation-quantizer inputs that agree to float rounding were rounded to "
                        f"neighbouring int8 values (ties): transformers took ours there")
    report.passed = not report.failures
    return report


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------------------------------------ ours


class _Run:
    def __init__(self):
        self.layers: list = []  # ours: (input, output, BitLinear inputs in call order); theirs: outputs
        self.sensitivity: list = []  # ours, per layer: (output, quantizer inputs) response to one ulp of noise
        self.logits = None


def _our_layers(model, ids) -> _Run:
    """Our eager forward, layer by layer, with each layer's input, output and quantizer inputs."""
    import jax.numpy as jnp

    from bitnet_model.bitlinear import probe

    ids = jnp.asarray(np.asarray(ids, np.int32))
    run, x = _Run(), model.model.embed(ids)
    noise = np.random.default_rng(7)
    for layer, (cos, sin) in zip(model.model.layers, model.model.rope(ids.shape[1]), strict=True):
        with probe(record=True) as inputs:
            y = layer(x, cos, sin)
        run.layers.append((np.asarray(x), np.asarray(y), [np.asarray(i, np.float32) for i in inputs]))
        # the layer's response to one ulp of noise on its input, without activation quantization
        signs = noise.choice(np.array([-1.0, 1.0], np.float32), x.shape)
        with probe(quantize=False, record=True) as clean_inputs:
            clean = layer(x, cos, sin)
        with probe(quantize=False, record=True) as noisy_inputs:
            noisy = layer(x * (1 + np.float32(2.0**-23) * signs), cos, sin)
        run.sensitivity.append((_relative(noisy, clean), max(
            _relative(a, b) for a, b in zip(noisy_inputs, clean_inputs))))
        x = y
    final = model.model.norm(x)
    run.logits = np.asarray(final if model.config.encoder else model.head(final))
    return run


def _our_continuous(model, ids) -> np.ndarray:
    from bitnet_model.bitlinear import probe

    with probe(quantize=False):
        return np.asarray((model.model if model.config.encoder else model)(np.asarray(ids, np.int32)))


def _one_ulp_response(model, ids, continuous: np.ndarray) -> float:
    """Relative change of our continuous logits when every embedding value moves by one ulp (random sign)."""
    table = model.model.embed_tokens.weight
    saved = table[...]
    signs = np.random.default_rng(7).choice(np.array([-1.0, 1.0], np.float32), saved.shape)
    table[...] = saved * (1 + np.float32(2.0**-23) * signs)
    try:
        return _relative(_our_continuous(model, ids), continuous)
    finally:
        table[...] = saved


def _our_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x * s, int8 codes) of our quantizer for its input x [..., in]."""
    from bitnet_model.bitlinear import quantize_activations

    x_q, scale = quantize_activations(x)
    return np.asarray(x, np.float32) * np.asarray(scale), np.asarray(x_q)


# ---------------------------------------------------------------------------------------------- theirs


def _their_layers(hf_model, ids, ours: _Run, input_worst: np.ndarray) -> tuple[_Run, int]:
    """transformers' forward with every decoder layer fed our layer's input, and our int8 values at ties;
    raises each layer's `input_worst` to its quantizer inputs' largest relative difference from ours."""
    import torch

    run, ties = _Run(), [0]
    current: dict = {}
    hooks = []
    for index, layer in enumerate(_backbone(hf_model).layers):
        hooks.append(layer.register_forward_pre_hook(_teacher(torch, ours.layers[index][0]), with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda _m, _a, out: run.layers.append(_first(out).detach().numpy())))
    for name, module in hf_model.named_modules():
        match = _LAYER_MODULE.match(name)
        if match and type(module).__name__.endswith("BitLinear"):
            slot = (int(match.group(1)), _PROJECTION_ORDER.index(match.group(2)))
            hooks.append(module.register_forward_pre_hook(_entering(current, slot)))

    def quantize(x):  # transformers' own rounding, except at ties, where it takes ours
        layer, slot = current["slot"]
        our_input = ours.layers[layer][2][slot]
        input_worst[layer] = max(input_worst[layer], _relative(x.detach().float().numpy(), our_input))
        _, codes_ours = _our_codes(our_input)
        scale = 127.0 / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        own = np.clip(np.rint((x.detach().float() * scale).numpy()), -128, 127)  # torch.round: half to even
        tie = own != codes_ours  # inputs that agree to rounding (checked above) and round apart
        ties[0] += int(tie.sum())
        return torch.from_numpy(np.where(tie, codes_ours, own).astype(np.float32)), scale

    with _quantizers(hf_model, quantize), torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)))
    for hook in hooks:
        hook.remove()
    run.logits = _outputs(out)
    return run, ties[0]


def _their_continuous(hf_model, ids) -> np.ndarray:
    import torch

    def identity(x):
        return x.float(), torch.ones_like(x[..., :1], dtype=torch.float32)

    with _quantizers(hf_model, identity), torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)))
    return _outputs(out)


def _backbone(hf_model):
    """The module holding the decoder layers: a causal LM's `.model`, an encoder backbone itself."""
    return hf_model if hasattr(hf_model, "layers") else hf_model.model


def _outputs(out) -> np.ndarray:
    """A causal LM's logits, an encoder's last hidden state."""
    value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return value.float().numpy()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _teacher(torch, x: np.ndarray):
    def hook(_module, args, kwargs):
        forced = torch.from_numpy(np.array(x, np.float32))  # a writable copy
        if args:
            return (forced, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": forced}

    return hook


def _entering(current: dict, slot):
    def hook(_module, _args):
        current["slot"] = slot

    return hook


@contextlib.contextmanager
def _quantizers(hf_model, quantize):
    """Both transformers BitLinear classes quantize through `quantize(x) -> (int8 values as float, scale s)`:
    BitLinear's `activation_quant` (per module) and AutoBitLinear's module-level ActQuant."""
    import transformers.integrations.bitnet as bitnet

    class ActQuant:  # AutoBitLinear: x -> round(x * s) / s
        @staticmethod
        def apply(x):
            values, scale = quantize(x)
            return (values / scale).to(x.dtype)

    patched = []
    for module in hf_model.modules():
        if type(module).__name__ == "BitLinear":
            module.activation_quant = lambda x, num_bits=8: (lambda v, s: (v.to(x.dtype), s))(*quantize(x))
            patched.append(module)
    saved, bitnet.ActQuant = bitnet.ActQuant, ActQuant
    try:
        yield
    finally:
        bitnet.ActQuant = saved
        for module in patched:
            del module.activation_quant
