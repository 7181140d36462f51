"""verify, layer 4: the candidate GGUF in the runtime that will run it, against the JAX model under that
runtime's arithmetic.

Neither runtime quantizes activations per token as W1.58A8 does: llama.cpp multiplies float activations by the
codes of an F32 file, and its TQ types go through Q8_K activations (int8 per block of 256 values, a finer grid);
ik_llama.cpp's IQ2_BN (what its llama-quantize makes of our I2_S, docs/formats.md §10) uses Q8_K64. So the
runtime is compared with the JAX model with activation quantization switched off. An F32 file computes that
function itself and must agree to the runtime's float floor (FLOAT_FLOOR); a quantized one is allowed what int8
activation rounding explains, measured on this model: at most A8_SLACK times the distance between the JAX model
with and without its quantizer, plus the floor. A runtime that computes another
function (llama.cpp's bitnet graph has SiLU; a relu2 model there) fails with that said, never passes.

bitnet.cpp (bitnet_cpp.py runs the user's own build) does quantize activations per token as W1.58A8 does, and its
I2_S product dequantizes exactly as BitLinear (docs/formats.md §13). So it is compared with the JAX model under
its own arithmetic (`_bitnet_cpp_reference`): int8 activations for I2_S, activations rounded to the weights' type
for its float files, Q/K/V and attention probabilities in f16, the head's input as the head's type takes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bitnet_convert.verification.report import LayerReport
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.config import ModelConfig
from bitnet_core.errors import ConvertError
from bitnet_core.extras import require

A8_SLACK = 1.5  # a finer int8 grid than one scale per token moves logits no more than that one does; 1.5 for noise
# Float floors, of the largest logit: llama.cpp with F32 K/V computes in float32 (1e-4 covers its summation
# order); ik_llama.cpp keeps K/V in f16 (11 significant bits: 2^-11 = 4.9e-4 of each cached value).
FLOAT_FLOOR = {"llama.cpp": 1e-4, "ik_llama.cpp": 1e-3}
PACKAGES = {"llama.cpp": "llama_cpp", "ik_llama.cpp": "ik_llama_cpp"}  # bitnet.cpp: a build folder, not a package
SEQUENCE = 32  # tokens compared: one sequence, every position
FLOAT_OUTTYPES = ("f32", "f16", "bf16")  # F16/BF16 weights multiply activations rounded to 16 bits, finer than int8
IQ2_BN_MIN_ROW = 512  # ik_llama.cpp's IQ2_BN activation quantizer asserts rows of at least 512 values
# What each runtime's graph computes in the FFN, by general.architecture (docs/formats.md §6, §10).
RUNTIME_ACTIVATION = {
    "llama.cpp": {"bitnet": "silu", "llama": "silu"},
    "ik_llama.cpp": {"bitnet": "silu", "bitnet-25": "relu2", "bitnet-b1.58": "relu2", "llama": "silu"},
    "bitnet.cpp": {"bitnet": "silu", "llama": "silu"},
}
# Why a runtime has no graph for an architecture, and what runs it instead.
NO_GRAPH = {
    ("bitnet.cpp", "bitnet-b1.58"): "bitnet.cpp at this commit (4645960) has no graph for 2B4T's architecture "
                                    "'bitnet-b1.58' (its relu2 graph came in a later fork commit); ik_llama.cpp "
                                    "runs it: verify --runtime ik_llama.cpp",
}
NO_GRAPH[("bitnet.cpp", "bitnet-25")] = NO_GRAPH[("bitnet.cpp", "bitnet-b1.58")].replace("'bitnet-b1.58'",
                                                                                         "'bitnet-25'")


def check_runtime(path: str, ckpt: Checkpoint, runtime: str, *, model: Checkpoint | None = None,
                  bitnet_cpp_dir=None) -> LayerReport:
    """The runtime layer: the GGUF at `path` (read as `ckpt`) run in `runtime`, against the JAX model of `model`
    (default `ckpt`; verify passes the reference as the candidate should hold it)."""
    model = ckpt if model is None else model
    if runtime in PACKAGES:
        require(PACKAGES[runtime], f"verify --runtime {runtime}")
    else:
        from bitnet_convert.verification import bitnet_cpp

        bitnet_cpp.build_dir(bitnet_cpp_dir)  # no build: one line before any work
    report = LayerReport("runtime", False, figures={"runtime": runtime})
    cfg = ModelConfig.from_hf(ckpt.config)
    arch = ckpt.provenance.get("architecture")
    if ckpt.provenance.get("format") != "gguf":
        raise ConvertError(f"{path}: --runtime {runtime} runs GGUF files; this is {ckpt.provenance.get('format')}")
    computes = RUNTIME_ACTIVATION[runtime].get(arch)
    if computes is None:
        report.failures.append(NO_GRAPH.get((runtime, arch)) or f"{runtime} has no graph for architecture "
                               f"{arch!r} (it runs {', '.join(RUNTIME_ACTIVATION[runtime])})")
        return report
    if computes != cfg.hidden_act:
        report.failures.append(f"{runtime} computes another function: its {arch} graph applies {computes} in the "
                               f"FFN, this model uses {cfg.hidden_act}")
        return report
    with tempfile.TemporaryDirectory(prefix="bitnet-verify-") as tmp:
        model_path = _prepared(path, ckpt, runtime, cfg, Path(tmp), report)
        if model_path is None:
            return report
        ids = _sequence(cfg)
        if runtime == "bitnet.cpp":
            from bitnet_convert.verification import bitnet_cpp

            logits, inputs = bitnet_cpp.trace(model_path, ids, cfg.vocab_size, bitnet_cpp_dir=bitnet_cpp_dir)
        else:
            logits = _runtime_logits(runtime, model_path, ids, Path(tmp))
    if runtime == "bitnet.cpp":
        return _compare_bitnet_cpp(path, model, cfg, ids, logits, inputs, report)
    continuous, quantized = _jax_logits(model, ids)
    if not np.isfinite(logits).all():
        report.failures.append(f"{runtime}'s logits hold NaN or infinite values")
        return report
    scale = float(np.abs(quantized).max())
    to_continuous = float(np.abs(logits - continuous).max()) / scale
    a8_effect = float(np.abs(continuous - quantized).max()) / scale
    exact_weights = _outtype(path) == "f32"  # F32 weights multiply float activations: no int8 rounding
    bound = FLOAT_FLOOR[runtime] + (0.0 if exact_weights else A8_SLACK * a8_effect)
    top1 = float(np.mean(logits.argmax(-1) == quantized.argmax(-1)))
    report.figures.update({"max_rel_diff": to_continuous, "bound": bound, "activation_rounding_effect": a8_effect,
                           "top1_agreement_with_w158a8": top1, "positions": len(ids)})
    if not to_continuous <= bound:
        why = "float rounding" if exact_weights else "float rounding and int8 activation rounding"
        report.failures.append(f"{runtime}'s logits differ from the JAX model's by {to_continuous:.3g} of the largest "
                               f"logit; {why} explain up to {bound:.3g}")
    report.notes.append(f"compared with the JAX model without activation quantization ({runtime} does not quantize "
                        f"per token); top-1 agrees with the W1.58A8 model at {top1:.3f} of the positions")
    report.passed = not report.failures
    return report


def gguf_provenance(path: str) -> dict | None:
    from bitnet_convert.formats import gguf

    return gguf.recorded_provenance(path)


def _outtype(path: str) -> str | None:
    """The projection type our writer recorded in the file (None for a file of another tool)."""
    return (gguf_provenance(path) or {}).get("outtype")


def _prepared(path: str, ckpt: Checkpoint, runtime: str, cfg: ModelConfig, tmp: Path, report) -> str | None:
    """The file the runtime loads: ours as it is for llama.cpp and bitnet.cpp; for ik_llama.cpp, requantized to
    IQ2_BN."""
    if runtime == "llama.cpp":
        return path
    if runtime == "bitnet.cpp":
        projection = _projection_type(path)
        if projection not in BITNET_CPP_PRODUCTS:
            report.failures.append(f"verify --runtime bitnet.cpp runs I2_S and float (f32/f16/bf16) projections; "
                                   f"this file holds {projection}: write it with --target bitnet.cpp")
            return None
        return path
    outtype = _outtype(path)
    if outtype in FLOAT_OUTTYPES and (gguf_provenance(path) or {}).get("target") == "bitnet.cpp":
        return path  # codes x multiplier in a float type: ik_llama.cpp multiplies those as they are
    if outtype not in (None, "i2_s"):
        report.failures.append(f"ik_llama.cpp runs bitnet.cpp's I2_S files (after requantizing); this file holds "
                               f"{outtype} projections: write it with --target bitnet.cpp")
        return None
    if cfg.hidden_size < IQ2_BN_MIN_ROW or cfg.intermediate_size < IQ2_BN_MIN_ROW:
        report.failures.append(f"ik_llama.cpp's IQ2_BN needs rows of at least {IQ2_BN_MIN_ROW} values; this model's "
                               f"are {cfg.hidden_size} and {cfg.intermediate_size}")
        return None
    from ik_llama_cpp.quantize import find_quantize_bin

    binary = find_quantize_bin()
    if binary is None:
        raise ConvertError("ik_llama.cpp's llama-quantize is not installed with its package")
    out = tmp / "iq2_bn.gguf"
    done = subprocess.run([str(binary), "--allow-requantize", "--token-embedding-type", "f16",
                           "--output-tensor-type", "f16", path, str(out), "iq2_bn"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        lines = (done.stderr + done.stdout).strip().splitlines()
        why = [line for line in lines if "error" in line.lower() or "failed" in line.lower()] or lines[-1:] or [""]
        report.failures.append(f"ik_llama.cpp's llama-quantize refused the file: {why[0].strip()}")
        return None
    report.notes.append("requantized to IQ2_BN by ik_llama.cpp's llama-quantize (f16 embeddings and head)")
    return str(out)


def _sequence(cfg: ModelConfig) -> list[int]:
    from bitnet_convert.verification.function import token_batches

    (ids,) = token_batches(cfg.vocab_size, cfg.bos_token_id, ((1, min(SEQUENCE, cfg.max_position_embeddings)),))
    return [int(t) for t in ids[0]]


def _runtime_logits(runtime: str, model_path: str, ids: list[int], tmp: Path) -> np.ndarray:
    out = tmp / "logits.npy"
    done = subprocess.run([sys.executable, "-m", "bitnet_convert.verification.runtime_worker", runtime, model_path,
                           ",".join(map(str, ids)), str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0 or not out.is_file():
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        last = (done.stderr or "").strip().splitlines()[-1:] or ["no message"]
        raise ConvertError(f"{model_path}: {runtime} could not run the file ({how}): {last[0]}")
    return np.load(out, allow_pickle=False)


def _jax_logits(ckpt: Checkpoint, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The JAX model's logits [T, V] without activation quantization (the runtimes' arithmetic) and with it."""
    from bitnet_model.bitlinear import probe
    from bitnet_model.modeling import logits
    from bitnet_model.params import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    tokens = np.asarray([ids], np.int32)
    with probe(quantize=False):
        continuous = np.asarray(model(tokens))[0]  # eager: the probe is read when traced
    return continuous, logits(model, tokens)[0]


# bitnet.cpp's products by the projections' GGML type: what its float products round their input to first (None:
# float32 as it is). I2_S quantizes it per token to int8; F16 goes through llamafile's tinyBLAS, which on x86-64
# (AVX with F16C) multiplies F16 weights by float32 activations; BF16 converts them to its vec_dot_type, bf16.
BITNET_CPP_PRODUCTS = {"I2_S": None, "F32": None, "F16": None, "BF16": "bf16"}
BITNET_CPP_HEAD = {"F32": None, "F16": None, "BF16": "bf16", "Q8_0": "q8_0"}  # the head's input, by its type
PROJECTION_ORDER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")  # as called
# Teacher forcing (docs/formats.md §13): every product in the JAX model takes bitnet.cpp's own input, which must
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
BITNET_CPP_FLOOR = 1e-5


def _projection_type(path: str) -> str:
    from bitnet_convert.formats import gguf

    types = gguf.tensor_types(path)
    return next((kind for name, kind in types.items() if name.startswith("blk.0.attn_q.")), "none")


def _head_rounding(path: str) -> str | None:
    from bitnet_convert.formats import gguf

    types = gguf.tensor_types(path)
    head = types.get("output.weight", types.get("token_embd.weight"))
    if head not in BITNET_CPP_HEAD:
        raise ConvertError(f"{path}: bitnet.cpp's head product on a {head} table is not modelled here "
                           f"(f32, f16, bf16, q8_0 are)")
    return BITNET_CPP_HEAD[head]


def _bitnet_cpp_logits(path: str, model, ids: list[int], *, modelled: bool = True,
                       forced: list | None = None) -> tuple[np.ndarray, list | None]:
    """The JAX model's logits [T, V] under bitnet.cpp's arithmetic (its quantizer or float products; with
    `modelled`, its f16 Q/K/V and head input), teacher-forced with `forced` inputs where given (and then the
    departures of each from ours)."""
    from bitnet_model.bitlinear import probe

    projection = _projection_type(path)
    settings = ({"exact_product_rounding": True} if projection == "I2_S" else
                {"quantize": False, "float_activations": BITNET_CPP_PRODUCTS[projection]})
    if modelled:
        settings.update(attention="f16", head_input=_head_rounding(path))
    with probe(**settings, forced=forced) as departures:
        out = np.asarray(model(np.asarray([ids], np.int32)))[0]  # eager: the probe is read when traced
    return out, departures if forced is not None else None


def _compare_bitnet_cpp(path: str, ckpt: Checkpoint, cfg: ModelConfig, ids: list[int], logits: np.ndarray,
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
        teacher, departures = _bitnet_cpp_logits(path, model, ids, forced=[inputs[name] for name in names])
    except ValueError as exc:  # a product of another shape than ours
        report.failures.append(f"bitnet.cpp computed another model: {exc}")
        return report
    own, _ = _bitnet_cpp_logits(path, model, ids)
    unmodelled, _ = _bitnet_cpp_logits(path, model, ids, modelled=False)
    scale = float(np.abs(own).max())
    diff = float(np.abs(logits - teacher).max()) / scale
    bounds = [INPUT_TOLERANCE.get(name.split(".")[2], FLOAT_INPUT_TOLERANCE) for name in names]
    worst = int(np.argmax(np.asarray(departures) / bounds))
    top1 = float(np.mean(logits.argmax(-1) == own.argmax(-1)))
    report.figures.update({
        "max_rel_diff": diff, "bound": BITNET_CPP_FLOOR, "max_input_departure": max(departures),
        "max_input_departure_of_a_float_op": max(d for d, b in zip(departures, bounds) if b == FLOAT_INPUT_TOLERANCE),
        "free_running_max_rel_diff": float(np.abs(logits - own).max()) / scale,
        "free_running_max_rel_diff_without_f16_model": float(np.abs(logits - unmodelled).max()) / scale,
        "top1_agreement": top1, "positions": len(ids)})
    if not departures[worst] <= bounds[worst]:
        report.failures.append(f"bitnet.cpp's input to {names[worst]} departs from the JAX model's by "
                               f"{departures[worst]:.3g} of the token's largest value; rounding explains up to "
                               f"{bounds[worst]:.3g}")
    if not diff <= BITNET_CPP_FLOOR:
        report.failures.append(f"bitnet.cpp's logits differ from the JAX model's under its arithmetic by {diff:.3g} "
                               f"of the largest logit; float32 rounding explains up to {BITNET_CPP_FLOOR:.3g}")
    report.notes.append("compared with the JAX model under bitnet.cpp's arithmetic (its int8 quantizer or float "
                        "products, f16 Q/K/V), each product fed bitnet.cpp's input; top-1 agrees with the "
                        f"free-running model at {top1:.3f} of the positions")
    report.passed = not report.failures
    return report
