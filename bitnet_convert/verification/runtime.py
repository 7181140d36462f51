"""verify, layer 4: the candidate GGUF in the runtime that will run it, against the JAX model under that
runtime's arithmetic.

llama.cpp and ik_llama.cpp do not quantize activations per token as W1.58A8 does: llama.cpp multiplies float
activations by the codes of an F32 file, and its TQ types go through Q8_K activations (int8 per block of 256
values, a finer grid); ik_llama.cpp's IQ2_BN (what its llama-quantize makes of our I2_S, docs/formats.md §10) uses
Q8_K64. So they are compared with the JAX model with activation quantization switched off. An F32 file computes
that function itself and must agree to the runtime's float floor (FLOAT_FLOOR); a quantized one is allowed what
int8 activation rounding explains, measured on this model: at most A8_SLACK times the distance between the JAX
model with and without its quantizer, plus the floor. A runtime that computes another function (llama.cpp's
bitnet graph has SiLU; a relu2 model there) fails with that said, never passes.

bitnet.cpp (bitnet_cpp.py runs the user's own build) quantizes per token as W1.58A8 does, and its I2_S product
dequantizes as BitLinear, bit for bit. So it is held to far tighter bounds: the JAX model under its arithmetic
(its quantizer's rounding, its float products, f16 Q/K/V, its head), teacher-forced with the input bitnet.cpp
gave each product, which must equal ours to float rounding; then the logits to float rounding too
(docs/formats.md §14).
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
NO_GRAPH = {("bitnet.cpp", arch): f"bitnet.cpp at this commit (4645960) has no graph for 2B4T's architecture "
                                  f"{arch!r} (its relu2 graph came in a later fork commit); ik_llama.cpp runs it: "
                                  f"verify --runtime ik_llama.cpp" for arch in ("bitnet-b1.58", "bitnet-25")}


# The GGUF target (gguf.types.TARGETS) whose files each runtime runs (loadable_file): ik_llama.cpp runs bitnet.cpp's.
RUNTIME_TARGET = {"llama.cpp": "llama.cpp", "ik_llama.cpp": "bitnet.cpp", "bitnet.cpp": "bitnet.cpp"}


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
        model_path = loadable_file(path, ckpt, runtime, cfg, Path(tmp), report)
        if model_path is None:
            return report
        ids = _sequence(cfg)
        if runtime == "bitnet.cpp":
            from bitnet_convert.verification import bitnet_cpp

            logits, inputs = bitnet_cpp.trace(model_path, ids, cfg.vocab_size, bitnet_cpp_dir=bitnet_cpp_dir)
        else:
            logits = _runtime_logits(runtime, model_path, ids, Path(tmp))
    if runtime == "bitnet.cpp":
        from bitnet_convert.verification import bitnet_cpp_arithmetic

        return bitnet_cpp_arithmetic.compare(path, model, cfg, ids, logits, inputs, report)
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


def loadable_file(path: str, ckpt: Checkpoint, runtime: str, cfg: ModelConfig, tmp: Path, report) -> str | None:
    """The file the runtime loads: ours as it is for llama.cpp and bitnet.cpp; for ik_llama.cpp, requantized to
    IQ2_BN."""
    if runtime == "llama.cpp":
        return path
    if runtime == "bitnet.cpp":
        from bitnet_convert.verification import bitnet_cpp_arithmetic

        projection = bitnet_cpp_arithmetic.projection_type(path)
        if projection not in bitnet_cpp_arithmetic.PRODUCTS:
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
    out = tmp / "iq2_bn.gguf"
    refused = requantize_iq2_bn(path, out)
    if refused is not None:
        report.failures.append(f"ik_llama.cpp's llama-quantize refused the file: {refused}")
        return None
    report.notes.append("requantized to IQ2_BN by ik_llama.cpp's llama-quantize (f16 embeddings and head)")
    return str(out)


def requantize_iq2_bn(path: str | os.PathLike, out: str | os.PathLike, layout: str = "iq2_bn") -> str | None:
    """ik_llama.cpp's llama-quantize of an I2_S file to IQ2_BN (f16 embeddings and head) at `out`, or to
    `layout` "iq2_bn_r4" (the same codes, rows interleaved by four for its CPU kernels); None when it succeeds,
    else the line of its output that says why not."""
    from ik_llama_cpp.quantize import find_quantize_bin

    binary = find_quantize_bin()
    if binary is None:
        raise ConvertError("ik_llama.cpp's llama-quantize is not installed with its package")
    try:
        done = subprocess.run([str(binary), "--allow-requantize", "--token-embedding-type", "f16",
                               "--output-tensor-type", "f16", str(path), str(out), layout],
                              capture_output=True, text=True, errors="replace", timeout=600)
    except subprocess.TimeoutExpired:
        return "it did not finish within 600 s"
    if done.returncode == 0:
        return None
    lines = (done.stderr + done.stdout).strip().splitlines()
    why = [line for line in lines if "error" in line.lower() or "failed" in line.lower()] or lines[-1:] or [""]
    return why[0].strip()


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
