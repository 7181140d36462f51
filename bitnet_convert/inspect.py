"""`inspect`: what a checkpoint holds, its ternary statistics, its integrity, and degenerate weights."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from .checkpoint import DENSE, TERNARY, Checkpoint, Ternary
from .errors import ConvertError
from .names import is_projection

# Degenerate-weight thresholds: a trained BitNet has ~60% non-zeros and sibling multipliers within ~2x.
MIN_NONZERO_SHARE = 0.01
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
    checked: bool = False

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
            lines.append(f"content hash  {self.computed_hash}  {verdict}")
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
        return "\n".join(lines)


def _ternary_of(entry, value) -> Ternary | None:
    if isinstance(value, Ternary):
        return value
    if entry.kind == DENSE and is_projection(entry.name):  # float master weights: show what they quantize to
        from .formats.hf import ternarize_master

        return ternarize_master(value)
    return None


def tensor_reports(ckpt: Checkpoint) -> tuple[list[TensorReport], list[str]]:
    reports, warnings = [], []
    for entry in ckpt:
        value = entry.load()
        ternary = _ternary_of(entry, value)
        dtype = "ternary" if entry.kind == TERNARY else str(entry.dtype)
        report = TensorReport(entry.name, entry.kind, list(entry.shape), dtype)
        if ternary is not None:
            counts = np.bincount((ternary.codes.ravel() + 1).astype(np.intp), minlength=3) / max(ternary.codes.size, 1)
            report.share_minus, report.share_zero, report.share_plus = (float(c) for c in counts)
            report.multiplier = float(ternary.multiplier)
            if report.share_zero == 1.0:
                warnings.append(f"{entry.name}: all-zero ternary weight")
            elif 1.0 - report.share_zero < MIN_NONZERO_SHARE:
                warnings.append(f"{entry.name}: only {100 * (1 - report.share_zero):.2f}% non-zero weights")
        elif not np.any(np.asarray(value, dtype=np.float32)):
            warnings.append(f"{entry.name}: all-zero tensor")
        reports.append(report)
    return reports, warnings + _multiplier_outliers(reports)


def _multiplier_outliers(reports: list[TensorReport]) -> list[str]:
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


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def inspect_path(path: str, *, check: bool = False, revision: str | None = None) -> InspectReport:
    from . import hub, registry
    from .integrity import hash_stored

    fmt = registry.detect_input_format(path)
    local = hub.resolve_source(path, revision) if fmt == "hf" else Path(path)
    module = registry.format_module(fmt)
    ckpt = registry.read_checkpoint(os.fspath(local), fmt)
    tensors, warnings = tensor_reports(ckpt)
    provenance = module.recorded_provenance(local)
    report = InspectReport(os.fspath(path), fmt, _size(Path(local)), ckpt.config, provenance, tensors, warnings)
    if check:
        report.checked = True
        report.recorded_hash = (provenance or {}).get("content_hash")
        report.computed_hash = hash_stored(module.stored_tensor_bytes(local))
        if report.recorded_hash is None:
            raise ConvertError(f"{path}: records no content hash (not written by bitnet-convert); nothing to check")
    return report
