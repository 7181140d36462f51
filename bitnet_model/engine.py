"""The decode engine: the BitNet forward of `modeling.py` over stacked, 2-bit packed layer weights.

`modeling.BitNetForCausalLM` is the reference (one module per layer, float32 embeddings, easy to read and to
train); this file computes the same function for generation, lean and fast:
  * every projection is held 2-bit packed (`packed.py`), stacked over layers: uint8 [L, out/4, in];
  * the layers run inside one `jax.lax.scan`, so 30 layers compile once (seconds, not minutes) and the
    temporaries of one layer are reused by the next;
  * a bf16 embedding stays 16-bit (0.66 GB for 2B4T rather than 1.3 GB in float32), held as its raw bits
    (uint16, see `_to_float32`), and the tied output projection converts it block by block;
  * prefill computes logits at the last prompt token only, not [B, P, V], and its attention skips the keys
    after each block of queries (`_attention`);
  * the KV cache is stacked [L, B, S, KV, D] and donated to each decode step, which writes one position in place;
  * on a CPU with AVX-512 VNNI (`Options.native`), every BitLinear and the output projection run in the kernels
    of `native/` (VNNI / AMX straight from the packed bytes: XLA has no such kernel and is 2-10x slower).
The arithmetic is the reference's, operation for operation (per-token int8 activations, exact int32 products,
`acc / s * multiplier`, float32 everywhere else, HIGHEST precision float products; the native BitLinear is
bit for bit the XLA one), so logits agree to float32 rounding of the attention and output sums;
tests/test_engine.py checks every option against the reference model.

Weights come from a Checkpoint tensor by tensor (`weights_from_checkpoint`: peak memory is the packed model
plus one tensor) or from a reference model (`weights_from_model`). Both hold the one packed layout of
packed.py: the engine stacks the reference model's `packed` leaves as they are, and a checkpoint's
projections are converted by the reference loader's own `params.packed_projection`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from . import native
from . import packed as packed_ops
from .bitlinear import quantize_activations
from .config import ModelConfig
from .modeling import _ACTIVATIONS, PRECISION, apply_rope, rope_tables

# projection -> HF suffix within a layer (the HF name is model.layers.N.<suffix>.weight)
PROJECTIONS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
LAYER_NORMS = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


@dataclasses.dataclass(frozen=True)
class Options:
    """How the products run (static: part of the compiled program).

    block_bytes: unpacked int8 codes per block of a projection (0: the whole matrix at once); see packed.py.
    head_block_bytes: float32 bytes of the output projection converted per block (0: all at once).
    reduce_rows: at most this many token rows use a fused multiply-reduce instead of unpack + int8 dot: it
        reads only the packed bytes, which is what a GPU wants for decode; XLA's CPU reduce is not vectorized.
    native: a layer runs in the CPU kernels of `native` instead of XLA: the products (AVX-512 VNNI / AMX from
        the packed bytes, the 16-bit table read as it is) with the RMSNorm / activation before them and the
        residual add after them, and prefill attention with its RoPE (float32 like XLA's, summed in another
        order); the options above then do not apply.
    query_block: queries per block of XLA's prefill attention (see `_attention`; 0: one block); 2B4T on the
        2-core CPU, 512 tokens: 12 ms per layer at 128, 15 ms at 64, 23 ms at 256. A GPU takes one block: fewer,
        larger products (its prefill-512 in BENCHMARKS.md predates the blocks and was not re-measured).
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
        # head blocks of ~7 MB float32 (668 rows of 2B4T): 78-86 ms per token against 122-167 ms at 14 MB
        return cls(block_bytes=packed_ops.BLOCK_BYTES, head_block_bytes=7 << 20)


@dataclasses.dataclass
class Weights:
    """Everything the engine reads; layer tensors are stacked on a leading layer axis L."""

    embed: jax.Array  # [V, H] float32, or uint16 bits of bf16 (2B4T); also the output projection when tied
    lm_head: jax.Array | None  # [V, H] untied output projection (same dtypes), or None
    norm: jax.Array  # f32 [H]
    packed: dict[str, jax.Array]  # projection -> uint8 [L, out/4, in]
    multipliers: dict[str, jax.Array]  # projection -> f32 [L]
    norms: dict[str, jax.Array]  # layer norm -> f32 [L, size] (sub-norms only in models that have them)

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


jax.tree_util.register_dataclass(
    Weights, data_fields=["embed", "lm_head", "norm", "packed", "multipliers", "norms"], meta_fields=[]
)


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


def weights_from_checkpoint(ckpt, *, embed_dtype=None, release=None) -> Weights:
    """Weights from a bitnet_convert Checkpoint, one tensor at a time.

    Each projection is packed (`params.packed_projection`: HF and Flax bytes are regrouped without making int8
    codes) and copied into its stacked host array; each stacked array goes to the device as soon as its last
    layer is in. `release()` (optional) is called after every tensor,
    so a caller can drop the pages of a memory-mapped source it no longer needs (see bitnet_convert.generate).
    `embed_dtype` overrides the stored dtype of the embedding / head (default: keep it).
    """
    from bitnet_convert.validate import check_tensors

    from .params import packed_projection

    cfg = check_tensors(ckpt, str(ckpt.provenance.get("path") or "checkpoint"))
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
            if name not in host_packed:
                host_packed[name] = np.empty((L, *rows.shape), np.uint8)
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
    )
    _check_complete(weights, cfg)
    return weights


def weights_from_model(model) -> Weights:
    """Weights of a reference `BitNetForCausalLM` (inference mode); the embedding goes back to its stored dtype."""
    cfg = model.config
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


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """As modeling.RMSNorm: x / sqrt(mean(x^2) + eps) * weight, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * weight


def _bitlinear(h, names, p, m, opts: Options, layer, *, norm=None, eps: float = 0.0, act=None, up=None,
               residual=None) -> list[jax.Array]:
    """BitLinear of one input through the projections `names`: f32 [..., in] -> [f32 [..., out] per name].

    The input is first act(h) * up where `act` (a hidden_act name) and `up` are given, then RMSNorm'ed
    where `norm` (weight [in]) is; `residual` is added to the output of a single projection. XLA: those
    steps, quantize once, then `_project` each (p, m: this layer's slices). Native: one kernel call does it
    all (p, m: the whole stacks [L, ...], `layer` the index; the kernel reads its layer in place, where a
    slice would be a copy)."""
    if opts.native:
        lead = h.shape[:-1]

        def rows(a):  # [..., width] -> [tokens, width], as the kernel takes it
            return None if a is None else a.reshape(-1, a.shape[-1])

        outs = native.bitlinear(rows(h), layer, [(p[name], m[name]) for name in names], norm=norm, eps=eps,
                                act=act, up=rows(up), residual=rows(residual))
        return [out.reshape(*lead, out.shape[-1]) for out in outs]
    if act is not None:
        h = _ACTIVATIONS[act](h) * up
    if norm is not None:
        h = rms_norm(h, norm, eps)
    x_q, scale = quantize_activations(h)
    outs = [_project(x_q, scale, p[name], m[name], opts) for name in names]
    if residual is None:
        return outs
    (out,) = outs  # a residual goes with one projection, as in the kernel
    return [residual + out]


def _project(x_q, scale, packed, multiplier, opts: Options) -> jax.Array:
    """BitLinear on already quantized activations: int8 [..., in] -> f32 [..., out], as bitlinear.ternary_matmul."""
    rows = int(np.prod(x_q.shape[:-1]))
    if rows <= opts.reduce_rows:
        # One fused pass over the packed bytes (GPU decode): exact int32 multiply-add of the unpacked codes.
        codes = packed_ops.unpack(packed).astype(jnp.int32)  # [out, in], fused into the reduce
        acc = jnp.sum(x_q.astype(jnp.int32)[..., None, :] * codes, axis=-1)
    else:
        acc = packed_ops.packed_matmul(x_q, packed, block_bytes=opts.block_bytes)
    return acc.astype(jnp.float32) / scale * multiplier


def _attention(q, k, v, cached_k, cached_v, start, head_dim: int, query_block: int) -> jax.Array:
    """q [B, T, Hq, D], new k/v [B, T, KV, D], cached k/v [B, S, KV, D] or None -> [B, T, Hq*D].

    The new tokens attend causally among themselves and to the cache slots before `start`; that is the
    reference's masked attention over the updated cache, split in two so the cache is only read here.
    Query head h reads kv head h // G (G = Hq / KV), as HF's repeat_kv.
    """
    B, T, Hq, D = q.shape
    KV = k.shape[2]
    G = Hq // KV
    lowest = jnp.finfo(jnp.float32).min
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [T, T]
    if cached_k is None:
        # Prefill: per kv head and block of `query_block` queries, one [G*Tq, D] x [D, Tk] product over the keys
        # up to the block's last query only (causal: keys after it are masked anyway). XLA's CPU backend runs
        # these plain batched products far faster than 5-d einsums that need transposed operands, and skipping
        # the masked keys saves ~40% at 512 tokens (2B4T, 512 tokens: 12 against 62 ms per layer, measured).
        qg = q.reshape(B, T, KV, G, D).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
        blocks, step = [], query_block if query_block > 0 else T
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            rows = qg[:, :, :, t0:t1].reshape(B, KV, G * (t1 - t0), D)  # row g*Tq + t: head g, query t0 + t
            scores = jnp.einsum("bkmd,bksd->bkms", rows, kt[:, :, :t1], precision=PRECISION) * head_dim**-0.5
            probs = jax.nn.softmax(jnp.where(jnp.tile(causal[t0:t1, :t1], (G, 1)), scores, lowest), axis=-1)
            out = jnp.einsum("bkms,bksd->bkmd", probs, vt[:, :, :t1], precision=PRECISION)
            blocks.append(out.reshape(B, KV, G, t1 - t0, D))
        out = jnp.concatenate(blocks, axis=3)  # [B, KV, G, T, D]
        return out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq * D)
    q = q.reshape(B, T, KV, G, D)
    S = cached_k.shape[1]
    new = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=PRECISION) * head_dim**-0.5  # [B, KV, G, T, T]
    new = jnp.where(causal, new, lowest)
    old = jnp.einsum("btkgd,bskd->bkgts", q, cached_k, precision=PRECISION) * head_dim**-0.5  # [B,KV,G,T,S]
    old = jnp.where(jnp.arange(S) < start, old, lowest)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :S], cached_v, precision=PRECISION)
    out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], v, precision=PRECISION)
    return out.reshape(B, T, Hq * D)


def _layers(cfg: ModelConfig, opts: Options, w: Weights, x, cos, sin, start, cache: Cache | None):
    """All decoder layers in one scan: x [B, T, H] -> (x, new keys, new values [L, B, T, KV, D])."""
    B, T, _ = x.shape
    eps = cfg.rms_norm_eps

    def layer(x, xs):
        p, m, n, cached_k, cached_v, index = xs  # this layer's weights (see below), norms, cache slices

        def bitlinear(h, *names, norm, up=None, residual=None):  # norm: the name of the norm before it
            act = None if up is None else cfg.hidden_act
            return _bitlinear(h, names, p, m, opts, index, norm=n.get(norm), eps=eps, act=act, up=up,
                              residual=residual)

        q, k, v = bitlinear(x, "q_proj", "k_proj", "v_proj", norm="input_layernorm")
        q = q.reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if opts.native and cached_k is None:  # 2B4T, 512 tokens: ~8 against 15-18 ms per layer (XLA)
            attn, k = native.causal_attention(q, k, v, cos, sin)  # k comes back rotated, for the cache
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cached_k is not None:
                k, v = k.astype(cached_k.dtype), v.astype(cached_v.dtype)  # attend to what the cache will hold
            attn = _attention(q, k, v, cached_k, cached_v, start, cfg.head_dim, opts.query_block)
        x = bitlinear(attn, "o_proj", norm="attn_sub_norm", residual=x)[0]  # Llama-family: no sub-norms
        gate, up = bitlinear(x, "gate_proj", "up_proj", norm="post_attention_layernorm")
        x = bitlinear(gate, "down_proj", norm="ffn_sub_norm", up=up, residual=x)[0]  # act(gate) * up: [B, T, F]
        return x, (k, v)

    L = cfg.num_hidden_layers
    none = jnp.zeros((L, 0))  # scan needs an array where a layer has no cache
    # Native products read their layer out of the whole stacks (closed over, indexed by the scan's layer
    # number); XLA's products take the scan's slices.
    packed, multipliers = ({}, {}) if opts.native else (w.packed, w.multipliers)
    xs = (packed, multipliers, w.norms, none if cache is None else cache.keys,
          none if cache is None else cache.values, jnp.arange(L, dtype=jnp.int32))

    def body(x, xs):
        p, m, n, ck, cv, index = xs
        if opts.native:
            p, m = w.packed, w.multipliers
        return layer(x, (p, m, n, None if cache is None else ck, None if cache is None else cv, index))

    x, (keys, values) = jax.lax.scan(body, x, xs)
    return x, keys, values


def _logits(opts: Options, w: Weights, h: jax.Array) -> jax.Array:
    """f32 h [N, H] -> f32 logits [N, V] against the (stored-dtype) output table, converted block by block."""
    table = w.embed if w.lm_head is None else w.lm_head  # [V, H]
    V, H = table.shape
    if opts.native:
        return native.table_matmul(h, table)

    def block(rows):  # [r, H] -> [N, r]
        return jnp.einsum("nh,vh->nv", h, _to_float32(rows), precision=PRECISION)

    if opts.reduce_rows and h.shape[0] <= opts.reduce_rows:  # GPU decode: one fused pass over the 16-bit table
        if table.dtype == jnp.uint16:
            table = jax.lax.bitcast_convert_type(table.astype(jnp.uint32) << 16, jnp.float32)
        return jnp.sum(h[:, None, :] * table[None].astype(jnp.float32), axis=-1)
    per_block = packed_ops.block_rows(V, 4 * H, opts.head_block_bytes)  # float32 bytes per row
    if per_block == V:
        return block(table)
    out = jax.lax.map(block, table.reshape(V // per_block, per_block, H))  # [nb, N, r]
    return jnp.moveaxis(out, 0, 1).reshape(h.shape[0], V)


def _to_float32(table: jax.Array) -> jax.Array:
    """Exact float32 of a table block (uint16 bf16 bits or float32), materialized before the dot that reads it.

    Why bits: a bf16 is the high half of its float32, so `bits << 16` is the exact value, and XLA's CPU runs
    that integer shift ~6x faster than its bf16 convert (2B4T's tied head, 328 M values per token: 78-86 ms
    against 470-540 ms, measured side by side; a bitcast of a bf16 array inside the program is as slow as the
    convert, hence uint16 storage). The barrier keeps XLA from fusing the conversion into the dot, whose
    fused form is a naive loop.
    """
    if table.dtype == jnp.uint16:
        table = jax.lax.bitcast_convert_type(table.astype(jnp.uint32) << 16, jnp.float32)
    return jax.lax.optimization_barrier(table.astype(jnp.float32))


def _embed(w: Weights, token_ids: jax.Array) -> jax.Array:
    rows = jnp.take(w.embed, token_ids, axis=0)  # [B, T, H]
    if rows.dtype == jnp.uint16:  # bf16 bits, see _to_float32
        return jax.lax.bitcast_convert_type(rows.astype(jnp.uint32) << 16, jnp.float32)
    return rows.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "max_length"))
def prefill(cfg: ModelConfig, opts: Options, w: Weights, token_ids, prompt_length, max_length: int):
    """Right-padded prompts int [B, P] -> (logits [B, V] at the last real token, a Cache of max_length slots
    holding the prompt, length = prompt_length)."""
    B, P = token_ids.shape
    positions = jnp.arange(P, dtype=jnp.int32)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x, keys, values = _layers(cfg, opts, w, _embed(w, token_ids), cos, sin, jnp.int32(0), None)
    last = jax.lax.dynamic_index_in_dim(x, prompt_length - 1, axis=1, keepdims=False)  # [B, H]
    logits = _logits(opts, w, rms_norm(last, w.norm, cfg.rms_norm_eps))
    shape = (cfg.num_hidden_layers, B, max_length, cfg.num_key_value_heads, cfg.head_dim)
    cache_keys = jax.lax.dynamic_update_slice(jnp.zeros(shape, keys.dtype), keys, (0, 0, 0, 0, 0))
    cache_values = jax.lax.dynamic_update_slice(jnp.zeros(shape, values.dtype), values, (0, 0, 0, 0, 0))
    return logits, Cache(cache_keys, cache_values, jnp.asarray(prompt_length, jnp.int32))


def decode(cfg: ModelConfig, opts: Options, w: Weights, token_ids, cache: Cache):
    """One token per row int [B] at position cache.length -> (logits [B, V], cache with length + 1).

    Traceable (not jitted itself) so a caller can fuse sampling into the same compiled step; `decode_step`
    is the jitted, cache-donating version."""
    start = cache.length
    cos, sin = rope_tables(start[None], cfg.head_dim, cfg.rope_theta)
    x, keys, values = _layers(cfg, opts, w, _embed(w, token_ids[:, None]), cos, sin, start, cache)
    logits = _logits(opts, w, rms_norm(x[:, 0], w.norm, cfg.rms_norm_eps))
    keys = jax.lax.dynamic_update_slice(cache.keys, keys, (0, 0, start, 0, 0))  # in place: cache is donated
    values = jax.lax.dynamic_update_slice(cache.values, values, (0, 0, start, 0, 0))
    return logits, Cache(keys, values, start + 1)


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
    L, H, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (cfg.q_size, H), "k_proj": (cfg.kv_size, H), "v_proj": (cfg.kv_size, H),
              "o_proj": (H, cfg.q_size), "gate_proj": (F, H), "up_proj": (F, H), "down_proj": (H, F)}

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
    sizes = {"input_layernorm": H, "post_attention_layernorm": H}
    if cfg.sub_norms:
        sizes |= {"attn_sub_norm": H, "ffn_sub_norm": F}
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
