"""Fine-tune a BitNet from bf16 master weights, export it, and prove the export.

    python examples/finetune.py OUT_DIR [--start ONLINE_HF] [--steps 20]

1. The starting checkpoint: bf16 masters in the `online` layout, as microsoft/bitnet-b1.58-2B-4T-bf16 ships.
   Without --start, the built-in model's codes are made masters (codes x multiplier / density, which ternarize
   back to the same codes) and written as OUT_DIR/start-online.
2. Read into a training-mode model (float32 masters, ternarized in every forward with a straight-through
   estimator) and trained a few steps on new text: a fact the built-in model was never told, mixed with its own
   text so it keeps the rest.
3. The masters rounded to bf16 (what the `online` layout stores), then written twice: as masters in the layout
   they came in (OUT_DIR/finetuned-online) and, through `export_inference`, as packed codes (`autobitlinear`,
   OUT_DIR/finetuned-hf), then GGUF for llama.cpp (OUT_DIR/finetuned-tq2_0.gguf).
4. `verify` proves each export against the one before it; `inspect --against` lists what changed from the start.

The same from the command line, after this script: `bitnet-convert verify OUT/finetuned-tq2_0.gguf --reference
OUT/finetuned-hf` and `bitnet-convert inspect OUT/finetuned-hf --against OUT/start-online`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

import bitnet_convert as bc
from bitnet_convert.builtin import MODEL_DIR, corpus
from bitnet_model import checkpoint_from_model, export_inference, model_from_checkpoint
from bitnet_model.training import train_step_jit

NEW_FACT = "the color of a frog is green."
PROMPT = "the color of a frog is"
LEARNING_RATE = 1e-3
BATCH, WINDOW = 8, 48


def start_checkpoint(out: Path) -> Path:
    """The built-in model as bf16 masters in the `online` layout (2B4T-bf16's)."""
    path = out / "start-online"
    model = model_from_checkpoint(bc.read(MODEL_DIR), mode="training")  # masters that ternarize to its codes
    ckpt = checkpoint_from_model(model, tokenizer_files=bc.read(MODEL_DIR).tokenizer_files,
                                 provenance={"format": "example", "source": "examples/finetune.py start"},
                                 keep_stored_dtypes=False)
    bc.write(bf16(ckpt), path, format="hf", layout="online", force=True)
    return path


def bf16(ckpt):
    """Every dense tensor rounded to bf16: the `online` layout's dtype."""
    from bitnet_core.checkpoint import Checkpoint

    arrays = {e.name: np.asarray(e.load(), np.float32).astype(ml_dtypes.bfloat16) for e in ckpt}
    return Checkpoint.from_arrays(ckpt.config, arrays, tokenizer_files=ckpt.tokenizer_files, provenance=ckpt.provenance)


def training_batches(tokenizer, seed: int = 0):
    """Windows of 48 tokens from document starts; every document of the built-in text holds the new fact."""
    rng = np.random.default_rng(seed)
    while True:
        rows = []
        for _ in range(BATCH):
            sentences = corpus.document(rng).split(". ")
            sentences.insert(int(rng.integers(len(sentences) + 1)), NEW_FACT[:-1])
            ids = tokenizer.encode(". ".join(s.rstrip(".") for s in sentences) + ".").ids
            while len(ids) < WINDOW:  # a short document is followed by the next, as in training
                ids += tokenizer.encode(corpus.document(rng)).ids
            rows.append(ids[:WINDOW])
        yield jnp.asarray(rows, jnp.int32)


def round_to_bf16(model) -> None:
    """Each master weight (and norm, embedding) to its nearest bf16: what the `online` layout will store, so the
    masters written and the codes exported from them are one model."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(var.get_value(), jnp.bfloat16).astype(jnp.float32))


def greedy_text(path: Path, tokenizer) -> str:
    return bc.generate(path, tokenizer.encode(PROMPT).ids, max_new_tokens=4, greedy=True).text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--start", type=Path, default=None, help="an HF folder of bf16 masters (`online` layout)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = args.start or start_checkpoint(args.out)
    source = bc.read(start)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(source.tokenizer_files["tokenizer.json"].decode())
    print(f"start: {start}; {PROMPT!r} ->{greedy_text(start, tokenizer)!r}")

    model = model_from_checkpoint(source, mode="training")
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    batches = training_batches(tokenizer)
    for step in range(1, args.steps + 1):
        loss = float(train_step_jit(model, optimizer, next(batches)))
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss:.3f}")
    round_to_bf16(model)

    masters, packed = args.out / "finetuned-online", args.out / "finetuned-hf"
    gguf = args.out / "finetuned-tq2_0.gguf"
    provenance = {"format": "example", "source": f"examples/finetune.py from {start}"}
    bc.write(checkpoint_from_model(model, tokenizer_files=source.tokenizer_files, provenance=provenance),
             masters, format="hf", layout="online", force=True)
    bc.write(checkpoint_from_model(export_inference(model), tokenizer_files=source.tokenizer_files,
                                   provenance=provenance), packed, format="hf", layout="autobitlinear", force=True)
    bc.convert(packed, gguf, target="llama.cpp", force=True)
    print(f"fine-tuned: {PROMPT!r} ->{greedy_text(packed, tokenizer)!r}")

    passed = True
    for candidate, reference in ((packed, masters), (gguf, packed)):
        report = bc.verify(candidate, reference)
        passed &= report.passed
        print(f"verify {candidate.name} --reference {reference.name}: {'PASS' if report.passed else 'FAIL'} "
              f"(max|dlogit| {report.layer('function').figures['max_abs_diff']:g})")
    print(bc.inspect(packed, against=start).text().split("\n\n")[-1])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
