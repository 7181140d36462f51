"""`inspect`: what a checkpoint holds, its ternary statistics, its integrity, and degenerate weights."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from bitnet_core.checkpoint import DENSE, TERNARY, Checkpoint, Ternary
from bitnet_core.errors import ConvertError
from bitnet_core.names import is_projection

# Degenerate-weight thresholds: a trained BitNet has ~60% non-zeros and sibling multipliers within ~2x.
MIN_NONZERO_SHARE = 0.01
BLOCK_VALUES = 1 << 22  # values checked at a time (a few MB in float32)
MAX_MULTIPLIER_RATIO = 4.0


@dataclasses.dataclass
class TensorReport:
    name: str
    kind: str
    shape: list[int]
    dtype: str
    share_minus: float | None = None
    share_zero: float | None = None
    share_plus: float | None = None
    multiplier: float | None = None


@dataclasses.dataclass
class TensorChange:
    """What changed in one tensor from a starting checkpoint: ternary codes flipped (masters compared by the codes
    they quantize to) and the multiplier before/after; for a dense tensor, values changed and the largest change."""

    name: str
    changed: int  # codes flipped, or dense values that differ
    total: int
    multiplier_before: float | None = None
    multiplier_after: float | None = None
    max_abs_change: float | None = None


@dataclasses.dataclass
class InspectReport:
    path: str
    format: str
    size_bytes: int
    config: dict
    provenance: dict | None
    tensors: list[TensorReport]
    warnings: list[str]
    recorded_hash: str | None = None
    computed_hash: str | None = None
    hash_algorithm: str | None = None  # the one the file records, which the check recomputes
    hash_note: str | None = None  # what an older algorithm's hash does not cover
    checked: bool = False
    against: str | None = None  # the starting checkpoint `changes` compares with
    changes: list[TensorChange] | None = None

    @property
    def check_passed(self) -> bool:
        return self.checked and self.recorded_hash is not None and self.recorded_hash == self.computed_hash

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["check_passed"] = self.check_passed if self.checked else None
        return d

    def text(self) -> str:
        cfg = self.config
        lines = [
            f"path          {self.path}",
            f"format        {self.format}   ({self.size_bytes:,} bytes)",
            f"architecture  {(cfg.get('architectures') or ['?'])[0]}   hidden {cfg.get('hidden_size')}  ffn "
            f"{cfg.get('intermediate_size')}  layers {cfg.get('num_hidden_layers')}  heads "
            f"{cfg.get('num_attention_heads')}/{cfg.get('num_key_value_heads')}  vocab {cfg.get('vocab_size')}  "
            f"act {cfg.get('hidden_act')}  tied {cfg.get('tie_word_embeddings')}",
        ]
        if self.provenance:
            lines.append(f"source        {self.provenance.get('source')} ({self.provenance.get('source_format')})")
        if self.checked:
            verdict = "OK" if self.check_passed else ("NO RECORDED HASH" if self.recorded_hash is None else "MISMATCH")
            lines.append(f"content hash  {self.computed_hash}  {verdict}  ({self.hash_algorithm})")
            if self.hash_note:
                lines.append(f"hash note     {self.hash_note}")
        lines.append("")
        width = max((len(t.name) for t in self.tensors), default=4)
        lines.append(f"{'tensor':<{width}}  {'shape':<14} {'dtype':<9} {'-1':>6} {'0':>6} {'+1':>6}  multiplier")
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            if t.share_zero is not None:
                stats = f"{t.share_minus:6.3f} {t.share_zero:6.3f} {t.share_plus:6.3f}  {t.multiplier:.6g}"
            else:
                stats = ""
            lines.append(f"{t.name:<{width}}  {shape:<14} {t.dtype:<9} {stats}")
        if self.changes is not None:
            lines += ["", *changes_text(self.changes, self.against)]
        return "\n".join(lines)


def changes_text(changes: list[TensorChange], against: str) -> list[str]:
    moved = [c for c in changes if c.changed or c.multiplier_before != c.multiplier_after]
    lines = [f"against {against}: {len(moved)} of {len(changes)} tensors changed"]
    width = max((len(c.name) for c in moved), default=4)
    for c in moved:
        if c.multiplier_before is not None:
            what = (f"{c.changed:>9,} of {c.total:,} codes flipped ({100 * c.changed / max(c.total, 1):.2f}%)  "
                    f"multiplier {c.multiplier_before:.6g} -> {c.multiplier_after:.6g}")
        else:
            what = f"{c.changed:>9,} of {c.total:,} values changed, by at most {c.max_abs_change:.3g}"
        lines.append(f"  {c.name:<{width}}  {what}")
    return lines


def tensor_changes(ckpt: Checkpoint, start: Checkpoint, start_path: str) -> list[TensorChange]:
    """Per tensor, what changed from `start` (same model shape: same tensor names and shapes)."""
    names, start_names = [e.name for e in ckpt], {e.name for e in start}
    if set(names) != start_names:
        missing = sorted(start_names ^ set(names))
        raise ConvertError(f"{start_path}: holds other tensors than the model inspected ({', '.join(missing[:3])})")
    changes = []
    for entry in ckpt:
        before_entry = start.tensors[entry.name]
        if tuple(before_entry.shape) != tuple(entry.shape):
            raise ConvertError(f"{start_path}: {entry.name} has shape {list(before_entry.shape)}, the model "
                               f"inspected {list(entry.shape)}")
        after, before = entry.load(), before_entry.load()
        t_after, t_before = _ternary_of(entry, after), _ternary_of(before_entry, before)
        if t_after is not None and t_before is not None:
            changes.append(TensorChange(entry.name, int(np.count_nonzero(t_after.codes != t_before.codes)),
                                        int(t_after.codes.size), float(t_before.multiplier), float(t_after.multiplier)))
        else:
            a, b = np.asarray(after, np.float32), np.asarray(before, np.float32)
            diff = np.abs(a - b)
            changes.append(TensorChange(entry.name, int(np.count_nonzero(a != b)), int(a.size),
                                        max_abs_change=float(diff.max()) if diff.size else 0.0))
    return changes


def _ternary_of(entry, value) -> Ternary | None:
    if isinstance(value, Ternary):
        return value
    if entry.kind == DENSE and is_projection(entry.name):  # float master weights: show what they quantize to
        from bitnet_core.quantize import ternarize_master

        return ternarize_master(value)
    return None


def tensor_reports(ckpt: Checkpoint) -> tuple[list[TensorReport], list[str]]:
    reports, warnings = [], []
    for entry in ckpt:
        report, found = tensor_report(entry, entry.load())
        reports.append(report)
        warnings += found
    return reports, warnings + multiplier_outliers(reports)


def tensor_report(entry, value) -> tuple[TensorReport, list[str]]:
    """One tensor's report and its degenerate-weight warnings, from its loaded value (verify passes the values
    it loads anyway, so a checkpoint is read once)."""
    ternary = _ternary_of(entry, value)
    dtype = "ternary" if entry.kind == TERNARY else str(entry.dtype)
    report, warnings = TensorReport(entry.name, entry.kind, list(entry.shape), dtype), []
    if ternary is not None:
        codes, size = ternary.codes, max(ternary.codes.size, 1)
        zero, plus = int(np.count_nonzero(codes == 0)), int(np.count_nonzero(codes > 0))  # int8 passes, no widening
        report.share_minus, report.share_zero, report.share_plus = (codes.size - zero - plus) / size, zero / size, plus / size
        report.multiplier = float(ternary.multiplier)
        if report.share_zero == 1.0:
            warnings.append(f"{entry.name}: all-zero ternary weight")
        elif 1.0 - report.share_zero < MIN_NONZERO_SHARE:
            warnings.append(f"{entry.name}: only {100 * (1 - report.share_zero):.2f}% non-zero weights")
    else:
        warnings += _dense_warnings(entry.name, np.asarray(value))
    return report, warnings


def _dense_warnings(name: str, values: np.ndarray) -> list[str]:
    """An all-zero tensor, or one holding NaN or infinite values (a model computing with them outputs NaN)."""
    flat, bad, nonzero = values.reshape(-1), 0, False
    for start in range(0, flat.size, BLOCK_VALUES):  # float32 a block at a time: a 2B4T embedding is 328 M values
        block = flat[start:start + BLOCK_VALUES].astype(np.float32)
        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
        nonzero = nonzero or bool(np.any(block))
    if bad:
        return [f"{name}: {bad} of {values.size} values are NaN or infinite"]
    return [] if nonzero else [f"{name}: all-zero tensor"]


def multiplier_outliers(reports: list[TensorReport]) -> list[str]:
    """Multipliers more than MAX_MULTIPLIER_RATIO away from the median of the same projection in other layers."""
    by_kind: dict[str, list[TensorReport]] = defaultdict(list)
    for r in reports:
        if r.multiplier is not None:
            by_kind[r.name.split(".", 3)[-1]].append(r)
    warnings = []
    for siblings in by_kind.values():
        if len(siblings) < 3:
            continue
        median = float(np.median([r.multiplier for r in siblings]))
        for r in siblings:
            ratio = r.multiplier / median if median > 0 else float("inf")
            if not (1 / MAX_MULTIPLIER_RATIO <= ratio <= MAX_MULTIPLIER_RATIO):
                warnings.append(f"{r.name}: multiplier {r.multiplier:.4g} is {ratio:.3g}x the median of its siblings")
    return warnings


def degenerate_weight_warnings(ckpt: Checkpoint) -> list[str]:
    return tensor_reports(ckpt)[1]


def _size(path: Path, module) -> int:
    """Bytes on disk: a folder's files, a file, or every file of a split GGUF set (the format's `files`)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    files = module.files(path) if hasattr(module, "files") else [path]
    return sum(p.stat().st_size for p in files)


def inspect_path(path: str, *, check: bool = False, revision: str | None = None,
                 against: str | None = None) -> InspectReport:
    from bitnet_convert.fileio import hub
    from bitnet_convert.formats import registry

    fmt = registry.detect_input_format(path)
    local = hub.resolve_source(path, revision) if fmt == "hf" else Path(path)
    module = registry.format_module(fmt)
    ckpt = registry.read_checkpoint(os.fspath(local), fmt)
    tensors, warnings = tensor_reports(ckpt)
    provenance = module.recorded_provenance(local)
    report = InspectReport(os.fspath(path), fmt, _size(Path(local), module), ckpt.config, provenance, tensors, warnings)
    if check:
        _check_content_hash(report, module, local)
    if against is not None:
        start = registry.read_checkpoint(os.fspath(against), registry.detect_input_format(os.fspath(against)))
        report.against, report.changes = os.fspath(against), tensor_changes(ckpt, start, os.fspath(against))
    return report


def _check_content_hash(report: InspectReport, module, local) -> None:
    """Recompute the content hash by the algorithm the file records: an older one is still checked, and the
    report says what it does not cover."""
    from bitnet_convert.fileio import integrity

    report.checked = True
    recorded = report.provenance or {}
    report.recorded_hash = recorded.get("content_hash")
    if report.recorded_hash is None:
        raise ConvertError(f"{report.path}: records no content hash (not written by bitnet-convert); nothing to check")
    algorithm = recorded.get("hash_algorithm")
    if not isinstance(algorithm, str) or algorithm not in integrity.HASH_COVERAGE:  # a list is unhashable
        raise ConvertError(f"{report.path}: records a content hash by {algorithm!r}, an algorithm this bitnet-convert "
                           f"does not know (it checks {', '.join(integrity.HASH_COVERAGE)})")
    report.hash_algorithm = algorithm
    report.computed_hash = integrity.hash_stored(module.stored_tensor_bytes(local), algorithm)
    if algorithm not in integrity.FULL_COVERAGE:  # v2 covers what v3 does, in one stream: nothing to note
        report.hash_note = (f"{algorithm} covers {integrity.HASH_COVERAGE[algorithm]}; convert the model again "
                            f"for a {integrity.HASH_ALGORITHM} hash")
