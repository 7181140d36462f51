"""One check shared by the format tests: two checkpoints hold the same tensors, bit for bit."""

import numpy as np

from bitnet_core.checkpoint import Ternary


def assert_same_tensors(expected, actual):
    """Same names in the same order; ternary codes and float32 multipliers equal, dense tensors equal in dtype,
    shape and bytes (bf16 included)."""
    assert list(actual.tensors) == list(expected.tensors)
    for name in expected.tensors:
        want, got = expected.load(name), actual.load(name)
        if isinstance(want, Ternary):
            assert isinstance(got, Ternary) and got.codes.dtype == np.int8, name
            np.testing.assert_array_equal(got.codes, want.codes, err_msg=name)
            assert got.multiplier.tobytes() == want.multiplier.tobytes(), name
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), name
