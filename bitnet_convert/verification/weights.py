"""verify, layer 1: the weights, compared exactly in their canonical form.

Canonical form: a projection is its ternary codes and one float32 multiplier (master weights are ternarized as
every writer does, `ternarize_master`); every other tensor is its stored values. Codes must be equal element for
element. A multiplier must be equal, or equal to the reference's after exactly the roundings the candidate's
path declares (an HF weight_scale in bf16, or its inverse: provenance `multiplier_roundings`). A dense tensor
must be bit-identical, or, where the candidate's format declares a cast (a GGUF's embedding type: bf16 -> f16,
q8_0), equal bit for bit to that cast of the reference, with the cast's loss reported. Config fields that change
the function must agree. Everything streams: one tensor of each side at a time, compared in row blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np

from bitnet_convert.verification.report import LayerReport
from bitnet_core.checkpoint import (
    DENSE,
    TERNARY,
    UNIT_OFFSET,
    Checkpoint,
    PackedLoader,
    TensorEntry,
    Ternary,
)
from bitnet_core.codecs import hf2bit
from bitnet_core.config import ModelConfig
from bitnet_core.errors import ConvertError
from bitnet_core.names import is_projection
from bitnet_core.quantize import as_ternary

# ModelConfig fields that change the function; the float ones count in float32, the precision the model computes
# with (a GGUF stores them as float32: 1e-5 comes back as 9.99999974738e-06, the same float32). The class name is
# not one: sub_norms and hidden_act say what it computes (1bitLLM's BitnetForCausalLM comes back from GGUF as
# transformers' BitNetForCausalLM, the same function).
FUNCTION_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "tie_word_embeddings",
                   "sub_norms", "encoder", "use_rms_norm", "qk_norm", "unit_offset_norms", "sandwich_norms",
                   "scale_embeddings", "layer_types", "sliding_window")
FLOAT32_FIELDS = ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar", "rope_local_theta")
BLOCK_VALUES = 1 << 22  # values compared at a time: a few MB of each side, whatever the tensor's size

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bf16(m: np.float32) -> np.float32:
    return np.float32(np.asarray(m, np.float32).astype(BF16))


# How a path can round a multiplier (docs/formats.md §2, §6): stored as a bf16 weight_scale w, or as a bf16 1/w,
# or in the values of an F16/BF16 projection.
MULTIPLIER_ROUNDINGS: dict[str, Callable[[np.float32], np.float32]] = {
    "bf16": _bf16,
    "bf16-inverse": lambda m: np.float32(1.0) / _bf16(np.float32(1.0) / np.float32(m)),
    "f16": lambda m: np.float32(np.float16(m)),  # a float projection holding codes x m (bitnet.cpp's float types)
}
# Formats whose writers declare lossy casts of dense tensors in the file itself (GGUF's embedding type); a later
# conversion of such a file carries the declaration on in provenance (`tensor_casts`).
CASTING_FORMATS = ("gguf",)


@dataclasses.dataclass
class Expected:
    """What the candidate holds where the reference's value went through a declared cast: used by the function
    layer to run the reference with the same casts (so that its logits, too, must be identical)."""

    dense: dict[str, Callable[[np.ndarray], np.ndarray]] = dataclasses.field(default_factory=dict)
    multipliers: dict[str, np.float32] = dataclasses.field(default_factory=dict)


def compare_weights(candidate: Checkpoint, reference: Checkpoint) -> tuple[LayerReport, Expected, list[str]]:
    """(the weights layer's report, what the function layer runs the reference with, the candidate's
    degenerate-weight warnings: computed from the values this pass loads, so the candidate is read once)."""
    from bitnet_convert.inspection import multiplier_outliers, tensor_report

    report = LayerReport("weights", True)
    tensor_reports, warnings = [], []
    expected = Expected()
    _compare_configs(candidate, reference, report)
    missing = [n for n in reference.tensors if n not in candidate.tensors]
    extra = [n for n in candidate.tensors if n not in reference.tensors]
    report.failures += [f"{n}: missing from the candidate" for n in missing]
    report.failures += [f"{n}: not in the reference" for n in extra]
    counts = {"tensors_compared": 0, "tensors_exact": 0, "tensors_cast": 0, "multipliers_rounded": 0}
    worst_rounding = 0.0
    kinds: dict[str, int] = {}  # lossless changes of form, counted: "stored as float32 (bfloat16 -> ...)"
    roundings = _declared_roundings(candidate, reference)
    casting = candidate.provenance.get("format") in CASTING_FORMATS
    declared = dict(candidate.provenance.get("tensor_casts") or {})  # casts made earlier on the candidate's path
    for name, ref_entry in reference.tensors.items():
        if name not in candidate.tensors:
            continue
        cand_entry, loaded = _remembering(candidate.tensors[name])
        counts["tensors_compared"] += 1
        if is_projection(name) and (ref_entry.kind == TERNARY or cand_entry.kind == TERNARY):
            outcome = _compare_ternary(name, cand_entry, ref_entry, roundings)
        else:
            outcome = _compare_dense(name, cand_entry, ref_entry, casting or name in declared)
        found, found_warnings = tensor_report(cand_entry, loaded() if loaded() is not None else cand_entry.load())
        tensor_reports.append(found)
        warnings += found_warnings
        if outcome.failure:
            report.failures.append(outcome.failure)
            continue
        if outcome.note:
            report.notes.append(outcome.note)
        if outcome.kind:
            kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
        if outcome.rounded is not None:
            counts["multipliers_rounded"] += 1
            worst_rounding = max(worst_rounding, outcome.rounded)
            expected.multipliers[name] = outcome.candidate_multiplier
        if outcome.cast is not None:  # the function layer runs the reference in the candidate's dtype
            expected.dense[name] = outcome.cast
        counts["tensors_cast" if outcome.lossy else "tensors_exact"] += 1
    report.notes += [f"{count} tensors {kind}" for kind, count in kinds.items()]
    if counts["multipliers_rounded"]:
        report.notes.append(f"{counts['multipliers_rounded']} multipliers rounded as the path declares "
                            f"({', '.join(roundings)}): largest relative change {worst_rounding:.3g}")
    report.figures = {**counts, "max_multiplier_rel_rounding": worst_rounding}
    report.passed = not report.failures
    return report, expected, warnings + multiplier_outliers(tensor_reports)


def _remembering(entry: TensorEntry) -> tuple[TensorEntry, Callable]:
    """`entry` whose load keeps what it loaded, and a function that returns it (None until loaded)."""
    kept: list = []

    def load():
        if not kept:
            kept.append(entry.load())
        return kept[0]

    loader = PackedLoader(load, entry.load_packed) if entry.load_packed is not None else load
    return dataclasses.replace(entry, load=loader), lambda: kept[0] if kept else None


# ----------------------------------------------------------------------------------------------- config


def _compare_configs(candidate: Checkpoint, reference: Checkpoint, report: LayerReport) -> None:
    cand, ref = ModelConfig.from_hf(candidate.config), ModelConfig.from_hf(reference.config)
    for field in FUNCTION_FIELDS:
        if getattr(cand, field) != getattr(ref, field):
            report.failures.append(f"config {field}: candidate {getattr(cand, field)!r}, "
                                   f"reference {getattr(ref, field)!r}")
    for field in FLOAT32_FIELDS:
        a, b = (np.float32(np.nan if v is None else v) for v in (getattr(cand, field), getattr(ref, field)))
        if a != b and not (np.isnan(a) and np.isnan(b)):
            report.failures.append(f"config {field}: candidate {float(a)!r}, reference {float(b)!r} (as float32)")


# -------------------------------------------------------------------------------------------- tensors


@dataclasses.dataclass
class Outcome:
    failure: str | None = None
    note: str | None = None  # a finding of its own (a lossy cast)
    kind: str | None = None  # a lossless change of form, reported as a count
    cast: Callable[[np.ndarray], np.ndarray] | None = None  # reference value -> what the candidate holds
    lossy: bool = False  # the cast changed values (a declared cast), not just their dtype
    rounded: float | None = None  # relative change of a declared multiplier rounding
    candidate_multiplier: np.float32 | None = None


def _declared_roundings(candidate: Checkpoint, reference: Checkpoint) -> list[str]:
    """The multiplier roundings the candidate went through that the reference did not."""
    cand = list(candidate.provenance.get("multiplier_roundings") or [])
    ref = list(reference.provenance.get("multiplier_roundings") or [])
    for ckpt, roundings in ((candidate, cand), (reference, ref)):
        unknown = [r for r in roundings if r not in MULTIPLIER_ROUNDINGS]
        if unknown:  # a record written by a newer version, or edited: what it declares cannot be checked
            raise ConvertError(f"{ckpt.provenance.get('path')}: provenance records a multiplier rounding "
                               f"{unknown[0]!r:.40} this bitnet-convert does not know "
                               f"({', '.join(MULTIPLIER_ROUNDINGS)})")
    return cand[len(ref):] if cand[: len(ref)] == ref else [r for r in cand if r not in ref]


def _compare_ternary(name: str, cand: TensorEntry, ref: TensorEntry, roundings: list[str]) -> Outcome:
    if cand.kind == DENSE and ref.kind == DENSE:  # both master weights: compared as stored
        return _compare_dense(name, cand, ref, casting=False)
    same_codes, cand_m, ref_m = _same_codes(cand, ref)
    if same_codes is not True:
        return Outcome(failure=f"{name}: {same_codes}")
    kind = None
    if DENSE in (cand.kind, ref.kind):
        kind = "held as master weights on one side: compared by their ternarization (as every writer makes it)"
    if cand_m == ref_m:
        return Outcome(kind=kind)
    rounded = ref_m
    for rounding in roundings:
        rounded = MULTIPLIER_ROUNDINGS[rounding](rounded)
    if roundings and rounded == cand_m:
        change = float(abs(np.float64(cand_m) - np.float64(ref_m)) / np.float64(ref_m))
        return Outcome(kind=kind, rounded=change, candidate_multiplier=cand_m)
    declared = f" (after the declared {', '.join(roundings)} rounding: {rounded!r})" if roundings else ""
    return Outcome(failure=f"{name}: multiplier {cand_m!r} in the candidate, {ref_m!r} in the reference{declared}")


def _same_codes(cand: TensorEntry, ref: TensorEntry) -> tuple[bool | str, np.float32, np.float32]:
    """(True or what differs, candidate multiplier, reference multiplier). Stored HF 2-bit bytes on both sides
    compare as bytes; anything else (or a difference, to say where) as int8 codes."""
    cand_packed, ref_packed = _packed(cand), _packed(ref)
    if cand_packed is not None and ref_packed is not None:
        if np.array_equal(cand_packed.data, ref_packed.data):
            return True, np.float32(cand_packed.multiplier), np.float32(ref_packed.multiplier)
    a, b = _ternary(cand), _ternary(ref)
    if a.shape != b.shape:
        return f"codes of shape {list(a.shape)} in the candidate, {list(b.shape)} in the reference", a.multiplier, b.multiplier
    differ = np.flatnonzero(a.codes.reshape(-1) != b.codes.reshape(-1))
    if differ.size:
        index = tuple(int(i) for i in np.unravel_index(int(differ[0]), a.shape))
        return (f"{differ.size} ternary codes differ, the first at {list(index)}: candidate {int(a.codes[index])}, "
                f"reference {int(b.codes[index])}"), a.multiplier, b.multiplier
    return True, a.multiplier, b.multiplier


def _packed(entry: TensorEntry):
    if entry.kind != TERNARY or entry.load_packed is None:
        return None
    value = entry.load_packed()
    return value if value.layout == hf2bit.LAYOUT else None


def _ternary(entry: TensorEntry) -> Ternary:
    return as_ternary(entry.load())


def _compare_dense(name: str, cand: TensorEntry, ref: TensorEntry, casting: bool) -> Outcome:
    a, b = np.asarray(cand.load()), np.asarray(ref.load())
    if isinstance(a, Ternary) or isinstance(b, Ternary) or a.shape != b.shape:
        return Outcome(failure=f"{name}: shape {list(np.shape(a))} in the candidate, {list(np.shape(b))} in the reference")
    encoding = cand.encoding
    if a.dtype == b.dtype and encoding is None:
        first, _, _ = _against_cast(a, b, lambda block: block)
        if first is None:
            return Outcome()
        return Outcome(failure=_difference(name, a, b, first))
    cast = _cast_to(a.dtype, encoding)
    first, changed, worst = _against_cast(a, b, cast)
    if first is not None:
        how = f" (the reference cast to {encoding or a.dtype})" if casting else ""
        return Outcome(failure=_difference(name, a, b, first, how))
    if changed and not casting:
        return Outcome(failure=f"{name}: stored as {a.dtype} in the candidate, {b.dtype} in the reference: "
                               f"{changed} values changed, which this format does not declare")
    what = f"{b.dtype} -> {encoding or a.dtype}"
    if not changed:
        return Outcome(kind=f"stored as {encoding or a.dtype} ({what} holds every value exactly)", cast=cast)
    return Outcome(note=f"{name}: declared cast {what}: {changed} of {b.size} values changed, largest |error| "
                        f"{worst:.3g}", cast=cast, lossy=True)


def _cast_to(dtype: np.dtype, encoding: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """reference values -> the values a candidate stored as `dtype` (after `encoding`, e.g. GGUF q8_0) holds."""
    if encoding == UNIT_OFFSET:  # a Gemma norm stored as f32(1 + w) and read back as f32(stored - 1)
        return lambda block: ((np.asarray(block, np.float32) + np.float32(1)) - np.float32(1)).astype(dtype)
    if encoding is not None:
        from gguf import GGMLQuantizationType, quants

        kind = GGMLQuantizationType[encoding.upper()]

        def encode(block: np.ndarray) -> np.ndarray:
            values = np.asarray(block, np.float32)
            return quants.dequantize(quants.quantize(values, kind), kind).astype(dtype)

        return encode
    return lambda block: np.asarray(block).astype(np.float32).astype(dtype)


def _blocks(cand: np.ndarray, ref: np.ndarray):
    """(offset, candidate block, reference block) over the flattened arrays, BLOCK_VALUES at a time (a multiple
    of every block size a cast quantizes in: q8_0 takes 32 consecutive values of a row)."""
    a, b = cand.reshape(-1), ref.reshape(-1)
    for start in range(0, a.size, BLOCK_VALUES):
        yield start, np.ascontiguousarray(a[start:start + BLOCK_VALUES]), b[start:start + BLOCK_VALUES]


def _against_cast(cand: np.ndarray, ref: np.ndarray, cast) -> tuple[tuple[int, ...] | None, int, float]:
    """(first index where `cand` differs bit for bit from cast(ref) or None, values the cast changes, largest
    |change|), in one pass over the blocks. The change is measured in float32, which holds every value of the
    16-bit types exactly."""
    first, changed, worst = None, 0, 0.0
    for start, a, b in _blocks(cand, ref):
        expected = np.ascontiguousarray(cast(b))
        bits = a.view(np.dtype(f"u{a.dtype.itemsize}")) != expected.view(np.dtype(f"u{expected.dtype.itemsize}"))
        if first is None and bits.any():
            flat = start + int(np.flatnonzero(bits)[0])
            first = tuple(int(i) for i in np.unravel_index(flat, cand.shape)) if cand.ndim else ()
        delta = np.abs(expected.astype(np.float32) - b.astype(np.float32))
        changed += int(np.count_nonzero(delta))
        worst = max(worst, float(delta.max()) if delta.size else 0.0)
    return first, changed, worst


def _difference(name: str, cand: np.ndarray, ref: np.ndarray, index: tuple[int, ...], how: str = "") -> str:
    where = list(index)
    a, b = cand[index], ref[index]
    return (f"{name}: differs at {where}: candidate {float(a)!r} ({cand.dtype}), reference {float(b)!r} "
            f"({ref.dtype}){how}")
