"""The decode engine: the BitNet forward of `modeling.py` over stacked, 2-bit packed layer weights.

`modeling.BitNetForCausalLM` is the reference (one module per layer, float32 embeddings, easy to read and to
train); this file computes the same function for generation, lean and fast:
  * every projection is held 2-bit packed (`packed.py`), stacked over layers: uint8 [L, out/4, in];
  * the layers run inside one `jax.lax.scan`, so 30 layers compile once (seconds, not minutes) and the
    temporaries of one layer are reused by the next;
  * a bf16 embedding stays 16-bit (0.66 GB for 2B4T rather than 1.3 GB in float32), held as its raw bits
    (uint16, see `_to_float32`), and the tied output projection converts it block by block; with the native
    kernels and the greedy screen it is not held at all but read in place from the checkpoint's memory map
    (tables.py), a few rows a step;
  * prefill computes logits at the last prompt token only, not [B, P, V], and its attention skips the keys
    after each block of queries (`modeling.attention`);
  * the KV cache is stacked [L, B, S, KV, D] and donated to each decode step, which writes one position in place;
  * on an x86 CPU with AVX2 or better (`Options.native`), every BitLinear and the output projection run in the
    kernels of `native/` (AVX2, AVX-512 VNNI or AMX straight from the packed bytes: XLA has no such kernel and
    is several times slower; BENCHMARKS.md, design measurements).
The arithmetic is the reference's, operation for operation (per-token int8 activations, exact int32 products,
`acc / s * multiplier`, float32 everywhere else, HIGHEST precision float products; the native BitLinear is
bit for bit the XLA one), so logits agree to float32 rounding of the attention and output sums;
tests/test_engine.py checks every option against the reference model.

Weights come from a Checkpoint tensor by tensor (`weights_from_checkpoint`: peak memory is the packed model
plus one tensor) or from a reference model (`weights_from_model`). Both hold the one packed layout of
packed.py: the engine stacks the reference model's `packed` leaves as they are, and a checkpoint's
projections are converted by the reference loader's own `quantize.packed_projection`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_core import names
from bitnet_core.checkpoint import row_blocks
from bitnet_core.config import ModelConfig
from bitnet_model import native
from bitnet_model import packed as packed_ops
from bitnet_model.bitlinear import fused_bitlinear, rms_norm
from bitnet_model.modeling import PRECISION, rope_tables, rotary_attention
from bitnet_model.tables import MappedTable, drop_pages, in_place

# The engine's names for a layer's tensors -> HF suffix within the layer, from the one role table.
PROJECTIONS = {role.name: role.hf for role in names.PROJECTIONS.values()}
# (the causal LMs' norms: the embedding encoders' extra roles are not part of the engine, see `check_generates`)
LAYER_NORMS = {role.name: role.hf for role in names.LAYER_NORMS.values() if role.needs in (None, "sub_norms")}
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
TABLES = ("model.embed_tokens.weight", "lm_head.weight")  # the embedding and the untied output projection


@dataclasses.dataclass(frozen=True)
class Options:
    """How the products run (static: part of the compiled program).

    block_bytes: unpacked int8 codes per block of a projection (0: the whole matrix at once); see packed.py.
    head_block_bytes: float32 bytes of the output projection converted per block (0: all at once).
    reduce_rows: at most this many token rows use a fused multiply-reduce instead of unpack + int8 dot: it
        reads only the packed bytes, which is what a GPU wants for decode; XLA's CPU reduce is not vectorized.
    native: a layer runs in the CPU kernels of `native` instead of XLA: the products (AVX2 / AVX-512 VNNI / AMX from
        the packed bytes, the 16-bit table read as it is) with the RMSNorm / activation before them and the
        residual add after them, and attention with its RoPE, the prompt's and the decode steps' over a float32
        cache (float32 like XLA's, summed in another order); the options above then do not apply.
    query_block: queries per block of XLA's prefill attention (modeling.attention; 0: one block): 128 measured
        fastest on the CPU (BENCHMARKS.md, design measurements); a GPU takes one block, fewer larger products.
    """

    block_bytes: int = 0
    head_block_bytes: int = 0
    reduce_rows: int = 0
    native: bool = False
    query_block: int = 128

    @classmethod
    def for_backend(cls, backend: str | None = None, sharded: bool = False) -> Options:
        backend = backend or jax.default_backend()
        if backend == "cpu" and not sharded:
            return cls(native=True) if native.available() else cls.xla_cpu()
        if backend == "cpu":  # blocks would cut across the sharded rows; let GSPMD see whole matrices
            return cls()
        return cls(reduce_rows=8, query_block=0)

    @classmethod
    def xla_cpu(cls) -> Options:
        """XLA's own products on one CPU device (where the native kernels are unavailable)."""
        # head blocks of ~7 MB float32 (668 rows of 2B4T): faster than 14 MB ones (design measurements)
        return cls(block_bytes=packed_ops.BLOCK_BYTES, head_block_bytes=7 << 20)


@dataclasses.dataclass
class Weights:
    """Everything the engine reads; layer tensors are stacked on a leading layer axis L."""

    # [V, H] float32, or uint16 bits of bf16 (2B4T), or either read in place from the file (MappedTable: only
    # where the native kernels run); also the output projection when tied
    embed: jax.Array | MappedTable
    lm_head: jax.Array | MappedTable | None  # [V, H] untied output projection (the same forms), or None
    norm: jax.Array  # f32 [H]
    packed: dict[str, jax.Array]  # projection -> uint8 [L, out/4, in]
    multipliers: dict[str, jax.Array]  # projection -> f32 [L]
    norms: dict[str, jax.Array]  # layer norm -> f32 [L, size] (sub-norms only in models that have them)
    # The opt-in int8 head (HEAD_INT8): `embed` / `lm_head` then hold int8 codes and these their f32 row scales
    embed_scale: jax.Array | None = None  # [V]
    lm_head_scale: jax.Array | None = None  # [V]
    # The greedy screen of the output table (with_screen): int8 codes [V, H], f32 scales and error bounds [V]
    screen_codes: jax.Array | None = None
    screen_scale: jax.Array | None = None
    screen_bound: jax.Array | None = None

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


jax.tree_util.register_dataclass(
    Weights, data_fields=["embed", "lm_head", "norm", "packed", "multipliers", "norms", "embed_scale", "lm_head_scale",
                          "screen_codes", "screen_scale", "screen_bound"],
    meta_fields=[],
)

# ----------------------------------------------------------------------------------- the opt-in int8 head

HEAD_INT8 = "int8"  # engine tables as int8 rows with a float32 scale each (lossy: see quantize_rows)
HEAD_TYPES = ("stored", HEAD_INT8)  # `head` of weights_from_checkpoint; "stored": as the checkpoint stores it
_HEAD_BLOCK_BYTES = 16 << 20  # stored bytes of the rows quantized at a time while loading
# ... and while screening: its float32 temporaries (~10x the stored bytes) are the peak of a greedy load
_SCREEN_BLOCK_BYTES = 4 << 20


def quantize_rows(values) -> tuple[np.ndarray, np.ndarray]:
    """float rows [r, H] -> (int8 codes [r, H], float32 scales [r]) with scale = max|row| / 127 and code =
    round-half-even(value / scale), in float32: each value moves by at most scale / 2 (bitnet.cpp's embedding
    quantization is absmax rows too). The one rounding the int8 head adds; the embedding lookup and the output
    projection both read these rows, so the head is still held once."""
    x = np.asarray(values, np.float32)
    scale = (np.abs(x).max(axis=1, initial=0.0) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def _int8_table(blocks: Iterable[np.ndarray], shape) -> tuple[jax.Array, jax.Array]:
    """The int8 head from a table's consecutive blocks of rows (never the float table whole)."""
    from bitnet_core.aligned import aligned_empty

    V, H = shape
    codes, scales = aligned_empty((V, H), np.int8), np.empty(V, np.float32)
    start = 0
    for block in blocks:
        stop = start + len(block)
        codes[start:stop], scales[start:stop] = quantize_rows(_as_float32(block))
        start = stop
    if start != V:
        raise ValueError(f"table of {V} rows came as {start}")
    return jax.device_put(codes), jax.device_put(scales)


# ------------------------------------------------------------------------------ the greedy screen (exact)


def screen_rows(values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float rows [r, H] -> (int8 codes, float32 scales, float32 bounds [r]): quantize_rows' codes and scales,
    and per row a bound >= max |value - scale * code|. With s = fl(max|x| / 127) the quotient fl(x / s) is
    within 127 (1 + 2^-23) 2^-24 < 2^-16 of x / s, and rounding it moves at most 1/2: so s (1/2 + 2^-16),
    rounded up, bounds every row whose s is a normal float. Rows of zeros (s = 0) have no error; a tiny
    (subnormal-range) or non-finite s gets an infinite or NaN bound: such a row is always re-scored."""
    x = np.asarray(values, np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        codes, scales = quantize_rows(x)
        bounds = np.nextafter(scales * np.float32(0.5 + 2.0 ** -16), np.float32(np.inf)).astype(np.float32)
    bounds[scales == 0] = 0.0
    bounds[(scales > 0) & (scales < np.float32(2.0 ** -100))] = np.inf
    return codes, scales, bounds


def with_screen(w: Weights) -> Weights:
    """`w` with the greedy screen of its output table: greedy decoding (greedy_tokens) then reads the int8
    codes (half a bf16 table's bytes) and re-scores exactly only the rows whose error bound still lets them win:
    the same tokens as the argmax of the stored table's logits (prefill's first token and every decode step's).
    The stored table stays for the embedding and for sampling; the screen adds one byte per table value, and
    where the table is read in place (MappedTable) its pages are dropped again once screened. Needs the native
    kernels."""
    from bitnet_core.aligned import aligned_empty
    from bitnet_core.parallel import for_row_ranges

    table = w.embed if w.lm_head is None else w.lm_head
    if w.embed_scale is not None:
        raise ValueError("the int8 head is already int8: it has no screen")
    V, H = table.shape
    mapped = isinstance(table, MappedTable)
    host = table.host() if mapped else np.asarray(table)
    codes, scales, bounds = aligned_empty((V, H), np.int8), np.empty(V, np.float32), np.empty(V, np.float32)
    def screen(start: int, stop: int) -> None:
        codes[start:stop], scales[start:stop], bounds[start:stop] = screen_rows(_as_float32(host[start:stop]))

    step = max(1, _SCREEN_BLOCK_BYTES // (host.itemsize * H))
    for start in range(0, V, step):  # a block at a time (its float32 temporaries), on every core
        stop = min(V, start + step)
        for_row_ranges(stop - start, (stop - start) * H * host.itemsize,
                       lambda a, b, start=start: screen(start + a, start + b))
        if mapped:  # read once: greedy decoding reads the screen, and of the table only the rows that can win
            drop_pages(host[start:stop])
    return dataclasses.replace(w, screen_codes=jax.device_put(codes), screen_scale=jax.device_put(scales),
                               screen_bound=jax.device_put(bounds))


def _as_float32(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.dtype == np.uint16:  # bf16 bits (the engine's own tables)
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32)


@dataclasses.dataclass
class Cache:
    """Post-RoPE keys and values of all layers; slots at positions >= length hold garbage (never attended)."""

    keys: jax.Array  # [L, B, S, KV, D]
    values: jax.Array  # [L, B, S, KV, D]
    length: jax.Array  # int32 [] positions filled

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


jax.tree_util.register_dataclass(Cache, data_fields=["keys", "values", "length"], meta_fields=[])


# ----------------------------------------------------------------------------------------------- loading


def weights_from_checkpoint(ckpt, *, embed_dtype=None, release=None, head: str = "stored",
                            screen: bool = False, in_place: bool = False) -> Weights:
    """Weights from a bitnet_convert Checkpoint, one tensor at a time.

    Each projection is packed (`quantize.packed_projection`: HF and Flax bytes are regrouped without making int8
    codes) and copied into its stacked host array; each stacked array goes to the device as soon as its last
    layer is in. `release()` (optional) is called after every tensor, so a caller can drop the pages of a
    memory-mapped source it no longer needs (see bitnet_convert.generate_command).
    `embed_dtype` overrides the stored dtype of the embedding / head (default: keep it); `head="int8"` holds
    them as int8 rows with a scale each instead (HEAD_INT8, quantize_rows: lossy, opt-in), converted a block of
    rows at a time. `screen` adds the greedy screen of the output table (with_screen: exact, +1 byte per
    table value). `in_place` (only for the native kernels) reads a stored bf16 or float32 table in place from the
    source's memory map where its reader offers one (tables.py), instead of holding a copy.
    """
    if head not in HEAD_TYPES:
        raise ValueError(f"head must be one of {HEAD_TYPES}, not {head!r}")
    from bitnet_core.aligned import aligned_empty
    from bitnet_core.quantize import packed_projection
    from bitnet_core.validate import check_tensors

    cfg = check_tensors(ckpt, str(ckpt.provenance.get("path") or "checkpoint"))
    check_generates(cfg, str(ckpt.provenance.get("path") or "checkpoint"))
    L = cfg.num_hidden_layers
    host_packed: dict[str, np.ndarray] = {}
    host_norms: dict[str, np.ndarray] = {}
    multipliers = {name: np.zeros(L, np.float32) for name in PROJECTIONS}
    remaining = {name: L for name in (*PROJECTIONS, *LAYER_NORMS)}
    packed, norms, dense = {}, {}, {}
    suffix_of = {suffix: name for name, suffix in PROJECTIONS.items()}
    norm_of = {suffix: name for name, suffix in LAYER_NORMS.items()}
    for entry in ckpt:
        match = _LAYER_TENSOR.match(entry.name)
        if match and match.group(2) in suffix_of:
            layer, name = int(match.group(1)), suffix_of[match.group(2)]
            rows, multipliers[name][layer] = packed_projection(entry)
            if name not in host_packed:  # aligned: the device array adopts it, no second copy
                host_packed[name] = aligned_empty((L, *rows.shape), np.uint8)
            host_packed[name][layer] = rows
            remaining[name] -= 1
            if remaining[name] == 0:
                packed[name] = jax.device_put(host_packed.pop(name))
        elif match and match.group(2) in norm_of:
            layer, name = int(match.group(1)), norm_of[match.group(2)]
            value = entry.load()
            host_norms.setdefault(name, np.empty((L, value.shape[0]), np.float32))[layer] = value
            remaining[name] -= 1
            if remaining[name] == 0:
                norms[name] = jax.device_put(host_norms.pop(name))
        elif head == HEAD_INT8 and entry.name in TABLES:
            found = row_blocks(entry, _HEAD_BLOCK_BYTES)
            if found is not None:
                blocks = found.blocks
            else:  # a source without row reads: slices of it whole, each converted to float32 on its own
                whole = np.asarray(entry.load())
                step = max(1, _HEAD_BLOCK_BYTES // whole.itemsize // whole.shape[1])
                blocks = (whole[a:a + step] for a in range(0, whole.shape[0], step))
            dense[entry.name], dense[entry.name + ".scale"] = _int8_table(blocks, entry.shape)
        elif in_place and embed_dtype is None and entry.name in TABLES and (table := _in_place(entry)) is not None:
            dense[entry.name] = table
        else:
            array = np.asarray(entry.load())
            if entry.name == "model.norm.weight":
                dense[entry.name] = jax.device_put(array.astype(np.float32))
            else:
                dense[entry.name] = jax.device_put(_table(array.astype(embed_dtype or array.dtype, copy=False)))
        if release is not None:
            release()
    weights = Weights(
        embed=dense["model.embed_tokens.weight"],
        lm_head=dense.get("lm_head.weight"),
        norm=dense["model.norm.weight"],
        packed=packed,
        multipliers={name: jnp.asarray(m) for name, m in multipliers.items()},
        norms=norms,
        embed_scale=dense.get("model.embed_tokens.weight.scale"),
        lm_head_scale=dense.get("lm_head.weight.scale"),
    )
    _check_complete(weights, cfg)
    return with_screen(weights) if screen else weights


def _in_place(entry) -> MappedTable | None:
    """The table of `entry` read in place from its source's memory map (tables.in_place), or None."""
    mapped = entry.load_mapped
    return in_place(mapped()) if mapped is not None else None


def check_generates(cfg: ModelConfig, where: str) -> None:
    """The engine runs the causal LMs; an embedding encoder (docs/formats.md §12) is run by `embed`."""
    if cfg.encoder:
        from bitnet_core.errors import ConvertError

        raise ConvertError(f"{where}: {cfg.architecture} is an embedding model, it does not generate text "
                           "(use `bitnet-convert embed`)")


def weights_from_model(model) -> Weights:
    """Weights of a reference `BitNetForCausalLM` (inference mode); the embedding goes back to its stored dtype."""
    cfg = model.config
    check_generates(cfg, "model")
    layers = model.model.layers
    stored = dict(model.stored_dtypes)

    def table(name, array):
        dtype = np.dtype(stored.get(name, "float32"))
        return jnp.asarray(_table(np.asarray(array, np.float32).astype(dtype)))  # float32 of a bf16 value: exact

    packed, multipliers = {}, {}
    for name, suffix in PROJECTIONS.items():
        module_path = suffix.split(".")
        mods = [functools.reduce(getattr, module_path, layer) for layer in layers]
        packed[name] = jnp.stack([m.packed[...] for m in mods])  # the model's own packed leaves, same layout
        multipliers[name] = jnp.asarray([float(m.multiplier[...]) for m in mods], jnp.float32)
    norms = {}
    for name, suffix in LAYER_NORMS.items():
        mods = [functools.reduce(getattr, suffix.split("."), layer) for layer in layers]
        if all(m is not None for m in mods):
            norms[name] = jnp.stack([m.weight[...].astype(jnp.float32) for m in mods])
    weights = Weights(
        embed=table("model.embed_tokens.weight", model.model.embed_tokens.weight[...]),
        lm_head=None if model.lm_head is None else table("lm_head.weight", model.lm_head.weight[...]),
        norm=model.model.norm.weight[...].astype(jnp.float32),
        packed=packed,
        multipliers=multipliers,
        norms=norms,
    )
    _check_complete(weights, cfg)
    return weights


def _table(array: np.ndarray) -> np.ndarray:
    """An embedding / head table as the engine holds it: bf16 as its uint16 bits, anything else as float32."""
    if array.dtype == np.dtype(jnp.bfloat16):
        return array.view(np.uint16)
    return array.astype(np.float32, copy=False)


def _check_complete(weights: Weights, cfg: ModelConfig) -> None:
    want = {"input_layernorm", "post_attention_layernorm"} | ({"attn_sub_norm", "ffn_sub_norm"} if cfg.sub_norms else set())
    missing = (set(PROJECTIONS) - set(weights.packed)) | (want - set(weights.norms))
    if missing or (weights.lm_head is None) != cfg.tie_word_embeddings:
        raise ValueError(f"engine weights incomplete: missing {sorted(missing)} or the output projection")


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32) -> Cache:
    shape = (cfg.num_hidden_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
    return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------- forward


def _layers(cfg: ModelConfig, opts: Options, w: Weights, x, cos, sin, start, cache: Cache | None, last=None):
    """All decoder layers in one scan: x [B, T, H] -> (x, new keys, new values [L, B, T, KV, D]).

    With `last` (prefill: the index of the last real token) and the native kernels, the final layer runs its
    o_proj and FFN for that token only, as llama.cpp does: nothing reads the other positions after the last
    layer (the cache holds keys and values, made before them), and the kernels treat each token on its own, so
    its result is bit for bit the same (tests/test_engine.py); the other positions keep the layer's input. XLA's
    own products stay on every position: there a [B, 1, H] norm or quantization can round an ulp away from the
    same row inside [B, T, H]."""
    B, T, _ = x.shape
    eps = cfg.rms_norm_eps

    def layer(x, xs, only=None):  # only: the one position to finish after the attention (see `last`)
        packed, multipliers, norms, cached_k, cached_v, index = xs  # this layer's weights (see below), cache slices

        def bitlinear(h, *names, norm, up=None, residual=None):  # norm: the name of the norm before it
            act = None if up is None else cfg.hidden_act
            return fused_bitlinear(h, names, packed, multipliers, native_kernel=opts.native, layer=index,
                                   norm=norms.get(norm), eps=eps, act=act, up=up, residual=residual,
                                   block_bytes=opts.block_bytes, reduce_rows=opts.reduce_rows)

        q, k, v = bitlinear(x, "q_proj", "k_proj", "v_proj", norm="input_layernorm")
        q = q.reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if native_cache:  # reads this layer of the whole stacked cache in place: no slice copied per layer
            attn, k = native.cached_attention(q, k, v, cos, sin, cache.keys, cache.values, index, start)
        else:
            attn, k, v = rotary_attention(q, k, v, cos, sin, cached_k, cached_v, start, query_block=opts.query_block,
                                          native_kernel=opts.native)  # k, v: rotated, as the cache holds them
        every = x
        if only is not None:
            attn = jax.lax.dynamic_slice_in_dim(attn, only, 1, axis=1)
            x = jax.lax.dynamic_slice_in_dim(x, only, 1, axis=1)
        x = bitlinear(attn, "o_proj", norm="attn_sub_norm", residual=x)[0]  # Llama-family: no sub-norms
        gate, up = bitlinear(x, "gate_proj", "up_proj", norm="post_attention_layernorm")
        x = bitlinear(gate, "down_proj", norm="ffn_sub_norm", up=up, residual=x)[0]  # act(gate) * up: [B, T, F]
        if only is not None:
            x = jax.lax.dynamic_update_slice_in_dim(every, x, only, axis=1)
        return x, (k, v)

    L = cfg.num_hidden_layers
    none = jnp.zeros((L, 0))  # scan needs an array where a layer has no cache
    # Native products and the native cached attention read their layer out of the whole stacks (closed over,
    # indexed by the scan's layer number); XLA's take the scan's slices.
    native_cache = opts.native and cache is not None and cache.keys.dtype == jnp.float32
    sliced_cache = cache is not None and not native_cache
    packed, multipliers = ({}, {}) if opts.native else (w.packed, w.multipliers)
    xs = (packed, multipliers, w.norms, cache.keys if sliced_cache else none,
          cache.values if sliced_cache else none, jnp.arange(L, dtype=jnp.int32))

    def body(x, xs):
        packed, multipliers, norms, cached_k, cached_v, index = xs
        if opts.native:
            packed, multipliers = w.packed, w.multipliers
        xs = (packed, multipliers, norms, cached_k if sliced_cache else None, cached_v if sliced_cache else None,
              index)
        if last is None or T == 1 or not opts.native:
            return layer(x, xs)
        return jax.lax.cond(index == L - 1, lambda: layer(x, xs, only=last), lambda: layer(x, xs))

    x, (keys, values) = jax.lax.scan(body, x, xs)
    return x, keys, values


def _logits(opts: Options, w: Weights, h: jax.Array) -> jax.Array:
    """f32 h [N, H] -> f32 logits [N, V] against the (stored-dtype) output table, converted block by block."""
    table = w.embed if w.lm_head is None else w.lm_head  # [V, H]
    scale = w.embed_scale if w.lm_head is None else w.lm_head_scale  # int8 head: [V], else None
    if scale is not None:  # dot with the int8 codes, then times each row's scale
        return _unscaled_logits(opts, table, h) * scale[None, :]
    return _unscaled_logits(opts, table, h)


def _unscaled_logits(opts: Options, table: jax.Array, h: jax.Array) -> jax.Array:
    V, H = table.shape
    if opts.native:
        return native.table_matmul(h, table)
    if isinstance(table, MappedTable):
        raise ValueError("a table read in place is read by the native kernels only")

    def block(rows):  # [r, H] -> [N, r]
        return jnp.einsum("nh,vh->nv", h, _to_float32(rows), precision=PRECISION)

    if opts.reduce_rows and h.shape[0] <= opts.reduce_rows:  # GPU decode: one fused pass over the 16-bit table
        if table.dtype == jnp.uint16:
            table = jax.lax.bitcast_convert_type(table.astype(jnp.uint32) << 16, jnp.float32)
        return jnp.sum(h[:, None, :] * table[None].astype(jnp.float32), axis=-1)  # int8 codes: exact
    per_block = packed_ops.block_rows(V, 4 * H, opts.head_block_bytes)  # float32 bytes per row
    if per_block == V:
        return block(table)
    out = jax.lax.map(block, table.reshape(V // per_block, per_block, H))  # [nb, N, r]
    return jnp.moveaxis(out, 0, 1).reshape(h.shape[0], V)


def _to_float32(table: jax.Array) -> jax.Array:
    """Exact float32 of a table block (uint16 bf16 bits or float32), materialized before the dot that reads it.

    Why bits: a bf16 is the high half of its float32, so `bits << 16` is the exact value, and XLA's CPU runs
    that integer shift several times faster than its bf16 convert (a bitcast of a bf16 array inside the program
    is as slow as the convert, hence uint16 storage; BENCHMARKS.md, design measurements). The barrier keeps XLA from fusing the conversion into the dot, whose
    fused form is a naive loop.
    """
    if table.dtype == jnp.uint16:
        table = jax.lax.bitcast_convert_type(table.astype(jnp.uint32) << 16, jnp.float32)
    return jax.lax.optimization_barrier(table.astype(jnp.float32))


def _embed(w: Weights, token_ids: jax.Array) -> jax.Array:
    if isinstance(w.embed, MappedTable):  # read in place: the native lookup (the same float32 values)
        return native.table_rows(token_ids, w.embed)
    rows = jnp.take(w.embed, token_ids, axis=0)  # [B, T, H]
    if w.embed_scale is not None:  # the int8 head's rows: codes times their row's scale
        return rows.astype(jnp.float32) * jnp.take(w.embed_scale, token_ids, axis=0)[..., None]
    if rows.dtype == jnp.uint16:  # bf16 bits, see _to_float32
        return jax.lax.bitcast_convert_type(rows.astype(jnp.uint32) << 16, jnp.float32)
    return rows.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "max_length"))
def prefill(cfg: ModelConfig, opts: Options, w: Weights, token_ids, prompt_length, max_length: int):
    """Right-padded prompts int [B, P] -> (logits [B, V] at the last real token, a Cache of max_length slots
    holding the prompt, length = prompt_length)."""
    h, cache = _prefill_hidden(cfg, opts, w, token_ids, prompt_length, max_length)
    return _logits(opts, w, h), cache


def prefill_greedy(cfg: ModelConfig, opts: Options, w: Weights, token_ids, prompt_length, max_length: int):
    """prefill's greedy first token -> (int32 [B] argmax tokens, cache): through the greedy screen where `w` has
    one, as decode_greedy. Traceable."""
    h, cache = _prefill_hidden(cfg, opts, w, token_ids, prompt_length, max_length)
    return greedy_tokens(opts, w, h), cache


def _prefill_hidden(cfg: ModelConfig, opts: Options, w: Weights, token_ids, prompt_length, max_length: int):
    """prefill's layers and final norm at the last real token -> (h [B, H], the Cache)."""
    B, P = token_ids.shape
    positions = jnp.arange(P, dtype=jnp.int32)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x, keys, values = _layers(cfg, opts, w, _embed(w, token_ids), cos, sin, jnp.int32(0), None,
                              last=prompt_length - 1)
    last = jax.lax.dynamic_index_in_dim(x, prompt_length - 1, axis=1, keepdims=False)  # [B, H]
    shape = (cfg.num_hidden_layers, B, max_length, cfg.num_key_value_heads, cfg.head_dim)
    cache_keys = jax.lax.dynamic_update_slice(jnp.zeros(shape, keys.dtype), keys, (0, 0, 0, 0, 0))
    cache_values = jax.lax.dynamic_update_slice(jnp.zeros(shape, values.dtype), values, (0, 0, 0, 0, 0))
    cache = Cache(cache_keys, cache_values, jnp.asarray(prompt_length, jnp.int32))
    return rms_norm(last, w.norm, cfg.rms_norm_eps), cache


def decode(cfg: ModelConfig, opts: Options, w: Weights, token_ids, cache: Cache):
    """One token per row int [B] at position cache.length -> (logits [B, V], cache with length + 1).

    Traceable (not jitted itself) so a caller can fuse sampling into the same compiled step; `decode_step`
    is the jitted, cache-donating version."""
    h, cache = _decode_hidden(cfg, opts, w, token_ids, cache)
    return _logits(opts, w, h), cache


def decode_greedy(cfg: ModelConfig, opts: Options, w: Weights, token_ids, cache: Cache):
    """decode's step with greedy sampling -> (int32 [B] argmax tokens, cache): the same tokens as
    argmax(decode(...)[0]), through the greedy screen where `w` has one (with_screen). Traceable."""
    h, cache = _decode_hidden(cfg, opts, w, token_ids, cache)
    return greedy_tokens(opts, w, h), cache


def greedy_tokens(opts: Options, w: Weights, h: jax.Array) -> jax.Array:
    """f32 h [N, H] -> int32 [N]: argmax of the logits (the first of equal maxima), read through the screen
    when `w` has one and the native kernels run."""
    if w.screen_codes is not None and opts.native:
        table = w.embed if w.lm_head is None else w.lm_head
        return native.greedy_head(h, table, w.screen_codes, w.screen_scale, w.screen_bound)[0]
    return jnp.argmax(_logits(opts, w, h), axis=-1).astype(jnp.int32)


def _decode_hidden(cfg: ModelConfig, opts: Options, w: Weights, token_ids, cache: Cache):
    """decode's layers and final norm -> (h [B, H], cache with length + 1)."""
    start = cache.length
    cos, sin = rope_tables(start[None], cfg.head_dim, cfg.rope_theta)
    x, keys, values = _layers(cfg, opts, w, _embed(w, token_ids[:, None]), cos, sin, start, cache)
    keys = jax.lax.dynamic_update_slice(cache.keys, keys, (0, 0, start, 0, 0))  # in place: cache is donated
    values = jax.lax.dynamic_update_slice(cache.values, values, (0, 0, start, 0, 0))
    return rms_norm(x[:, 0], w.norm, cfg.rms_norm_eps), Cache(keys, values, start + 1)


decode_step = jax.jit(decode, static_argnames=("cfg", "opts"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("cfg", "opts"))
def forward(cfg: ModelConfig, opts: Options, w: Weights, token_ids) -> jax.Array:
    """Full causal forward without a cache: int [B, T] -> f32 logits [B, T, V] (tests and validation)."""
    B, T = token_ids.shape
    cos, sin = rope_tables(jnp.arange(T, dtype=jnp.int32), cfg.head_dim, cfg.rope_theta)
    x, _, _ = _layers(cfg, opts, w, _embed(w, token_ids), cos, sin, jnp.int32(0), None)
    h = rms_norm(x, w.norm, cfg.rms_norm_eps).reshape(B * T, -1)
    return _logits(opts, w, h).reshape(B, T, -1)


def synthetic_weights(cfg: ModelConfig, seed: int = 0) -> Weights:
    """Random weights of `cfg`'s shapes made on the device (benchmarks with no checkpoint file): uniform
    ternary codes, multipliers ~1.5, norms ~1, bf16 embeddings 0.02 N(0, 1) (held as bits)."""
    key = jax.random.key(seed)
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    shapes = {role.name: role.shape(cfg) for role in names.PROJECTIONS.values()}

    # The 81 bytes whose four 2-bit fields are valid codes (0, 1, 2): a uniform draw is four uniform codes.
    valid = jnp.asarray([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3)
                         for d in range(3)], jnp.uint8)

    @functools.partial(jax.jit, static_argnums=(1,))
    def random_packed(key, shape):  # uint8 [L, out/4, in], made layer by layer to keep temporaries small
        def one(k):  # 32 random bits give four bytes; byte % 81 is uniform enough for a benchmark
            rows, cols = shape[0] // 4, shape[1]
            bits = jax.random.bits(k, (rows, -(-cols // 4)), jnp.uint32)
            raw = jax.lax.bitcast_convert_type(bits, jnp.uint8).reshape(rows, -1)[:, :cols]
            return jnp.take(valid, raw % jnp.uint8(81))

        return jax.lax.map(one, jax.random.split(key, L))

    packed, multipliers = {}, {}
    for name, shape in shapes.items():
        key, k1, k2 = jax.random.split(key, 3)
        packed[name] = random_packed(k1, shape)
        multipliers[name] = jax.random.uniform(k2, (L,), jnp.float32, 1.3, 1.7)
    sizes = {role.name: role.shape(cfg)[0] for role in names.LAYER_NORMS.values()
             if role.name in LAYER_NORMS and role.present(cfg)}
    norms = {}
    for name, size in sizes.items():
        key, sub = jax.random.split(key)
        norms[name] = 1.0 + 0.1 * jax.random.normal(sub, (L, size), jnp.float32)
    key, k1, k2 = jax.random.split(key, 3)
    table = jax.jit(lambda k: jax.lax.bitcast_convert_type(
        (0.02 * jax.random.normal(k, (cfg.vocab_size, H), jnp.float32)).astype(jnp.bfloat16), jnp.uint16))
    embed = table(k1)
    head = None if cfg.tie_word_embeddings else table(k2)
    return Weights(embed, head, jnp.ones((H,), jnp.float32), packed, multipliers, norms)
