"""The application's `bitnet-convert embed` command: sentence embeddings of texts with a BitNet-embedding model
(docs/formats.md §12): tokenization and batching around `bitnet_model.modeling.embed` (the pooled, L2-normalized
sentence vector; not the token-embedding table `Embedding` of the same module).

Texts are tokenized with the checkpoint's tokenizer.json (its own post-processor adds what it adds), then an end
token is appended where the model needs one: always for Qwen3 (bitnet.cpp's embedding GGUF sets
`add_eos_token` with `<|endoftext|>`, the token the model was trained to end on), and for any model pooled by
last token. Batches are right-padded (exact for a causal encoder, see bitnet_model.modeling) to a multiple of
PAD_TO tokens, so that a few shapes are compiled.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from bitnet_core import validate
from bitnet_core.errors import ConvertError
from bitnet_core.pooling import POOLINGS, end_token, pooling_of

PAD_TO = 16


@dataclasses.dataclass
class Embedded:
    """What `embed` returns: L2-normalized embeddings [N, H] float32, the pooling used and why, token counts."""

    embeddings: np.ndarray
    pooling: str
    pooling_source: str
    token_counts: list[int]

    def as_dict(self) -> dict:
        return {"pooling": self.pooling, "pooling_source": self.pooling_source,
                "dimension": int(self.embeddings.shape[1]), "token_counts": self.token_counts,
                "embeddings": self.embeddings}


class Embedder:
    """A loaded embedding model with its tokenizer and pooling."""

    def __init__(self, ckpt, *, pooling: str | None = None, where: str = "checkpoint"):
        from bitnet_convert.generate_command import load_tokenizer
        from bitnet_model.params import model_from_checkpoint

        self.where = where
        self.model = model_from_checkpoint(ckpt)
        cfg = self.model.config
        if not cfg.encoder:
            raise ConvertError(f"{where}: {cfg.architecture} is not an embedding model (use `generate`)")
        if pooling is not None and pooling not in POOLINGS:
            raise ConvertError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
        found, source = pooling_of(ckpt.tokenizer_files, where)
        self.pooling, self.pooling_source = (pooling, "--pooling") if pooling else (found, source)
        self.tokenizer = load_tokenizer(ckpt.tokenizer_files, where)
        self.eos = self._end_token(ckpt, cfg)

    def _end_token(self, ckpt, cfg) -> int | None:
        """The id appended to every text, or None (see the module docstring)."""
        if self.tokenizer is None:
            return None
        return end_token(cfg.architecture, self.pooling, self.tokenizer.token_to_id, cfg.eos_token_id, self.where)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConvertError(f"{self.where}: has no tokenizer.json to encode text with")
        ids = list(self.tokenizer.encode(validate.unicode_text(text, "a text to embed")).ids)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids

    def embed_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
        from bitnet_model.modeling import embed

        cfg = self.model.config
        out = []
        for i, ids in enumerate(sequences):
            if not ids:
                raise ConvertError(f"text {i + 1} has no tokens")
            if len(ids) > cfg.max_position_embeddings:
                raise ConvertError(f"text {i + 1} has {len(ids)} tokens, more than the model's "
                                   f"{cfg.max_position_embeddings} (max_position_embeddings)")
            if min(ids) < 0 or max(ids) >= cfg.vocab_size:
                raise ConvertError(f"text {i + 1}: token id outside the vocabulary (0..{cfg.vocab_size - 1})")
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = min(-(-max(map(len, chunk)) // PAD_TO) * PAD_TO, cfg.max_position_embeddings)
            batch = np.zeros((len(chunk), width), np.int32)  # pad id 0: never attended to (causal, right padding)
            for row, ids in enumerate(chunk):
                batch[row, :len(ids)] = ids
            out.append(embed(self.model, batch, [len(ids) for ids in chunk], pooling=self.pooling))
        return np.concatenate(out) if out else np.zeros((0, cfg.hidden_size), np.float32)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 32) -> Embedded:
        sequences = [self.encode(t) for t in texts]
        return Embedded(self.embed_ids(sequences, batch_size), self.pooling, self.pooling_source,
                        [len(s) for s in sequences])


def load_embedder(src: str | os.PathLike, *, pooling: str | None = None, revision: str | None = None) -> Embedder:
    from bitnet_convert.formats import registry

    ckpt = registry.read_checkpoint(os.fspath(src), revision=revision)
    return Embedder(ckpt, pooling=pooling, where=os.fspath(src))
