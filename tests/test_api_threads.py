"""Results are bitwise identical whatever the thread count, on every kernel path.

Each thread count runs in a fresh process: a process caches its plans (and their work
split) at the first call, so comparing thread counts inside one process would compare the
first count's split with itself. The cases are large enough to be split into many chunks
and run in parallel; they are also checked against the reference, so a wrong parallel split
cannot hide.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cbn
from cbn import _kernels, reference
from processes import environment, run

TESTS = Path(__file__).resolve().parent
THREAD_COUNTS = (1, 2)
DTYPES = (np.float32, np.float64)
LAYOUTS = {"C": np.ascontiguousarray, "F": np.asfortranarray,
           "T": lambda a: np.ascontiguousarray(a.T).T}          # a transposed view
CASES = {
    # name: (shape, axis, layouts of x and dy) -- which kernel path each exercises
    "features inner, many chunks": ((20000, 64), -1, "CC"),
    "features inner, feature tiles": ((64, 3000), -1, "CC"),
    "rows inner, planes in memory order": ((8, 64, 32, 32), 1, "CC"),   # 8 chunks of images
    "rows inner, fused per feature": ((4, 64, 64, 64), 1, "CC"),       # under 8 images
    "rows inner, chunked features": ((4, 3, 256, 256), 1, "CC"),
    "rows inner, streaming stores": ((8, 16, 200, 260), 1, "CC"),   # output over 16 MB
    # rows wrap mid-vector; 107 = 64 + 32 + 8 + 3 features, every strip width
    "features inner, streaming stores": ((45000, 107), -1, "CC"),
    "transposed view": ((512, 768), -1, "TT"),
    "non-adjacent kept axes": ((16, 6, 40, 5, 20), [1, 3], "CC"),
    "x and dy in different layouts": ((19, 60, 40), -1, "CF"),      # tiles staged in cache
}
OUTPUTS = ("y", "mean", "var", "dx", "dgamma", "dbeta", "y_inference", "stats_mean",
           "stats_var", "dx_from_sums")


def make(shape, layouts, dtype):
    """(x, dy) in their layouts."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype) * 2 + 1
    dy = rng.standard_normal(shape).astype(dtype)
    return LAYOUTS[layouts[0]](x), LAYOUTS[layouts[1]](dy)


def run_all(x, dy, axis):
    """Every entry point on x (and dy), in the order of OUTPUTS."""
    y, mean, var = cbn.batch_norm_forward(x, axis=axis)
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, axis=axis)
    y_inference = cbn.batch_norm_inference(x, mean, var, axis=axis)
    stats_mean, stats_var = cbn.batch_stats(x, axis=axis)
    count = x.size // mean.size
    dx_from_sums = cbn.batch_norm_backward_from_sums(dy, x, mean, var, None, dbeta, dgamma,
                                                     count, axis=axis)
    return (y, mean, var, dx, dgamma, dbeta, y_inference, stats_mean, stats_var,
            dx_from_sums)


def digests(outputs):
    """The bits of every output, short enough to pass between processes."""
    return [f"{a.dtype.str} {a.shape} {hashlib.sha256(a.tobytes()).hexdigest()}"
            for a in outputs]


def print_digests():
    """Run by each fresh process: its thread count and every case's output digests."""
    print(json.dumps({"threads": _kernels.max_threads(),
                      "digests": {f"{case} {np.dtype(dtype).name}":
                                  digests(run_all(*make(shape, layouts, dtype), axis))
                                  for case, (shape, axis, layouts) in CASES.items()
                                  for dtype in DTYPES}}))


@pytest.fixture(scope="module")
def fresh_process_digests():
    """{thread count: {case and dtype: output digests}}, each count from a fresh process."""
    results = {}
    for n_threads in THREAD_COUNTS:
        code, output = run([sys.executable, "-c",
                            "import test_api_threads as t; t.print_digests()"], 300,
                           environment(OMP_NUM_THREADS=str(n_threads)), cwd=TESTS)
        assert code == 0, output
        report = json.loads(output.splitlines()[-1])     # after any warnings
        assert report["threads"] == n_threads
        results[n_threads] = report["digests"]
    return results


@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: one thread only")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_bitwise_identical_for_one_and_two_threads_in_fresh_processes(
        fresh_process_digests, case, dtype):
    shape, axis, layouts = CASES[case]
    x, dy = make(shape, layouts, dtype)
    with threadpool_limits(2, user_api="openmp"):
        outputs = run_all(x, dy, axis)
    key = f"{case} {np.dtype(dtype).name}"
    for n_threads in THREAD_COUNTS:
        for name, got, expected in zip(OUTPUTS, fresh_process_digests[n_threads][key],
                                       digests(outputs)):
            assert got == expected, f"{name}: a fresh {n_threads}-thread process differs"

    parallel = dict(zip(OUTPUTS, outputs))
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, axis=axis)
    np.testing.assert_allclose(parallel["mean"], mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(parallel["var"], var_ref, rtol=1e-11)
    np.testing.assert_array_equal(parallel["stats_mean"], parallel["mean"])
    np.testing.assert_array_equal(parallel["stats_var"], parallel["var"])
    tolerance = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(parallel["y"], y_ref, atol=tolerance * 10)
    np.testing.assert_allclose(parallel["y_inference"], y_ref, atol=tolerance * 10)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy, x, mean_ref, var_ref,
                                                                  axis=axis)
    np.testing.assert_allclose(parallel["dx"], dx_ref, atol=tolerance * 10)
    np.testing.assert_allclose(parallel["dx_from_sums"], dx_ref, atol=tolerance * 10)
    np.testing.assert_allclose(parallel["dgamma"], dgamma_ref, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(parallel["dbeta"], dbeta_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: one thread only")
def test_threadpoolctl_limits_reach_the_kernels():
    for n_threads in THREAD_COUNTS:
        with threadpool_limits(n_threads, user_api="openmp"):
            assert _kernels.max_threads() == n_threads


def test_build_is_the_one_asked_for():
    # CBN_OPENMP=0 asks for the serial build (tests/test_build.py runs this test on it);
    # otherwise gcc with libgomp is on every machine this project builds on.
    assert cbn.openmp_enabled() == (os.environ.get("CBN_OPENMP") != "0")
