"""The `reference` extra in the tests: torch and transformers write the independent fixtures (fixtures.py,
families.py, embedding_fixtures.py) and compute the reference side. The base install has neither; a test that
needs them skips, saying which extra, and every other test runs.
"""

import numpy as np
import pytest

REASON = "needs the reference extra (torch, transformers): pip install 'bitnet-convert[reference]'"


def require() -> None:
    """Skip the calling test (or, at module level, the module) without torch or transformers."""
    for name in ("torch", "transformers"):
        pytest.importorskip(name, reason=REASON)


def transformers_pack_weights(codes: np.ndarray) -> np.ndarray:
    """transformers' own HF 2-bit packing of int codes [out, ...] (a fresh tensor each call: it mutates its input)."""
    require()
    import torch
    from transformers.integrations.bitnet import pack_weights

    return pack_weights(torch.from_numpy(codes.astype(np.float32))).numpy()
