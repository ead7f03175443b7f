"""cbn.dask: one-pass exact statistics and lazy normalize over Dask chunks."""
import os
import threading
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import cbn  # noqa: E402
import cbn.dask  # noqa: E402
from cbn import reference  # noqa: E402

LAYOUTS = [
    # shape, feature axes, chunks (also along the feature axes, and uneven)
    ((20, 6), -1, (7, 6)),
    ((20, 6), -1, (3, 4)),
    ((20, 6, 5), (0, 2), (7, 4, 2)),
    ((20, 6, 5), 1, (20, 1, 5)),
    ((4, 3, 5, 2), [1, -1], (2, 2, 3, 1)),
    ((4, 3, 5, 2), (0, 1, 2, 3), (3, 2, 2, 2)),
    ((17,), 0, (5,)),
    ((30, 2), 1, ((0, 10, 0, 20), (1, 1))),     # empty chunks
]


@pytest.mark.parametrize("shape, axis, chunks", LAYOUTS)
@pytest.mark.parametrize("dtype, offset", [(np.float64, 0.0), (np.float64, 1e6),
                                           (np.float32, 10.0)])
def test_matches_numpy_on_small_data(shape, axis, chunks, dtype, offset):
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    darr = da.from_array(x, chunks=chunks)
    mean_ref, var_ref = reference.batch_stats(x, axis=axis)

    mean, var = cbn.dask.batch_stats(darr, axis=axis)
    assert mean.dtype == var.dtype == np.float64 and mean.shape == mean_ref.shape
    scale = np.abs(mean_ref) + np.sqrt(var_ref)
    np.testing.assert_array_less(np.abs(mean - mean_ref), 1e-13 * scale + 1e-300)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12 + 1e-14 * offset,
                               atol=1e-300 if var_ref.min() > 0 else 1e-12)

    gamma = 1.0 + rng.standard_normal(mean_ref.shape)
    beta = rng.standard_normal(mean_ref.shape)
    y = cbn.dask.batch_norm_inference(darr, mean_ref, var_ref, gamma, beta, axis=axis)
    assert isinstance(y, da.Array) and y.chunks == darr.chunks and y.dtype == x.dtype
    expected = reference.batch_norm_inference(x, mean_ref, var_ref, gamma, beta, axis=axis)
    computed = y.compute()
    assert computed.dtype == x.dtype
    # Chunk by chunk is the same kernel, element by element, as one call on the whole array.
    np.testing.assert_array_equal(
        computed, cbn.batch_norm_inference(x, mean_ref, var_ref, gamma, beta, axis=axis))
    np.testing.assert_allclose(computed, expected, rtol=1e-13, atol=1e-13)


def test_lazy_statistics_and_parameters_optional():
    x = np.random.default_rng(1).standard_normal((12, 3))
    darr = da.from_array(x, chunks=(5, 2))
    mean, var = cbn.dask.batch_stats(darr, compute=False)
    assert isinstance(mean, da.Array) and mean.shape == (3,) and mean.dtype == np.float64
    mean, var = dask.compute(mean, var)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-13)
    y = cbn.dask.batch_norm_inference(darr, mean, var).compute()
    np.testing.assert_allclose(y, reference.batch_norm_inference(x, mean, var), rtol=1e-13,
                               atol=1e-13)
    m = cbn.dask.batch_moments(darr, split_every=2)
    assert m.count == 12 and m.dtype == np.float64


def test_bad_input():
    ints = da.arange(12, chunks=4).reshape(6, 2)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        cbn.dask.batch_stats(ints)
    darr = da.ones((6, 2), chunks=3)
    with pytest.raises(ValueError, match="out of range"):
        cbn.dask.batch_stats(darr, axis=2)
    with pytest.raises(ValueError, match="gamma"):
        cbn.dask.batch_norm_inference(darr, np.zeros(2), np.ones(2), gamma=np.ones(3))
    # A chunk that is not what the array declares (here: float32 chunks in a float64 array).
    lying = darr.map_blocks(lambda b: b.astype(np.float32), dtype=np.float64)
    with pytest.raises(ValueError, match="dtype float32.*declares float64"):
        cbn.dask.batch_stats(lying)


def test_statistics_of_an_array_larger_than_the_worker_memory():
    """2 GB of data through one worker limited to 300 MB, with spilling switched off.

    The array is generated lazily chunk by chunk (10 MB chunks) on the worker, so no copy of it
    ever exists. If batch_stats held on to chunks, the worker would cross its limit and the
    nanny would kill it (terminate at 95%): the test checks the worker process is the same one
    throughout, samples its resident memory, and checks the result against Dask's own
    reductions on the same data.
    """
    distributed = pytest.importorskip("distributed")
    psutil = pytest.importorskip("psutil")
    limit = 300e6
    no_spill = {"distributed.worker.memory.target": False,
                "distributed.worker.memory.spill": False,
                "distributed.worker.memory.pause": False,
                "distributed.worker.memory.terminate": 0.95}
    with dask.config.set(no_spill), distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit=limit, processes=True,
            host="127.0.0.1", dashboard_address=":0", silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        (worker_pid,) = client.run(os.getpid).values()
        worker = psutil.Process(worker_pid)
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], worker.memory_info().rss)
                except psutil.NoSuchProcess:
                    return
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            x = 7.0 + da.random.default_rng(0).random((2_000_000, 125), chunks=(10_000, 125))
            assert x.nbytes >= 6 * limit
            start = time.perf_counter()
            mean, var = cbn.dask.batch_stats(x)
            elapsed = time.perf_counter() - start
        finally:
            done.set()
            sampler.join()
        assert list(client.run(os.getpid).values()) == [worker_pid], "worker was restarted"
        assert 0 < peak[0] < limit, f"worker peak RSS {peak[0] / 1e6:.0f} MB"
        # Uniform [7, 8): the statistics are those of U(0,1) shifted.
        np.testing.assert_allclose(mean, 7.5, atol=2e-3)
        np.testing.assert_allclose(var, 1 / 12, rtol=2e-2)
        # And exactly what Dask's own (two-pass) reductions give on the same data.
        dask_mean, dask_var = dask.compute(x.mean(axis=0), x.var(axis=0))
        np.testing.assert_allclose(mean, dask_mean, rtol=1e-13)
        np.testing.assert_allclose(var, dask_var, rtol=1e-9)
        print(f"2 GB in {elapsed:.1f} s, worker peak {peak[0] / 1e6:.0f} MB of "
              f"{limit / 1e6:.0f} MB")
