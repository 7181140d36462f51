"""The built-in model: a small BitNet in 2B4T's layout (SiLU), trained in JAX on a text written for the project.

    MODEL_DIR        the Hugging Face folder the package ships (autobitlinear: 2-bit packed codes, bf16 scales,
                     bf16 embedding and norms, the tokenizer)
    tokenizer()      its tokenizer (tokenizers.Tokenizer)

`python -m bitnet_convert.builtin.train` reproduces the folder bit for bit (train.py); corpus.py writes the text.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
LOG = Path(__file__).resolve().parent / "training_log.json"


def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
