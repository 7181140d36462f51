"""Every tensor a BitNet checkpoint holds: one table of tensor roles (HF name, NNX state key, GGUF name, shape,
kind, sharding), and the name conversions derived from it.

The Hugging Face names of `BitNetForCausalLM` are our canonical names in every format (docs/formats.md §3).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from bitnet_core.checkpoint import DENSE, TERNARY
from bitnet_core.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerRole:
    """One tensor of every decoder layer, under each of its names.

    HF name `model.layers.N.<hf>.weight`; GGUF name `blk.N.<gguf>.weight`; NNX state path: the HF name, with a
    ternary projection held as `<hf>.packed` + `<hf>.multiplier` (inference) or `<hf>.weight` (training);
    `name` is the engine's and the mesh's key. `shard`: how tensor parallelism splits it ("column": output rows,
    "row": input columns, None: replicated).
    """

    name: str
    hf: str
    gguf: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    kind: str  # TERNARY or DENSE
    # Only in models whose ModelConfig has this boolean field set ("sub_norms": BitNetForCausalLM's sub-norms;
    # "use_rms_norm", "qk_norm", "sandwich_norms": the BitNet-embedding encoders, docs/formats.md §12); None: all.
    needs: str | None = None
    shard: str | None = None

    @property
    def sub_norm_only(self) -> bool:
        return self.needs == "sub_norms"

    def present(self, cfg: ModelConfig) -> bool:
        return self.needs is None or bool(getattr(cfg, self.needs))


COLUMN, ROW = "column", "row"
LAYER_ROLES: tuple[LayerRole, ...] = (
    LayerRole("input_layernorm", "input_layernorm", "attn_norm", lambda c: (c.hidden_size,), DENSE),
    LayerRole("attn_sub_norm", "self_attn.attn_sub_norm", "attn_sub_norm", lambda c: (c.hidden_size,), DENSE,
              needs="sub_norms"),
    LayerRole("post_attention_layernorm", "post_attention_layernorm", "ffn_norm", lambda c: (c.hidden_size,), DENSE),
    LayerRole("ffn_sub_norm", "mlp.ffn_sub_norm", "ffn_sub_norm", lambda c: (c.intermediate_size,), DENSE,
              needs="sub_norms"),
    LayerRole("q_proj", "self_attn.q_proj", "attn_q", lambda c: (c.q_size, c.hidden_size), TERNARY, shard=COLUMN),
    LayerRole("k_proj", "self_attn.k_proj", "attn_k", lambda c: (c.kv_size, c.hidden_size), TERNARY, shard=COLUMN),
    LayerRole("v_proj", "self_attn.v_proj", "attn_v", lambda c: (c.kv_size, c.hidden_size), TERNARY, shard=COLUMN),
    LayerRole("o_proj", "self_attn.o_proj", "attn_output", lambda c: (c.hidden_size, c.q_size), TERNARY, shard=ROW),
    LayerRole("gate_proj", "mlp.gate_proj", "ffn_gate", lambda c: (c.intermediate_size, c.hidden_size), TERNARY,
              shard=COLUMN),
    LayerRole("up_proj", "mlp.up_proj", "ffn_up", lambda c: (c.intermediate_size, c.hidden_size), TERNARY,
              shard=COLUMN),
    LayerRole("down_proj", "mlp.down_proj", "ffn_down", lambda c: (c.hidden_size, c.intermediate_size), TERNARY,
              shard=ROW),
    # The BitNet-embedding encoders (Qwen3 / Gemma3 backbones): per-head q/k norms, Gemma's sandwich norms, and
    # the RMSNorm inside every BitLinear (`<proj>.norm`, on the projection's input: shape [in_features]).
    LayerRole("q_norm", "self_attn.q_norm", "attn_q_norm", lambda c: (c.head_dim,), DENSE, needs="qk_norm"),
    LayerRole("k_norm", "self_attn.k_norm", "attn_k_norm", lambda c: (c.head_dim,), DENSE, needs="qk_norm"),
    LayerRole("pre_feedforward_layernorm", "pre_feedforward_layernorm", "ffn_norm", lambda c: (c.hidden_size,),
              DENSE, needs="sandwich_norms"),
    LayerRole("post_feedforward_layernorm", "post_feedforward_layernorm", "post_ffw_norm",
              lambda c: (c.hidden_size,), DENSE, needs="sandwich_norms"),
)
# `<proj>.norm` of every projection, named `<gguf>_norm_in` in bitnet.cpp's embedding GGUFs.
LAYER_ROLES += tuple(
    LayerRole(f"{r.name}_norm", f"{r.hf}.norm", f"{r.gguf}_norm_in", (lambda c, r=r: (r.shape(c)[1],)), DENSE,
              needs="use_rms_norm")
    for r in LAYER_ROLES if r.kind == TERNARY
)
# In models with sandwich norms (Gemma3) `post_attention_layernorm` normalizes the attention output and
# `pre_feedforward_layernorm` is the FFN's input norm; GGUF names them so (llama.cpp's gemma3 names).
SANDWICH_GGUF = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm"}
# Views of the table: the ternary projections and the per-layer norms, by HF suffix.
PROJECTIONS: dict[str, LayerRole] = {r.hf: r for r in LAYER_ROLES if r.kind == TERNARY}
LAYER_NORMS: dict[str, LayerRole] = {r.hf: r for r in LAYER_ROLES if r.kind == DENSE}

# sentence-transformers' modules list and the pooling config it points to (the first `*Pooling` module's
# folder, `1_Pooling` in every model we know; docs/formats.md §12).
POOLING_CONFIG_FILE = "1_Pooling/config.json"
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
                               POOLING_CONFIG_FILE)

# The tokenizer files a checkpoint carries between formats (besides *.jinja chat templates): the allow-list of
# what travels, and of what --force may find in an output folder of ours.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    # sentence-transformers' files of the embedding models: they say how the encoder's output is pooled
    *SENTENCE_TRANSFORMERS_FILES,
)

# Whole-model tensors: HF name -> GGUF name.
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}.weight"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (logical shape, kind) for every tensor the model must have, in checkpoint order."""
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, cfg.hidden_size), DENSE)
    }
    for layer in range(cfg.num_hidden_layers):
        for role in LAYER_ROLES:
            if role.present(cfg):
                out[layer_name(layer, role.hf)] = (tuple(role.shape(cfg)), role.kind)
    out["model.norm.weight"] = ((cfg.hidden_size,), DENSE)
    if not cfg.tie_word_embeddings and not cfg.encoder:
        out["lm_head.weight"] = ((cfg.vocab_size, cfg.hidden_size), DENSE)
    return out


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def is_projection(hf_name: str) -> bool:
    m = _LAYER_RE.match(hf_name)
    return m is not None and m.group(2) in PROJECTIONS


def hf_to_gguf(hf_name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `blk.3.ffn_down.weight`."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m:
        layer, suffix = m.groups()
        role = _BY_HF.get(suffix)
        if role is not None:
            return f"blk.{layer}.{role.gguf}.weight"
    raise KeyError(f"no GGUF name for tensor {hf_name!r}")


_BY_HF = {r.hf: r for r in LAYER_ROLES}
# (GGUF's `ffn_norm` is post_attention_layernorm's except in sandwich models: formats/gguf/embedding.py maps those)
_GGUF_TO_HF_SUFFIX = {r.gguf: r.hf for r in reversed(LAYER_ROLES)}
_GGUF_GLOBAL_TO_HF = {g: h for h, g in GLOBAL_TENSORS.items()}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def gguf_to_hf(gguf_name: str) -> str:
    """`blk.3.ffn_down.weight` -> `model.layers.3.mlp.down_proj.weight`."""
    if gguf_name in _GGUF_GLOBAL_TO_HF:
        return _GGUF_GLOBAL_TO_HF[gguf_name]
    m = _BLK_RE.match(gguf_name)
    if m and m.group(2) in _GGUF_TO_HF_SUFFIX:
        return layer_name(int(m.group(1)), _GGUF_TO_HF_SUFFIX[m.group(2)])
    raise KeyError(f"no Hugging Face name for GGUF tensor {gguf_name!r}")


# ------------------------------------------------------------------------ NNX state keys (the Flax format's)
# A state key is the state path joined with '.'; list indices (layer numbers) are path ints. Module paths mirror
# the HF names, so a dense tensor's key is its HF name and a projection `X.weight` becomes `X.packed` (uint8
# [out/4, in], docs/formats.md §4) + `X.multiplier` (inference) or stays `X.weight` (training masters).

PACKED = "packed"
MULTIPLIER = "multiplier"
WEIGHT = "weight"


def ternary_keys(hf_name: str) -> tuple[str, str]:
    """`X.weight` -> (`X.packed`, `X.multiplier`)."""
    base = hf_name.removesuffix("." + WEIGHT)
    return f"{base}.{PACKED}", f"{base}.{MULTIPLIER}"


def dense_key(hf_name: str) -> str:
    return hf_name


def hf_name_of(key: str) -> tuple[str, str]:
    """State key -> (HF name, role) with role one of PACKED, MULTIPLIER, WEIGHT."""
    base, _, leaf = key.rpartition(".")
    if leaf in (PACKED, MULTIPLIER):
        return f"{base}.{WEIGHT}", leaf
    return key, WEIGHT


def key_path(key: str) -> tuple[str | int, ...]:
    """`model.layers.3.mlp.up_proj.packed` -> ('model', 'layers', 3, 'mlp', 'up_proj', 'packed')."""
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def path_key(path) -> str:
    return ".".join(str(part) for part in path)
