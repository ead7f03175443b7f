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
