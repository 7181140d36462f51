"""Sentences per second of `bitnet_convert.embed` (our Embedder: the JAX model, batched, jitted) beside the same
model in transformers (Qwen3Model with BitNet layers, float32: reference.load_embedding_reference), in one run.

    python benchmarks/bench_embed.py [--model DIR] [--layers N] [--sentences 64] [--tokens 32] [--batch 32]

Without --model, a random 0.6B-shaped checkpoint (make_embedding.py; --layers for a shallower one) is written to
a temporary folder. Both sides embed the same texts, `--tokens` words each (the tokenizer is word-level, so that
many ids, then `<|endoftext|>`), in batches of `--batch`, mean-pooled and L2-normalized; transformers gets the same
ids and an attention mask. Each side runs once untimed (compilation, first-touch), then `--repeats` timed runs;
the best is reported. The embeddings of the two are compared too (cosine), so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402


def texts_for(n: int, words: int, seed: int = 0) -> list[str]:
    from make_embedding import WORDS

    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, WORDS - 2, words)) for _ in range(n)]


def ours(model_dir: Path, texts: list[str], batch: int):
    from bitnet_convert.embed_command import load_embedder

    embedder = load_embedder(model_dir, pooling="mean")
    return lambda: embedder.embed_texts(texts, batch_size=batch).embeddings, embedder


def theirs(model_dir: Path, embedder, texts: list[str], batch: int):
    import torch

    from bitnet_convert.reference import load_embedding_reference

    model = load_embedding_reference(model_dir)
    sequences = [embedder.encode(t) for t in texts]  # the same ids as ours, <|endoftext|> appended

    def run() -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(sequences), batch):
                chunk = sequences[start:start + batch]
                width = max(map(len, chunk))
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a BitNet-embedding HF folder (default: a random 0.6B-shaped one)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the random model (default 28)")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=31, help="words per sentence (+1 end token)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        model_dir = args.model
        if model_dir is None:
            from make_embedding import make_checkpoint

            model_dir = make_checkpoint(Path(tmp) / "model", layers=args.layers)
        texts = texts_for(args.sentences, args.tokens)
        run_ours, embedder = ours(model_dir, texts, args.batch)
        ours_s, ours_e = harness.best_time(run_ours, args.repeats)
        theirs_s, theirs_e = harness.best_time(theirs(model_dir, embedder, texts, args.batch), args.repeats)
    cfg = embedder.model.config
    cosine = float(np.min(np.sum(ours_e * theirs_e, axis=1)))
    print(f"model: Qwen3 {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; {args.sentences} sentences of "
          f"{args.tokens + 1} tokens, batch {args.batch}, best of {args.repeats}")
    print(f"{'implementation':<34} {'seconds':>9} {'sentences/s':>12}")
    print(f"{'bitnet_convert.embed (JAX, W1.58A8)':<34} {ours_s:>9.3f} {args.sentences / ours_s:>12.1f}")
    print(f"{'transformers float32 (BitNet layers)':<34} {theirs_s:>9.3f} {args.sentences / theirs_s:>12.1f}")
    print(f"ratio (ours / transformers): {theirs_s / ours_s:.2f}x; lowest cosine between the two: {cosine:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
