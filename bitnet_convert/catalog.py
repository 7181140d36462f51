"""`bitnet-convert list`: every format, HF layout, GGUF target / outtype / embedding type and model family the
tool reads and writes, with what runs each, as one table made from the code's own tables (registry.FORMATS,
hf.LAYOUTS, gguf.types.TARGETS / OUTTYPES / EMBED_TYPES, gguf.embedding, bitnet_core.config, the verification
runtimes), so the listing cannot say what the code does not do.
"""

from __future__ import annotations

import dataclasses

from bitnet_convert.formats import hf, registry
from bitnet_convert.formats.gguf import embedding as gguf_embedding
from bitnet_convert.formats.gguf import types as gguf_types
from bitnet_convert.verification import RUNTIMES
from bitnet_convert.verification.runtime import RUNTIME_TARGET
from bitnet_core.config import (
    BITNET_ARCHITECTURES,
    DEFAULT_ACTIVATION,
    EMBEDDING_MODEL_TYPES,
    LATENT_ARCHITECTURE,
    MODEL_TYPES,
)

KINDS = ("format", "layout", "gguf-target", "outtype", "embed-type", "family")
# The families each architecture class stands for (names only; what the code does comes from the tables).
FAMILY_NAMES = {"BitNetForCausalLM": "2B4T", "LlamaForCausalLM": "Falcon3, Falcon-E, Llama3-8B-1.58",
                LATENT_ARCHITECTURE: "1bitLLM bitnet_b1_58"}


@dataclasses.dataclass(frozen=True)
class Row:
    kind: str  # one of KINDS
    name: str  # what a user types (format, --layout, --target, --outtype, --embed-type) or the config's class
    reads: bool
    writes: bool
    what: str
    runs_in: str  # the runtimes (and the checks) that run it

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def rows() -> list[Row]:
    return [*_formats(), *_layouts(), *_targets(), *_outtypes(), *_embed_types(), *_families()]


def _formats() -> list[Row]:
    runs = {"hf": "transformers; the JAX model", "gguf": " / ".join(gguf_types.TARGETS)}
    return [Row("format", name, True, True, what, runs.get(name, "the JAX model (generate, verify, embed)"))
            for name, (_, what) in registry.FORMATS.items()]


def _layouts() -> list[Row]:
    written_by_default = "written by default for a model with no HF origin"
    return [Row("layout", name, True, True,
                layout.summary + (f"; {written_by_default}" if name == hf.DEFAULT_LAYOUT else ""),
                "transformers (quant_method bitnet)" if layout.quantization_config else
                "its model's own code (no quantization_config); the JAX model")
            for name, layout in hf.LAYOUTS.items()]


def _verified_by(target: str) -> list[str]:
    """The runtimes `verify --runtime` runs a file of this GGUF target in."""
    return [runtime for runtime in RUNTIMES if RUNTIME_TARGET.get(runtime) == target]


def _targets() -> list[Row]:
    out = []
    for name, target in gguf_types.TARGETS.items():
        graphs = ", ".join(f"{g.architecture} ({'sub-norms, ' if g.sub_norms else ''}{g.activation})"
                           for g in target.graphs)
        checks = _verified_by(name)
        out.append(Row("gguf-target", name, True, True,
                       f"--target {name}: architectures {graphs}; default --outtype {target.default_outtype}, "
                       f"--embed-type {target.default_embed_type}",
                       name + (f"; checked by verify --runtime {' / '.join(checks)}" if checks else "")))
    return out


def _outtypes() -> list[Row]:
    return [Row("outtype", name, True, True, f"projections as GGML {kind.ggml_type.name} "
                f"(general.file_type {int(kind.file_type)})", " / ".join(kind.targets))
            for name, kind in gguf_types.OUTTYPES.items()]


def _embed_types() -> list[Row]:
    return [Row("embed-type", name, True, True, f"token embeddings (and an untied head) as GGML {ggml.name}",
                " / ".join(gguf_types.TARGETS))
            for name, ggml in gguf_types.EMBED_TYPES.items()]


def _families() -> list[Row]:
    out = []
    for cls, sub_norms in BITNET_ARCHITECTURES.items():
        activation = DEFAULT_ACTIVATION[cls]
        if cls in gguf_embedding.ARCHITECTURES:
            model_type = next(t for t, c in EMBEDDING_MODEL_TYPES.items() if c == cls)
            arch = gguf_embedding.ARCHITECTURES[cls]
            out.append(Row("family", cls, True, True,
                           f"BitNet-embedding encoder (model_type {model_type}, {activation}); HF layout embedding",
                           f"GGUF {gguf_embedding.TARGET} {arch} ({gguf_embedding.OUTTYPE}); the JAX model (embed)"))
            continue
        layout = hf.LATENT_LAYOUT.get(cls) or hf.FAMILY_LAYOUTS.get(cls) or f"{hf.DEFAULT_LAYOUT} / online"
        runs = []
        for target in gguf_types.TARGETS:
            graph = gguf_types.graph_for(target, sub_norms, activation)
            other = "" if graph.activation == activation else f", which computes {graph.activation}: another function"
            runs.append(f"{target} {graph.architecture}{other}")
        out.append(Row("family", cls, True, True,
                       f"{FAMILY_NAMES.get(cls, cls)} (model_type {MODEL_TYPES[cls]}, {activation}"
                       f"{', sub-norms' if sub_norms else ''}); HF layout {layout}",
                       "; ".join(runs) + "; the JAX model (generate, verify)"))
    return out


def text() -> str:
    """The table, one row a line, columns aligned."""
    header = ("kind", "name", "reads", "writes", "what", "runs in")
    table = [header] + [(r.kind, r.name, "yes" if r.reads else "no", "yes" if r.writes else "no", r.what, r.runs_in)
                        for r in rows()]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths)), row[4], "|", row[5]])
                     for row in table)
