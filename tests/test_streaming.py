"""Streaming stores change where values are written, never what: NCHW planes that follow
each other in memory are written as one run (the kernels' planes loops, a vector spanning two
planes taking each lane's factors from its own plane), and must equal, bit for bit, the same
planes written one by one (an output whose planes have gaps between them), with streaming
stores and without, at plane lengths around the vector and the cache line, in outputs that
start off the line, on one and two threads."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cbn
from cbn import reference

from layouts import assert_close, condition, streaming_stores

PLANES = [(2, 4), (3, 3), (3, 5), (4, 4), (1, 17), (7, 7), (5, 13)]


def off_the_line(shape, dtype, offset):
    """An empty C-ordered array starting offset elements past a 64-byte line."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(int(np.prod(shape)) + 64, dtype)
    start = (-raw.ctypes.data % 64) // itemsize + offset
    return raw[start:start + int(np.prod(shape))].reshape(shape)


def planes_apart(shape, dtype):
    """An empty array of shape whose planes (the last two axes) have a row of gap after each."""
    return np.empty(shape[:-2] + (shape[-2] + 1, shape[-1]), dtype)[..., :shape[-2], :]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("plane", PLANES, ids=lambda p: f"{p[0]}x{p[1]}")
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_planes_written_as_one_run_equal_planes_one_by_one(dtype, plane, offset):
    rng = np.random.default_rng(plane[0] * 100 + plane[1])
    shape = (12, 10) + plane      # 12 images: the planes walk
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.standard_normal(10), rng.standard_normal(10)
    mean, var = reference.batch_stats(x, axis=1)
    calls = {
        "inference": lambda out: cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=1,
                                                          out=out),
        "forward": lambda out: cbn.batch_norm_forward(x, gamma, beta, axis=1, out=out)[0],
        "backward": lambda out: cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=1,
                                                        out=out)[0],
    }
    for name, call in calls.items():
        results = []
        for threads in (1, 2):
            for streaming in (False, True):
                for out in (off_the_line(shape, dtype, offset), planes_apart(shape, dtype)):
                    out[...] = np.nan
                    with threadpool_limits(threads), streaming_stores(streaming):
                        results.append(call(out).copy())
        for got in results[1:]:
            np.testing.assert_array_equal(got, results[0], err_msg=name)
    y_ref = reference.batch_norm_inference(x, mean, var, gamma, beta, axis=1)
    assert_close(calls["inference"](off_the_line(shape, dtype, offset)), y_ref, dtype,
                 condition(x, var, gamma, 1e-3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1023, 1100, 2051])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_long_runs_off_the_line_stream_their_whole_lines(length, offset, activation, dtype):
    """Runs of at least 4 KiB stream their whole lines even off the line (a column of a
    Fortran-ordered array, starting where NumPy put it), the ends with ordinary stores:
    the same bits as with no streaming, forward, inference and backward alike."""
    rng = np.random.default_rng(length + offset)
    shape = (length, 3)
    x = np.asfortranarray(rng.standard_normal(shape) * 2 + 1).astype(dtype, order="F")
    dy = np.asfortranarray(rng.standard_normal(shape)).astype(dtype, order="F")

    def fortran_off_the_line():
        out = off_the_line(shape[::-1], dtype, offset).T
        out[...] = np.nan
        return out

    y, mean, var = cbn.batch_norm_forward(x, activation=activation)
    calls = {
        "forward": lambda out: cbn.batch_norm_forward(x, out=out, activation=activation)[0],
        "inference": lambda out: cbn.batch_norm_inference(x, mean, var, out=out,
                                                          activation=activation),
        "backward": lambda out: cbn.batch_norm_backward(
            dy, x, mean, var, out=out, activation=activation,
            y=None if activation is None else y)[0],
    }
    for name, call in calls.items():
        results = []
        for streaming in (False, True):
            with streaming_stores(streaming):
                results.append(call(fortran_off_the_line()).copy())
        np.testing.assert_array_equal(results[1], results[0], err_msg=name)
