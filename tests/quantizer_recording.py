"""Our model's int8 activations, recorded call by call (the parity tests compare them with the reference's)."""

import numpy as np

from bitnet_model import bitlinear


def run_recording_codes(forward, ids, monkeypatch):
    """(forward(int32 ids) as numpy, the int8 activations of every quantizer call in call order) of an eager run."""
    codes = []
    original = bitlinear.quantize_activations

    def record(x):
        x_q, scale = original(x)
        codes.append(np.asarray(x_q))
        return x_q, scale

    monkeypatch.setattr(bitlinear, "quantize_activations", record)
    out = np.asarray(forward(np.asarray(ids, np.int32)))
    monkeypatch.undo()
    return out, codes
