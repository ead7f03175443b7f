"""Forward and backward allocate nothing the size of x beyond their outputs.

tracemalloc sees every NumPy array allocation; the kernels' own work buffers (per-chunk
partial statistics) are a few doubles per feature and chunk, far below the limits here.
"""
import tracemalloc

import numpy as np
import pytest

import cbn

SHAPES = {"features inner": ((512, 1024), -1), "rows inner": ((16, 64, 32, 32), 1)}


def peak_bytes(call):
    call()  # plans are cached on the first call
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("case", SHAPES)
def test_with_out_buffers_nothing_large_is_allocated(case):
    shape, axis = SHAPES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    out = np.empty_like(x)
    mean, var = cbn.batch_stats(x, axis=axis)
    features = mean.shape
    gamma, beta = np.ones(features), np.zeros(features)
    limit = x.nbytes // 16
    assert peak_bytes(lambda: cbn.batch_norm_forward(x, gamma, beta, axis=axis, out=out)) < limit
    assert peak_bytes(lambda: cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis,
                                                       out=out)) < limit
    assert peak_bytes(lambda: cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis,
                                                      out=out)) < limit
    assert peak_bytes(lambda: cbn.batch_stats(x, axis=axis)) < limit


@pytest.mark.parametrize("case", SHAPES)
def test_without_out_only_the_output_is_allocated(case):
    shape, axis = SHAPES[case]
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    mean, var = cbn.batch_stats(x, axis=axis)
    for call in (lambda: cbn.batch_norm_forward(x, axis=axis),
                 lambda: cbn.batch_norm_backward(x, x, mean, var, axis=axis)):
        assert peak_bytes(call) < x.nbytes * 17 // 16


@pytest.mark.parametrize("offset", [0, 4, 16, 60, 64, 2064, 4092])
def test_large_outputs_start_on_a_line_at_the_page_offset_of_x(offset):
    # Streaming stores need whole lines; a store 16-64 bytes ahead of its load's position in
    # a 4 KiB page stalls the load (cbn._buffers.empty_like).
    rows, features = 300, 1000     # 1.2 MB: over api.ALIGNED_MIN_BYTES
    buffer = np.empty(rows * features + 2048, np.float32)
    start = (-buffer.ctypes.data % 4096 + offset) // buffer.itemsize
    x = buffer[start:start + rows * features].reshape(rows, features)
    x[...] = np.random.default_rng(2).standard_normal(x.shape)
    mean, var = cbn.batch_stats(x)
    for y in (cbn.batch_norm_forward(x)[0], cbn.batch_norm_inference(x, mean, var),
              cbn.batch_norm_backward(x, x, mean, var)[0]):
        assert y.ctypes.data % 64 == 0
        assert (x.ctypes.data - y.ctypes.data) % 4096 < 64
