"""`verify`: run a candidate checkpoint in the JAX model and transformers' BitNet on the same tokens.

The batches are fixed and seeded, so two runs of `verify` on the same files print the same numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import ConvertError

# (batch size, sequence length): a batch of 2 long enough to exercise RoPE far from 0, and shorter ones.
TOKEN_BATCHES = ((2, 160), (1, 17), (2, 48))
SEED = 1234

# Pass thresholds. Our model sums int8 x ternary products exactly; transformers sums dequantized floats, so an
# activation that lands within one float ulp of k + 1/2 rounds to neighbouring int8 values in the two models
# (a rounding tie), and every later position of that row moves a little. On the tiny test models such ties move
# logits by up to ~1% of the largest logit with KL ~1e-5; a lost bf16 bit of a multiplier moves them less; a
# wrong multiplier (x1.5 on one projection) moves them by >15% with KL > 1e-2. The defaults sit between.
DEFAULT_RTOL = 5e-2
DEFAULT_MIN_TOP1 = 0.99
DEFAULT_MAX_KL = 1e-3


@dataclasses.dataclass
class VerifyResult:
    candidate: str
    reference: str
    candidate_format: str
    max_abs_diff: float
    max_abs_reference: float
    tolerance: float
    top1_agreement: float
    mean_kl: float
    tokens_compared: int
    min_top1: float
    max_kl: float
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff <= self.tolerance and self.top1_agreement >= self.min_top1
                and self.mean_kl <= self.max_kl)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        d["max_rel_diff"] = self.max_abs_diff / max(self.max_abs_reference, 1e-30)
        return d

    def table(self) -> str:
        rows = [
            ("candidate", f"{self.candidate} ({self.candidate_format})"),
            ("reference", self.reference),
            ("tokens compared", str(self.tokens_compared)),
            ("max |logit diff|", f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})"),
            ("top-1 agreement", f"{self.top1_agreement:.4f} (at least {self.min_top1})"),
            ("mean KL(ref || cand)", f"{self.mean_kl:.3g} (at most {self.max_kl:.3g})"),
            ("result", "PASS" if self.passed else "FAIL"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def token_batches(vocab_size: int, bos_token_id: int | None) -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    batches = []
    for batch, length in TOKEN_BATCHES:
        ids = rng.integers(0, vocab_size, size=(batch, length), dtype=np.int64)
        if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
            ids[:, 0] = bos_token_id
        batches.append(ids)
    return batches


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, int, float]:
    """(max |diff|, summed KL(ref||cand), top-1 matches, max |ref|) over all positions."""
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    diff = float(np.max(np.abs(ref - cand)))
    log_p = ref - _logsumexp(ref)
    log_q = cand - _logsumexp(cand)
    kl = float(np.sum(np.exp(log_p) * (log_p - log_q)))
    matches = int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
    return diff, kl, matches, float(np.max(np.abs(ref)))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    return top + np.log(np.sum(np.exp(x - top), -1, keepdims=True))


def run_verify(candidate: str, reference: str, *, revision: str | None = None, rtol: float = DEFAULT_RTOL,
               atol: float = 0.0, min_top1: float = DEFAULT_MIN_TOP1, max_kl: float = DEFAULT_MAX_KL) -> VerifyResult:
    import bitnet_model

    from . import hub, registry
    from .inspect import degenerate_weight_warnings
    from .reference import load_reference, reference_logits

    candidate_format = registry.detect_input_format(candidate)
    ckpt = registry.read_checkpoint(candidate, candidate_format)
    warnings = degenerate_weight_warnings(ckpt)
    reference_dir = hub.resolve_source(reference, revision)
    ref_model = load_reference(reference_dir)
    ref_vocab = int(ref_model.config.vocab_size)
    if ref_vocab != int(ckpt.config["vocab_size"]):
        raise ConvertError(f"{candidate}: vocabulary of {ckpt.config['vocab_size']} tokens, reference has {ref_vocab}")
    jax_model = bitnet_model.model_from_checkpoint(ckpt)

    max_diff = max_ref = kl_sum = 0.0
    matches = positions = 0
    for ids in token_batches(ref_vocab, ckpt.config.get("bos_token_id")):
        ref = reference_logits(ref_model, ids)
        cand = np.asarray(bitnet_model.logits(jax_model, ids), dtype=np.float32)
        diff, kl, top1, ref_max = compare_logits(ref, cand)
        max_diff, max_ref = max(max_diff, diff), max(max_ref, ref_max)
        kl_sum += kl
        matches += top1
        positions += ids.size
    return VerifyResult(
        candidate=candidate,
        reference=reference,
        candidate_format=candidate_format,
        max_abs_diff=max_diff,
        max_abs_reference=max_ref,
        tolerance=atol + rtol * max_ref,
        top1_agreement=matches / positions,
        mean_kl=kl_sum / positions,
        tokens_compared=positions,
        min_top1=min_top1,
        max_kl=max_kl,
        warnings=warnings,
    )
