"""Host buffers XLA's CPU client adopts without a copy (bitnet_core/aligned.py)."""

import numpy as np
import pytest

from bitnet_core.aligned import ALIGNMENT, aligned_empty


@pytest.mark.parametrize("shape,dtype", [((7,), np.uint8), ((3, 5), np.float32),
                                         ((2, 3, 1000), np.uint16), ((1 << 20,), np.uint8)])
def test_aligned_empty_starts_on_the_boundary_with_the_asked_shape(shape, dtype):
    for _ in range(4):  # several allocations: numpy's own start 16 bytes past a boundary
        array = aligned_empty(shape, dtype)
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.ctypes.data % ALIGNMENT == 0
        assert array.flags.c_contiguous and array.flags.writeable


def test_jax_adopts_an_aligned_buffer_and_copies_an_unaligned_one():
    """What the loaders rely on: device_put of an aligned array aliases it on the CPU backend."""
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "cpu":
        pytest.skip("zero-copy adoption is a CPU-backend property")
    aligned = aligned_empty((4096,), np.uint8)
    aligned[:] = 7
    adopted = jax.device_put(aligned)
    assert adopted.unsafe_buffer_pointer() == aligned.ctypes.data
    unaligned = aligned_empty((4096 + ALIGNMENT,), np.uint8)[16 : 16 + 4096]  # where numpy's own would start
    assert unaligned.ctypes.data % ALIGNMENT == 16
    assert jax.device_put(unaligned).unsafe_buffer_pointer() != unaligned.ctypes.data


def test_safetensors_reads_land_aligned(tmp_path):
    from safetensors.numpy import save_file

    from bitnet_convert.fileio.safetensors_io import SafetensorsFile

    save_file({"a": np.arange(10, dtype=np.uint8), "b": np.ones((3, 7), np.float32)}, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    for name in ("a", "b"):
        assert f.tensors[name].read().ctypes.data % ALIGNMENT == 0
