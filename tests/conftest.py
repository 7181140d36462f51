"""Test-wide settings: CPU JAX in float32, no network, and tiny checkpoints built once per session."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _ReferenceExtraHidden:
    """BITNET_TESTS_WITHOUT_REFERENCE=1 runs the suite as the base install would: torch, transformers and accelerate
    (the reference extra) stay installed but cannot be imported, so the tests that need them skip."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "accelerate"):
            raise ModuleNotFoundError(f"{name}: hidden by BITNET_TESTS_WITHOUT_REFERENCE (not in the base install)")


if os.environ.get("BITNET_TESTS_WITHOUT_REFERENCE"):
    sys.meta_path.insert(0, _ReferenceExtraHidden())

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

import reference_extra  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: hf_checkpoint(layout="autobitlinear", **config_overrides) -> folder of a tiny HF checkpoint.

    Folders are cached per argument set for the whole session; treat them as read-only. The folders are written
    with torch and transformers (fixtures.py): without the reference extra, a test that asks for one skips."""
    reference_extra.require()
    from fixtures import write_hf_checkpoint

    cache = {}

    def make(layout: str = "autobitlinear", seed: int = 0, is_chaotic: bool = False, **overrides):
        key = (layout, seed, is_chaotic, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{layout}")
            cache[key] = write_hf_checkpoint(folder / "model", layout, seed=seed, is_chaotic=is_chaotic, **overrides)
        return cache[key]

    return make
