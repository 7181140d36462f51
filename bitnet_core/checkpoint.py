"""The one in-memory checkpoint every reader produces and every writer consumes.

Hub and spoke: each format has a reader (path -> Checkpoint) and a writer (Checkpoint -> path), so N formats
need 2N functions. Tensors are *lazy*: an entry knows its name, logical shape and kind up front, and only
`entry.load()` touches the (memory-mapped) source, so a writer can stream a 2B model tensor by tensor.

Tensor names are the Hugging Face names of `BitNetForCausalLM` (see `names.py`), whatever the format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from bitnet_core.errors import ConvertError, CorruptData


@dataclasses.dataclass(frozen=True)
class Ternary:
    """A BitLinear weight: ternary codes and one per-tensor multiplier.

    The layer computes ``y = (x_q @ codes.T) / s * multiplier`` with ``x_q``, ``s`` the per-token int8
    activations. ``multiplier`` is always the *multiplier* (mean|W| of the masters, ~1.5 in 2B4T), never the
    inverse `weight_scale` of the older bitlinear layout: readers and writers convert at the border.
    """

    codes: np.ndarray  # int8 [out, in], values in {-1, 0, +1}
    multiplier: np.float32

    def __post_init__(self):
        object.__setattr__(self, "multiplier", np.float32(self.multiplier))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        return (self.codes.astype(dtype) * dtype(self.multiplier)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class PackedTernary:
    """A ternary weight in the bytes a source stores it in, for writers that can transcode them directly into
    their own layout without making int8 codes (4x the memory, and time). Its bytes are *not* checked yet: the
    codec that reads them raises CorruptData on an invalid code; `transcode` adds `where` to that message.

    layout "hf2bit": uint8 [ceil(out/4), in] in transformers' `pack_weights` layout (codecs/hf2bit.py). HF
    folders offer their stored bytes; Flax folders and the JAX model's state hold the "rows4" layout
    (codecs/rows4.py) and offer it regrouped into this one (a field transpose, cheaper than int8 codes).
    """

    layout: str
    data: np.ndarray
    multiplier: np.float32
    where: str  # the file and tensor, for error messages

    def transcode(self, codec: Callable[..., np.ndarray], *args) -> np.ndarray:
        """codec(data, *args), with CorruptData naming the file and tensor."""
        try:
            return codec(self.data, *args)
        except CorruptData as exc:
            raise CorruptData(f"{self.where}: {exc}") from None


class PackedLoader:
    """A TERNARY entry's `load` that can also return the weight as stored (`packed()`): see TensorEntry."""

    def __init__(self, load: Callable[[], Ternary], packed: Callable[[], PackedTernary]):
        self._load = load
        self.packed = packed

    def __call__(self) -> Ternary:
        return self._load()


class RowsLoader:
    """A DENSE entry's `load` that can also read rows [start, stop) of the tensor alone (`rows(start, stop)`, a
    fresh array): a streaming writer then converts a 0.66 GB embedding a block of rows at a time instead of
    holding a copy of it whole. It lives on `load` for the reason PackedLoader does (see TensorEntry).
    `mapped` (optional): the stored tensor as a read-only view of the source's memory map, no copy, for a
    reader that keeps reading it in place (the generation engine's tables: bitnet_model/tables.py)."""

    def __init__(self, load: Callable[[], np.ndarray], rows: Callable[[int, int], np.ndarray],
                 mapped: Callable[[], np.ndarray] | None = None):
        self._load = load
        self.rows = rows
        self.mapped = mapped

    def __call__(self) -> np.ndarray:
        return self._load()


ROW_BLOCK_BYTES = 16 << 20  # a block of rows read at a time: 40 blocks of a 2B4T embedding


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """A dense tensor handed to a writer as consecutive blocks of whole rows, in order (`row_blocks`)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Iterator[np.ndarray]


def row_blocks(entry: TensorEntry, block_bytes: int | None = None) -> RowBlocks | None:
    """A DENSE entry of two or more dimensions read a block of rows at a time (of about `block_bytes`, default
    ROW_BLOCK_BYTES), where its loader offers rows (else None: load it whole)."""
    rows = entry.load_rows
    if rows is None or len(entry.shape) < 2:
        return None
    row_bytes = np.dtype(entry.dtype).itemsize * int(np.prod(entry.shape[1:]))
    step = max(1, (block_bytes or ROW_BLOCK_BYTES) // max(1, row_bytes))
    blocks = (rows(start, min(entry.shape[0], start + step)) for start in range(0, entry.shape[0], step))
    return RowBlocks(np.dtype(entry.dtype), tuple(entry.shape), blocks)


TERNARY = "ternary"  # TensorEntry.kind of a projection held as codes + multiplier
DENSE = "dense"  # TensorEntry.kind of any plain array (norms, embeddings, float master weights)
# A Gemma norm w stored as f32(1 + w) (what a runtime's plain RMSNorm needs) and read back as f32(stored - 1):
# exact unless |w| < 2^-16 (formats/gguf/embedding.py). A TensorEntry.encoding.
UNIT_OFFSET = "unit_offset"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One named tensor whose data is read only when `load()` is called."""

    name: str
    shape: tuple[int, ...]  # logical shape: [out, in] for projections, whatever the packing on disk
    kind: str  # TERNARY or DENSE
    dtype: np.dtype | None  # stored dtype of a DENSE tensor (bf16 is ml_dtypes.bfloat16); None for TERNARY
    load: Callable[[], Ternary | np.ndarray] = dataclasses.field(repr=False, compare=False)
    # A lossy encoding the stored values went through (GGUF "q8_0"; UNIT_OFFSET): `load` gives them decoded, in
    # `dtype`.
    encoding: str | None = None
    # A TERNARY entry's multiplier where the source stores it apart from the codes (None: load to know it). A
    # writer whose layout depends on it plans with it and checks it against what `load` gives.
    multiplier: np.float32 | None = None

    @property
    def load_packed(self) -> Callable[[], PackedTernary] | None:
        """The stored packed bytes of a TERNARY entry whose `load` is a PackedLoader, else None.

        It lives on `load` so that an entry whose `load` is replaced (by a wrapper that checks, logs or fails)
        loses it: a writer can never go around such a wrapper. Wrappers that mean to keep it wrap both.
        """
        return self.load.packed if isinstance(self.load, PackedLoader) else None

    @property
    def load_rows(self) -> Callable[[int, int], np.ndarray] | None:
        """rows(start, stop) of a DENSE entry whose `load` is a RowsLoader, else None (see load_packed)."""
        return self.load.rows if isinstance(self.load, RowsLoader) else None

    @property
    def load_mapped(self) -> Callable[[], np.ndarray] | None:
        """The mapped view of a DENSE entry whose `load` is a RowsLoader that offers one, else None."""
        return self.load.mapped if isinstance(self.load, RowsLoader) else None

    @property
    def nbytes_hint(self) -> int:
        """Rough size in the unpacked form, for progress bars."""
        count = int(np.prod(self.shape)) if self.shape else 1
        return count if self.kind == TERNARY else count * np.dtype(self.dtype).itemsize


def ternary_entry(name: str, shape, load: Callable[[], Ternary], multiplier=None) -> TensorEntry:
    return TensorEntry(name, tuple(int(d) for d in shape), TERNARY, None, load,
                       multiplier=None if multiplier is None else np.float32(multiplier))


def dense_entry(name: str, shape, dtype, load: Callable[[], np.ndarray]) -> TensorEntry:
    return TensorEntry(name, tuple(int(d) for d in shape), DENSE, np.dtype(dtype), load)


def eager_entry(name: str, value: Ternary | np.ndarray) -> TensorEntry:
    """An entry around a value already in memory (models exported from JAX, tests)."""
    if isinstance(value, Ternary):
        return ternary_entry(name, value.shape, lambda: value, value.multiplier)
    return dense_entry(name, value.shape, value.dtype, lambda: value)


@dataclasses.dataclass
class Checkpoint:
    """Config, tokenizer files and lazily loaded tensors of one BitNet model.

    config: the Hugging Face `config.json` contents *without* `quantization_config` (the packing of the
        projections is a property of a format, chosen by each writer).
    tensors: HF tensor name -> entry, in a stable order (embedding, layers, final norm, head).
    tokenizer_files: file name -> bytes (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        generation_config.json, chat template files ...), copied verbatim between formats.
    provenance: where it came from: {"format": "hf", "layout": "autobitlinear-offline",
        "source": "microsoft/bitnet-b1.58-2B-4T", "revision": "..."} and anything else a writer should record.
    """

    config: dict[str, Any]
    tensors: dict[str, TensorEntry]
    tokenizer_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise ConvertError(f"checkpoint has no tensor {name!r}") from None

    def load(self, name: str) -> Ternary | np.ndarray:
        return self[name].load()

    @classmethod
    def from_arrays(cls, config: Mapping[str, Any], arrays: Mapping[str, Ternary | np.ndarray], **kw) -> Checkpoint:
        return cls(dict(config), {n: eager_entry(n, v) for n, v in arrays.items()}, **kw)

    def materialize(self) -> dict[str, Ternary | np.ndarray]:
        """Every tensor loaded; for tests and small models only (defeats streaming)."""
        return {name: entry.load() for name, entry in self.tensors.items()}
