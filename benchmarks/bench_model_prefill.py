"""Reference-model (`bitnet_model.modeling`) forward time at 2B4T widths with a few layers.

    python benchmarks/bench_model_prefill.py [--layers 4] [--vocab 8192] [--tokens 64 256] [--repeats 5]

Random ternary codes (a third zeros) and multipliers ~1.5 at hidden 2560, FFN 6912, 20/5 heads, loaded through
`params.model_from_checkpoint` like any checkpoint, then `modeling._forward` (jitted, whole prompt, no cache) on
one prompt of each length: best of --repeats after a compiling warm-up. The vocabulary is cut (default 8192)
so the float output projection does not hide the BitLinear products this measures. Prints the projection
state's bytes too (what the model holds in memory for its ternary weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bitnet_core.checkpoint import TERNARY, Checkpoint, Ternary
    from bitnet_core.config import ModelConfig
    from bitnet_core.names import expected_tensors
    from bitnet_model import modeling, params

    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=2560, intermediate_size=6912, num_hidden_layers=args.layers,
        num_attention_heads=20, num_key_value_heads=5, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=4096, hidden_act="relu2", sub_norms=True, tie_word_embeddings=True,
    )
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (shape, kind) in expected_tensors(cfg).items():
        if kind == TERNARY:
            arrays[name] = Ternary(rng.integers(-1, 2, shape, dtype=np.int8), np.float32(rng.uniform(1.3, 1.7)))
        else:
            arrays[name] = (rng.standard_normal(shape, np.float32) * (0.02 if len(shape) == 2 else 0.1) + (len(shape) == 1))
    model = params.model_from_checkpoint(Checkpoint.from_arrays(cfg.to_hf(), arrays))
    del arrays
    graphdef, state = nnx.split(model)
    proj_bytes = sum(v.get_value().nbytes for p, v in nnx.to_flat_state(state) if p[-1] != "weight")
    print(f"backend {jax.default_backend()}, {args.layers} layers at 2B4T widths, vocab {args.vocab}; "
          f"projection state {proj_bytes / 1e6:.1f} MB")
    for tokens in args.tokens:
        ids = jnp.asarray(rng.integers(0, args.vocab, (1, tokens)), jnp.int32)
        modeling._forward(graphdef, state, ids).block_until_ready()  # compile
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            modeling._forward(graphdef, state, ids).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        print(f"prefill {tokens:4d} tokens: {best * 1e3:8.1f} ms (best of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
