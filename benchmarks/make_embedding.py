"""A random BitNet-embedding checkpoint shaped like microsoft/BitNet-embedding-0.6B (Qwen3 backbone), streamed.

    python benchmarks/make_embedding.py OUT_DIR [--layers N] [--seed N] [--force]

The real model's layout (docs/formats.md §12): config.json with `model_type: qwen3` (28 layers, hidden 1024,
head_dim 128, 16 / 8 heads, FFN 3072, vocab 151,936), model.safetensors with bf16 masters under names without
`model.`, a `<proj>.norm.weight` per projection and the q/k norms. `--layers` makes a shallower model of the same
widths (a quick run). Tensors are generated chunk by chunk and streamed (make_2b4t's writer), so it never holds
more than a chunk: masters ~ N(0, 1/fan_in), BitLinear and model norms 1 + 0.1 N(0, 1), embeddings 0.02 N(0, 1).
The tokenizer is word-level (`w0 w1 ...`, with `<|endoftext|>`): enough to time encoding, not Qwen's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_2b4t import _CHUNK, BF16, Spec, write_safetensors  # noqa: E402

CONFIG_0_6B = {
    "architectures": ["Qwen3Model"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False, "attention_bias": False,
    "bos_token_id": None, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}
WORDS = 4096  # tokenizer vocabulary: <|endoftext|> then w0..w4094


class MasterSpec(Spec):
    def chunks(self, rng: np.random.Generator):
        count, scale = int(np.prod(self.shape)), np.float32(1.0 / np.sqrt(self.shape[-1]))
        for start in range(0, count, _CHUNK):
            yield (scale * rng.standard_normal(min(_CHUNK, count - start), dtype=np.float32)).astype(BF16)


def tensor_specs(cfg: dict) -> list[Spec]:
    H, F, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    specs = [Spec("embed_tokens.weight", BF16, (cfg["vocab_size"], H), "embedding"), Spec("norm.weight", BF16, (H,), "norm")]
    shapes = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
              "self_attn.o_proj": (H, q), "mlp.gate_proj": (F, H), "mlp.up_proj": (F, H), "mlp.down_proj": (H, F)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        specs += [Spec(p + n, BF16, (size,), "norm") for n, size in (
            ("input_layernorm.weight", H), ("post_attention_layernorm.weight", H),
            ("self_attn.q_norm.weight", D), ("self_attn.k_norm.weight", D))]
        for name, (rows, cols) in shapes.items():
            specs.append(MasterSpec(p + name + ".weight", BF16, (rows, cols), "master"))
            specs.append(Spec(p + name + ".norm.weight", BF16, (cols,), "norm"))
    return sorted(specs, key=lambda s: s.name)  # one dtype: safetensors orders by name


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(WORDS - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(out / "tokenizer.json"))


def make_checkpoint(out: str | Path, layers: int | None = None, seed: int = 0, force: bool = False) -> Path:
    out = Path(out)
    if out.exists():
        if not force:
            raise SystemExit(f"{out} exists (use --force)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = dict(CONFIG_0_6B, num_hidden_layers=layers or CONFIG_0_6B["num_hidden_layers"])
    write_safetensors(out / "model.safetensors", tensor_specs(cfg), seed)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 28, the real model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(make_checkpoint(args.out, args.layers, args.seed, args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
