"""Running BitNet over a device mesh: tensor parallel over heads and FFN columns, data parallel over the batch.

    mesh = make_mesh(data=2, model=2)                       # axes ("data", "model")
    weights = shard_weights(cfg, engine_weights, mesh)      # packed engine weights, placed per weight_specs
    cache = shard_cache(cfg, cache, mesh); tokens = shard_batch(tokens, mesh)
    logits = engine.forward(cfg, engine.Options.for_backend(sharded=True), weights, tokens)

The layout is Megatron's: q/k/v/gate/up split their output rows over "model" (each device holds whole heads,
whole FFN columns when the sizes divide), o/down split their input columns the same way, so each layer needs
one all-reduce after o and one after down. The 2-bit packed rows hold 4 consecutive output rows each
(packed.py), so splitting packed rows splits output rows contiguously. Partial products are int32 and the
all-reduce of an exact integer sum is exact, so sharded logits equal unsharded ones up to float rounding of
the non-integer parts. Any size that does not divide (5 KV heads over 2 devices, a vocabulary over 3) stays
replicated: correct, only less memory saved. jit and GSPMD insert the collectives; the model code is the
same for one device and many.

`shard_model` does the same for the reference `BitNetForCausalLM`, whose projections hold the same packed
layout (`...q_proj.packed` uint8 [out/4, in]) and so split the same way.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bitnet_core import names
from bitnet_core.config import ModelConfig
from bitnet_model.engine import Cache, Weights

DATA, MODEL = "data", "model"
COLUMN_PARALLEL = tuple(r.name for r in names.LAYER_ROLES if r.shard == names.COLUMN)  # output rows split
ROW_PARALLEL = tuple(r.name for r in names.LAYER_ROLES if r.shard == names.ROW)  # input columns split
_KV = ("k_proj", "v_proj")


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh over data x model devices (model: all devices left over)."""
    devices = list(devices if devices is not None else jax.devices())
    model = model if model is not None else len(devices) // data
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA, MODEL))


def _split(size: int, mesh: Mesh, axis: str = MODEL) -> str | None:
    """The mesh axis to split a dimension of `size` over, or None (replicate) when it does not divide."""
    return axis if size % mesh.shape[axis] == 0 else None


def _kv_axis(cfg: ModelConfig, mesh: Mesh) -> str | None:
    return _split(cfg.num_key_value_heads, mesh)


def weight_specs(cfg: ModelConfig, weights: Weights, mesh: Mesh) -> Weights:
    """PartitionSpecs for every leaf of `weights` (same structure)."""
    packed = {}
    for name, array in weights.packed.items():  # [L, out/4, in]
        if name in COLUMN_PARALLEL:
            axis = _kv_axis(cfg, mesh) if name in _KV else _split(array.shape[1], mesh)
            packed[name] = P(None, axis, None)
        else:
            packed[name] = P(None, None, _split(array.shape[2], mesh))
    table = lambda t: None if t is None else P(_split(t.shape[0], mesh), None)  # vocab rows split
    return Weights(
        embed=table(weights.embed),
        lm_head=table(weights.lm_head),
        norm=P(),
        packed=packed,
        multipliers={name: P() for name in weights.multipliers},
        norms={name: P() for name in weights.norms},
    )


def _place(tree, specs, mesh: Mesh):
    shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs,
                                       is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(tree, shardings)


def shard_weights(cfg: ModelConfig, weights: Weights, mesh: Mesh) -> Weights:
    return _place(weights, weight_specs(cfg, weights, mesh), mesh)


def cache_spec(cfg: ModelConfig, mesh: Mesh) -> Cache:
    kv = P(None, DATA, None, _kv_axis(cfg, mesh), None)  # [L, B, S, KV, D]: batch on data, KV heads on model
    return Cache(kv, kv, P())


def shard_cache(cfg: ModelConfig, cache: Cache, mesh: Mesh) -> Cache:
    return _place(cache, cache_spec(cfg, mesh), mesh)


def shard_batch(token_ids, mesh: Mesh):
    """int [B, ...] with the batch split over "data" (B must divide by the data axis)."""
    spec = P(DATA, *([None] * (np.ndim(token_ids) - 1)))
    return jax.device_put(token_ids, NamedSharding(mesh, spec))


# ------------------------------------------------------------------------------------- reference model


def model_state_specs(model, mesh: Mesh):
    """PartitionSpecs for the state of a reference BitNetForCausalLM (inference mode), by state path."""
    cfg = model.config
    state = nnx.state(model)

    def spec(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]  # dict keys, attribute names
        if names[-1] == "value":  # the Variable's value inside the state path
            names = names[:-1]
        shape = leaf.shape
        if names[-1] == "packed":  # [out/4, in]: 4 consecutive output rows per packed row
            proj = names[-2]
            if proj in _KV:
                return P(_kv_axis(cfg, mesh), None)
            if proj in COLUMN_PARALLEL:
                return P(_split(shape[0], mesh), None)
            return P(None, _split(shape[1], mesh))
        if names[-2:] in (["embed_tokens", "weight"], ["lm_head", "weight"]):
            return P(_split(shape[0], mesh), None)
        return P()

    return jax.tree_util.tree_map_with_path(spec, state)


def shard_model(model, mesh: Mesh):
    """Place a reference model's state on the mesh in place (packed codes split as the engine's); returns the
    model. Its BitLinears then unpack whole matrices (`block_bytes = 0`): CPU blocks would cut across the
    rows split over devices, as in engine.Options.for_backend(sharded=True)."""
    from bitnet_model.bitlinear import BitLinear

    for _, module in nnx.iter_graph(model):
        if isinstance(module, BitLinear):
            module.block_bytes = 0
    state = nnx.state(model)
    specs = model_state_specs(model, mesh)
    nnx.update(model, _place(state, specs, mesh))
    return model
