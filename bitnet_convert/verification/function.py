"""verify, layer 2: the function, in one engine (for an embedding model: its encoder's hidden states). The JAX engine runs the same token batches on the candidate and on
the reference (in the candidate's dtypes, with its declared casts applied: weights.Expected); the logits must be
identical, bit for bit: the same program on the same values has no rounding of its own to differ by. (The same
values in another dtype make another program: the engine reads a bf16 table as bits, an f16 one converted.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bitnet_convert.verification.report import LayerReport
from bitnet_convert.verification.weights import Expected
from bitnet_core.checkpoint import (
    TERNARY,
    Checkpoint,
    PackedLoader,
    PackedTernary,
    TensorEntry,
    Ternary,
)
from bitnet_core.config import ModelConfig

# (batch size, sequence length): a batch of 2 long enough to exercise RoPE far from 0, and shorter ones.
TOKEN_BATCHES = ((2, 160), (1, 17), (2, 48))
SEED = 1234


def token_batches(vocab_size: int, bos_token_id, shapes=TOKEN_BATCHES, seed: int = SEED) -> list[np.ndarray]:
    """Fixed, seeded token batches (two runs of verify on the same files print the same numbers)."""
    rng = np.random.default_rng(seed)
    batches = []
    for batch, length in shapes:
        ids = rng.integers(0, vocab_size, size=(batch, length), dtype=np.int64)
        if isinstance(bos_token_id, int) and 0 <= bos_token_id < vocab_size:
            ids[:, 0] = bos_token_id
        batches.append(ids)
    return batches


def engine_logits(ckpt: Checkpoint, batches: list[np.ndarray], release=None, head: str = "stored") -> list[np.ndarray]:
    """The engine's float32 logits [B, T, V] for each batch (`head` as engine.weights_from_checkpoint's); the
    weights are read tensor by tensor and dropped after (one side's weights in memory at a time)."""
    from bitnet_model import engine

    cfg = ModelConfig.from_hf(ckpt.config)
    if cfg.encoder:  # an embedding model: its last hidden states [B, T, H], the input of every pooling
        from bitnet_model.modeling import hidden_states
        from bitnet_model.params import model_from_checkpoint

        model = model_from_checkpoint(ckpt)
        return [hidden_states(model, np.asarray(ids, np.int32)) for ids in batches]
    weights = engine.weights_from_checkpoint(ckpt, release=release, head=head)
    opts = engine.Options.for_backend()
    out = [np.asarray(engine.forward(cfg, opts, weights, np.asarray(ids, np.int32))) for ids in batches]
    del weights
    return out


def compare_function(candidate: Checkpoint, reference: Checkpoint, expected: Expected, *, release=None,
                     shapes=TOKEN_BATCHES, head: str = "stored") -> LayerReport:
    """With head="int8" both sides run the opt-in int8 head (generate --head int8), which must again agree bit
    for bit; what that declared cast changes is then reported against the reference's stored head."""
    cfg = ModelConfig.from_hf(reference.config)
    batches = token_batches(cfg.vocab_size, cfg.bos_token_id, shapes)
    reference = with_expected(reference, expected)
    ref = engine_logits(reference, batches, release, head)
    cand = engine_logits(candidate, batches, release, head)
    report = LayerReport("function", True)
    if head != "stored" and not cfg.encoder:
        _report_head_cast(report, head, ref, engine_logits(reference, batches, release))
    worst, matches, positions, differing = 0.0, 0, 0, 0
    for ids, a, b in zip(batches, cand, ref):
        for name, logits in (("candidate", a), ("reference", b)):
            if not np.isfinite(logits).all():
                report.failures.append(f"the {name}'s logits hold NaN or infinite values "
                                       f"({int(np.count_nonzero(~np.isfinite(logits)))} of {logits.size})")
        if np.isfinite(a).all() and np.isfinite(b).all():
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
        differing += int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
        matches += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        positions += ids.size
    report.figures = {"max_abs_diff": worst if not report.failures else float("nan"),
                      "top1_agreement": matches / positions, "tokens_compared": positions,
                      "logits_differing": differing, **report.figures}
    if differing and not report.failures:
        report.failures.append(f"{differing} logits differ (largest |difference| {worst:.3g}): the same engine "
                               "computes another function on the candidate")
    if expected.dense or expected.multipliers:
        report.notes.append(f"reference run in the candidate's dtypes and with its declared casts "
                            f"({len(expected.dense)} tensors, {len(expected.multipliers)} multipliers)")
    report.passed = not report.failures
    return report


def with_expected(ckpt: Checkpoint, expected: Expected) -> Checkpoint:
    """`ckpt` whose tensors hold what the candidate should: each declared cast applied when loaded."""
    tensors = dict(ckpt.tensors)
    for name, cast in expected.dense.items():
        tensors[name] = _casting(tensors[name], cast)
    for name, multiplier in expected.multipliers.items():
        tensors[name] = _remultiplied(tensors[name], multiplier)
    return dataclasses.replace(ckpt, tensors=tensors)


def _casting(entry: TensorEntry, cast) -> TensorEntry:
    def load():
        value = np.asarray(entry.load())
        return np.asarray(cast(value.reshape(-1))).reshape(value.shape)

    sample = cast(np.zeros(32, entry.dtype))  # 32: a whole block of any block encoding (q8_0)
    return dataclasses.replace(entry, dtype=np.asarray(sample).dtype, load=load)


def _remultiplied(entry: TensorEntry, multiplier: np.float32) -> TensorEntry:
    from bitnet_core.quantize import as_ternary

    def load() -> Ternary:
        return Ternary(as_ternary(entry.load()).codes, multiplier)

    if entry.kind == TERNARY and entry.load_packed is not None:
        def packed() -> PackedTernary:
            value = entry.load_packed()
            return PackedTernary(value.layout, value.data, multiplier, value.where)

        return dataclasses.replace(entry, load=PackedLoader(load, packed), multiplier=multiplier)
    return dataclasses.replace(entry, kind=TERNARY, dtype=None, load=load, multiplier=multiplier)


def _report_head_cast(report: LayerReport, head: str, cast: list[np.ndarray], stored: list[np.ndarray]) -> None:
    """The declared cast of the engine's head (engine.quantize_rows: absmax int8 rows, round-half-even), against
    the same reference with its head as stored: not a failure, its size reported."""
    worst = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(cast, stored))
    scale = max(float(np.max(np.abs(b))) for b in stored)
    agree = sum(int(np.sum(a.argmax(-1) == b.argmax(-1))) for a, b in zip(cast, stored))
    positions = sum(int(np.prod(b.shape[:-1])) for b in stored)
    report.figures.update({"head_cast": head, "head_cast_max_abs_diff": worst,
                           "head_cast_top1_agreement": agree / positions})
    report.notes.append(f"declared cast: {head} head (rows of the output table rounded to int8 with a scale each); "
                        f"against the stored head, largest |logit difference| {worst:.3g} ({worst / scale:.2%} of the "
                        f"largest logit), top-1 agreement {agree / positions:.2%}")
