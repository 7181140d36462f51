"""What each layer of `verify` found: a verdict, the figures behind it, and one line per finding."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class LayerReport:
    """One layer of the proof (weights, function, parity, runtime).

    passed: None when the layer could not run (skipped: `note` says why); a skipped layer fails nothing.
    failures: one line each, naming the tensor / layer / position and both values.
    notes: what passed with a stated precision (declared casts, rounding ties accounted for) and why.
    figures: numbers for scripts (max differences, counts), JSON-safe.
    """

    name: str
    passed: bool | None
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **self.figures, "failures": self.failures, "notes": self.notes}

    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "skipped"}[self.passed]


@dataclasses.dataclass
class VerifyReport:
    candidate: str
    reference: str
    candidate_format: str
    layers: list[LayerReport]
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every layer that ran passed (and at least one ran)."""
        ran = [layer for layer in self.layers if layer.passed is not None]
        return bool(ran) and all(layer.passed for layer in ran)

    def layer(self, name: str) -> LayerReport | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        function = self.layer("function")
        figures = function.figures if function is not None else {}
        return {
            "passed": self.passed,
            "candidate": self.candidate,
            "candidate_format": self.candidate_format,
            "reference": self.reference,
            # kept for scripts: the same-engine comparison's figures
            "max_abs_diff": figures.get("max_abs_diff"),
            "top1_agreement": figures.get("top1_agreement"),
            "tokens_compared": figures.get("tokens_compared"),
            "layers": {layer.name: layer.as_dict() for layer in self.layers},
            "warnings": self.warnings,
        }  # the CLI prints it with jsonout.dumps: strict JSON, a NaN figure as null (its failure line says NaN)

    def text(self) -> str:
        lines = [f"candidate  {self.candidate} ({self.candidate_format})", f"reference  {self.reference}"]
        for layer in self.layers:
            summary = ", ".join(f"{k} {_short(v)}" for k, v in layer.figures.items())
            lines.append(f"{layer.name:<9}  {layer.verdict():<7}  {summary}")
            lines += [f"    FAIL {line}" for line in layer.failures]
            lines += [f"    note {line}" for line in layer.notes]
        lines.append(f"result     {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
