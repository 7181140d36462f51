"""verify --runtime bitnet.cpp: the JAX model under bitnet.cpp's arithmetic, teacher-forced with the inputs
bitnet.cpp gave each product, against bitnet.cpp's logits (docs/formats.md §14 has the arithmetic and the why)."""

from __future__ import annotations

import numpy as np

from bitnet_convert.verification.report import LayerReport
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.config import ModelConfig
from bitnet_core.errors import ConvertError

# bitnet.cpp's products by the projections' GGML type: what its float products round their input to first (None:
# float32 as it is). I2_S quantizes it per token to int8; F16 goes through llamafile's tinyBLAS, which on x86-64
# (AVX with F16C) multiplies F16 weights by float32 activations; BF16 converts them to its vec_dot_type, bf16.
PRODUCTS = {"I2_S": None, "F32": None, "F16": None, "BF16": "bf16"}
HEAD_INPUTS = {"F32": None, "F16": None, "BF16": "bf16", "Q8_0": "q8_0"}  # the head's input, by its type
PROJECTION_ORDER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")  # as called
# Teacher forcing (docs/formats.md §14): every product in the JAX model takes bitnet.cpp's own input, which must
# equal ours to the rounding of what both compute in between, relative to the token's largest value. Float32 ops
# (RMSNorm, RoPE, softmax, SiLU, the residual add) in other orders and other contractions into FMA: a few units
# of 2^-24 each; 2^-16 holds them with room. The attention output comes from Q/K/V rounded to f16: a float32
# difference can tip one value's f16 rounding the other way, one f16 step (2^-10 of the value) apart, and the
# output moves by at most that: 2^-10. Both lie far below what a changed weight does (a multiplier off by 2%
# moves the next product's input by about 1e-2 of it).
INPUT_TOLERANCE = {"attn_output": 2.0**-10}
FLOAT_INPUT_TOLERANCE = 2.0**-16
# With each product fed the same input, the logits differ by float32 rounding in the ops after the last product
# (final RMSNorm, the head's sum of H products, in other orders): a few units of 2^-24 per value; 1e-5 of the
# largest logit holds that with room.
FLOOR = 1e-5


def projection_type(path: str) -> str:
    from bitnet_convert.formats import gguf

    types = gguf.tensor_types(path)
    return next((kind for name, kind in types.items() if name.startswith("blk.0.attn_q.")), "none")


def head_rounding(path: str) -> str | None:
    from bitnet_convert.formats import gguf

    types = gguf.tensor_types(path)
    head = types.get("output.weight", types.get("token_embd.weight"))
    if head not in HEAD_INPUTS:
        raise ConvertError(f"{path}: bitnet.cpp's head product on a {head} table is not modelled here "
                           f"(f32, f16, bf16, q8_0 are)")
    return HEAD_INPUTS[head]


def _logits(path: str, model, ids: list[int], *, modelled: bool = True,
                       forced: list | None = None) -> tuple[np.ndarray, list | None]:
    """The JAX model's logits [T, V] under bitnet.cpp's arithmetic (its quantizer or float products; with
    `modelled`, its f16 Q/K/V and head input), teacher-forced with `forced` inputs where given (and then the
    departures of each from ours)."""
    from bitnet_model.bitlinear import probe

    projection = projection_type(path)
    settings = ({"exact_product_rounding": True} if projection == "I2_S" else
                {"quantize": False, "float_activations": PRODUCTS[projection]})
    if modelled:
        settings.update(attention="f16", head_input=head_rounding(path))
    with probe(**settings, forced=forced) as departures:
        out = np.asarray(model(np.asarray([ids], np.int32)))[0]  # eager: the probe is read when traced
    return out, departures if forced is not None else None


def compare(path: str, ckpt: Checkpoint, cfg: ModelConfig, ids: list[int], logits: np.ndarray,
                        inputs: dict[str, np.ndarray], report: LayerReport) -> LayerReport:
    if not np.isfinite(logits).all():
        report.failures.append("bitnet.cpp's logits hold NaN or infinite values")
        return report
    names = [f"blk.{i}.{kind}.weight" for i in range(cfg.num_hidden_layers) for kind in PROJECTION_ORDER]
    missing = [name for name in names if name not in inputs]
    if missing:
        report.failures.append(f"bitnet.cpp computed no product with {missing[0]}")
        return report
    from bitnet_model.params import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    try:
        teacher, departures = _logits(path, model, ids, forced=[inputs[name] for name in names])
    except ValueError as exc:  # a product of another shape than ours
        report.failures.append(f"bitnet.cpp computed another model: {exc}")
        return report
    own, _ = _logits(path, model, ids)
    unmodelled, _ = _logits(path, model, ids, modelled=False)
    scale = float(np.abs(own).max())
    diff = float(np.abs(logits - teacher).max()) / scale
    bounds = [INPUT_TOLERANCE.get(name.split(".")[2], FLOAT_INPUT_TOLERANCE) for name in names]
    worst = int(np.argmax(np.asarray(departures) / bounds))
    top1 = float(np.mean(logits.argmax(-1) == own.argmax(-1)))
    report.figures.update({
        "max_rel_diff": diff, "bound": FLOOR, "max_input_departure": max(departures),
        "max_input_departure_of_a_float_op": max(d for d, b in zip(departures, bounds) if b == FLOAT_INPUT_TOLERANCE),
        "free_running_max_rel_diff": float(np.abs(logits - own).max()) / scale,
        "free_running_max_rel_diff_without_f16_model": float(np.abs(logits - unmodelled).max()) / scale,
        "top1_agreement": top1, "positions": len(ids)})
    if not departures[worst] <= bounds[worst]:
        report.failures.append(f"bitnet.cpp's input to {names[worst]} departs from the JAX model's by "
                               f"{departures[worst]:.3g} of the token's largest value; rounding explains up to "
                               f"{bounds[worst]:.3g}")
    if not diff <= FLOOR:
        report.failures.append(f"bitnet.cpp's logits differ from the JAX model's under its arithmetic by {diff:.3g} "
                               f"of the largest logit; float32 rounding explains up to {FLOOR:.3g}")
    report.notes.append("compared with the JAX model under bitnet.cpp's arithmetic (its int8 quantizer or float "
                        "products, f16 Q/K/V), each product fed bitnet.cpp's input; top-1 agrees with the "
                        f"free-running model at {top1:.3f} of the positions")
    report.passed = not report.failures
    return report
