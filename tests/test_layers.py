"""Imports run one way: core <- file I/O <- formats <- model <- applications (verify, inspect, generate, api, cli).

Every import in every module counts, also those inside functions (a lazy import is still a dependency). The JAX
model stands on the core alone: it never reads a file format, a registry or the CLI.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bitnet_core", "bitnet_convert", "bitnet_model")

# Layers from the bottom up: a module may import its own layer and those below it.
LAYERS = (
    ("core", ("bitnet_core",)),
    ("fileio", ("bitnet_convert.fileio",)),
    ("formats", ("bitnet_convert.formats",)),
    ("model", ("bitnet_model",)),
    ("apps", ("bitnet_convert",)),
)
# What a layer may import besides itself, where that is narrower than "everything below".
ONLY = {"model": {"core"}, "core": set()}
# Third-party packages a layer may not import: the core is numpy + ml_dtypes; the converter's base install has no
# torch / transformers (the reference extra) and no optax (the training extra) outside the modules that need them.
FORBIDDEN_THIRD_PARTY = {
    "core": {"jax", "jaxlib", "flax", "optax", "torch", "transformers", "gguf", "safetensors", "huggingface_hub",
             "tokenizers", "click", "tqdm"},
}


def layer_of(module: str) -> str:
    best = max((prefix for _, prefixes in LAYERS for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(name for name, prefixes in LAYERS if best in prefixes)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".") if is_package else module.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from pkg import submodule` depends on the submodule
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if (ROOT / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").exists()
                      or (ROOT / (target + "." + alias.name).replace(".", "/") / "__init__.py").exists()]
    return found


def back_edges(module: str, source: str, is_package: bool = False) -> list[str]:
    layer = layer_of(module)
    order = [name for name, _ in LAYERS]
    allowed = ONLY.get(layer, set(order[: order.index(layer)])) | {layer}
    problems = []
    for line, target in imports_of(source, module, is_package):
        top = target.split(".")[0]
        if top in PACKAGES:
            if target == "bitnet_convert" and layer != "apps":  # the package's front door is an application
                problems.append(f"{module}:{line} imports the front door {target}")
            elif layer_of(target) not in allowed:
                problems.append(f"{module}:{line} ({layer}) imports {target} ({layer_of(target)})")
        elif top in FORBIDDEN_THIRD_PARTY.get(layer, ()):
            problems.append(f"{module}:{line} ({layer}) imports third-party {target}")
    return problems


def all_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield module_name(path), path


def test_every_import_runs_down_the_layers():
    problems = []
    for module, path in all_modules():
        problems += back_edges(module, path.read_text(), path.name == "__init__.py")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, source", [
    ("bitnet_model.params", "from bitnet_convert.formats import registry\n"),
    ("bitnet_model.engine", "def f():\n    from bitnet_convert.fileio.hub import resolve_source\n"),
    ("bitnet_core.names", "from bitnet_model import modeling\n"),
    ("bitnet_core.checkpoint", "import jax.numpy as jnp\n"),
    ("bitnet_convert.fileio.atomic", "from ..formats import hf\n"),
    ("bitnet_convert.formats.hf", "from bitnet_convert import verify\n"),
    ("bitnet_convert.formats.hf", "from bitnet_model.params import model_from_checkpoint\n"),
])
def test_a_back_edge_is_caught(module, source):
    assert back_edges(module, source), f"{source!r} in {module} should be refused"


def test_forward_edges_pass():
    assert not back_edges("bitnet_convert.verification", "from bitnet_model import params\nfrom ..formats import hf\n")
    assert not back_edges("bitnet_model.params", "from bitnet_core.checkpoint import Checkpoint\nimport jax\n")


def test_every_module_has_a_layer():
    assert {layer_of(module) for module, _ in all_modules()} == {name for name, _ in LAYERS}
