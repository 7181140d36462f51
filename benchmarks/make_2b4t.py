"""A random BitNet b1.58 checkpoint with the exact shapes, dtypes and file layout of microsoft/bitnet-b1.58-2B-4T.

    python benchmarks/make_2b4t.py OUT_DIR [--seed N] [--force] [--shape small]

Writes OUT_DIR/config.json (the real 2B4T config, packed autobitlinear layout), OUT_DIR/generation_config.json
and OUT_DIR/model.safetensors, which is 1,178,623,988 bytes like the real file, and a tokenizer of the size of
the Llama-3 tokenizer 2B4T ships (128,256 tokens, 280,147 merges; made by make_tokenizer.py from its seed, or
copied from $BITNET_TOKENIZER_DIR when that names a real one): its GGUF metadata is a real part of a
conversion's cost.

Why the size matches: the real file was written by the safetensors library, which stores tensors ordered by
dtype (BF16 before U8) and then by name, describes them in that order in a compact JSON header with
`__metadata__ {"format": "pt"}`, and pads the header with spaces to a multiple of 8 bytes. For the 2B4T
tensors the JSON is 60,996 bytes, padded to 61,000; 8 + 61,000 + 1,178,562,980 data bytes = 1,178,623,988.
This writer produces the very bytes `safetensors.numpy.save_file` would for the same arrays (checked on small
shapes by tests/test_bench_checkpoint.py), but streams tensor by tensor, generating each in chunks, so it
never holds more than ~100 MB.

Contents (seeded, deterministic; about 15 s on one core):
- projections: uint8 [out/4, in] in transformers' 2-bit packing, every code drawn uniformly from {-1, 0, +1}
  (1/3 zeros, close to the real model's density); so each byte is uniform over the 81 valid bytes.
- `weight_scale`: bf16 [1], uniform in [1.3, 1.7] (the real multipliers are ~1.5).
- norms: bf16, 1 + 0.1 N(0, 1). Embeddings (tied, no lm_head): bf16, 0.02 N(0, 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import struct
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bitnet_core.config import ModelConfig  # noqa: E402
from bitnet_core.names import expected_tensors  # noqa: E402

REAL_2B4T_BYTES = 1_178_623_988  # size of microsoft/bitnet-b1.58-2B-4T's model.safetensors
BF16 = np.dtype(ml_dtypes.bfloat16)
QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}

# The real checkpoint's config.json, less `auto_map` (remote code we do not use).
CONFIG_2B4T = {
    "architectures": ["BitNetForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "relu2",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 4096,
    "model_type": "bitnet",
    "rms_norm_eps": 1e-05,
    "num_attention_heads": 20,
    "num_hidden_layers": 30,
    "num_key_value_heads": 5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
    "quantization_config": QUANTIZATION_CONFIG,
}
GENERATION_CONFIG_2B4T = {"bos_token_id": 128000, "eos_token_id": [128001, 128009], "do_sample": False}
# A model of the same family, vocabulary and tokenizer, small enough to try a benchmark's mechanics on in seconds
# (not to time anything): 2 layers, rows of 512 (IQ2_BN's least) and 1024 values (I2_S: multiples of 128).
CONFIG_SMALL = {**CONFIG_2B4T, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
                "num_key_value_heads": 2, "num_hidden_layers": 2}
SHAPES = {"2b4t": CONFIG_2B4T, "small": CONFIG_SMALL}

# safetensors orders tensors by dtype, larger enum value first (BF16 before U8), then by name.
_DTYPE_RANK = {"BF16": 1, "U8": 0}
_DTYPE_NAME = {np.dtype(np.uint8): "U8", BF16: "BF16"}
# The 81 bytes whose four 2-bit fields are all valid codes (0, 1, 2 = -1, 0, +1): a uniform draw from
# them is four independent uniform ternary values.
_VALID_PACKED = np.array([a | b << 2 | c << 4 | d << 6 for d, c, b, a in itertools.product(range(3), repeat=4)],
                         np.uint8)
_CHUNK = 1 << 24  # values generated at a time


class Spec:
    """One tensor of the file: name, dtype, shape, and how to generate it chunk by chunk."""

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], kind: str):
        self.name, self.dtype, self.shape, self.kind = name, np.dtype(dtype), tuple(shape), kind

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def chunks(self, rng: np.random.Generator):
        """Yield the tensor's values (flat, row-major) in chunks of at most _CHUNK."""
        count = int(np.prod(self.shape, dtype=np.int64))
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            if self.kind == "packed":
                yield np.take(_VALID_PACKED, rng.integers(0, len(_VALID_PACKED), n, dtype=np.uint8))
            elif self.kind == "scale":
                yield rng.uniform(1.3, 1.7, n).astype(BF16)
            elif self.kind == "norm":
                yield (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(BF16)
            else:  # embedding
                yield (0.02 * rng.standard_normal(n, dtype=np.float32)).astype(BF16)


def tensor_specs(config: dict) -> list[Spec]:
    """Every tensor of the packed autobitlinear layout, in the order safetensors stores them."""
    specs = []
    for name, (shape, kind) in expected_tensors(ModelConfig.from_hf(config)).items():
        if kind == "ternary":
            out, inp = shape
            assert out % 4 == 0, name
            specs.append(Spec(name, np.uint8, (out // 4, inp), "packed"))
            specs.append(Spec(name.replace(".weight", ".weight_scale"), BF16, (1,), "scale"))
        else:
            specs.append(Spec(name, BF16, shape, "norm" if len(shape) == 1 else "embedding"))
    specs.sort(key=lambda s: (-_DTYPE_RANK[_DTYPE_NAME[s.dtype]], s.name))
    return specs


def safetensors_header(specs: list[Spec], metadata: dict | None = None) -> bytes:
    """The 8-byte length plus JSON header, exactly as the safetensors library writes it."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _DTYPE_NAME[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, specs: list[Spec], seed: int) -> int:
    """Stream the file to `path`; every tensor gets its own generator so the contents do not depend on order."""
    seeds = np.random.SeedSequence(seed).spawn(len(specs))
    by_name = dict(zip(sorted(s.name for s in specs), seeds))
    with open(path, "wb") as fh:
        fh.write(safetensors_header(specs, {"format": "pt"}))
        for spec in specs:
            rng = np.random.default_rng(by_name[spec.name])
            for chunk in spec.chunks(rng):
                fh.write(np.ascontiguousarray(chunk).view(np.uint8).data)  # bf16 has no buffer format
        return fh.tell()


def make_checkpoint(out_dir: str | os.PathLike, config: dict = CONFIG_2B4T, seed: int = 0,
                    expected_bytes: int | None = None) -> Path:
    """Write config.json, generation_config.json and model.safetensors into `out_dir` (created if needed).

    The safetensors file is written under a temporary name and renamed when whole, so an interrupted run never
    leaves a file that looks finished."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(config)
    target = out / "model.safetensors"
    partial = out / ".model.safetensors.partial"
    size = write_safetensors(partial, specs, seed)
    if expected_bytes is not None and size != expected_bytes:
        partial.unlink()
        raise AssertionError(f"wrote {size:,} bytes, expected {expected_bytes:,}")
    os.replace(partial, target)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if config in SHAPES.values():
        (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG_2B4T, indent=2) + "\n")
    return target


TOKENIZER_ENV = "BITNET_TOKENIZER_DIR"  # a real tokenizer folder to use instead of make_tokenizer.py's


def add_tokenizer(out_dir: str | os.PathLike) -> str:
    """Put a Llama-3-sized tokenizer into `out_dir` unless it has one; returns where the folder's came from."""
    import make_tokenizer

    out = Path(out_dir)
    if all((out / name).is_file() for name in make_tokenizer.FILES):
        return "already there"
    real = os.environ.get(TOKENIZER_ENV)
    if real:
        for name in make_tokenizer.FILES:
            (out / name).write_bytes((Path(real) / name).read_bytes())
        return f"copied from ${TOKENIZER_ENV} ({real})"
    make_tokenizer.write(out)
    return "made by benchmarks/make_tokenizer.py (seed 0)"


def is_complete(out_dir: str | os.PathLike, config: dict = CONFIG_2B4T) -> bool:
    """True when `out_dir` holds a finished checkpoint of `config` (its config, and the 2B4T file's size)."""
    out = Path(out_dir)
    st, cfg = out / "model.safetensors", out / "config.json"
    size_ok = st.is_file() and (config is not CONFIG_2B4T or st.stat().st_size == REAL_2B4T_BYTES)
    return size_ok and cfg.is_file() and json.loads(cfg.read_text()) == config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if a finished checkpoint is there")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="2b4t",
                        help="small: 2 layers of 512, the same vocabulary (to try a benchmark's mechanics)")
    args = parser.parse_args(argv)
    config = SHAPES[args.shape]
    if is_complete(args.out_dir, config) and not args.force:
        print(f"{args.out_dir}: {args.shape}-shaped checkpoint already there", file=sys.stderr)
    else:
        start = time.perf_counter()
        expected = REAL_2B4T_BYTES if config is CONFIG_2B4T else None
        path = make_checkpoint(args.out_dir, config, args.seed, expected_bytes=expected)
        print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"tokenizer: {add_tokenizer(args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
