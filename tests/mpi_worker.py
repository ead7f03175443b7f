"""Run under ``mpiexec -n P python -m mpi4py tests/mpi_worker.py SCENARIO`` by test_mpi.py.

Every rank builds the same full batch from a fixed seed, keeps its own (unequal, possibly
empty) shard, runs cbn.mpi, and compares its result with cbn.reference on the full batch.
Each rank prints ``rank R: SCENARIO ok`` at the end; any failure raises, and ``-m mpi4py``
turns an uncaught exception on one rank into MPI_Abort of all of them (no hang).
"""
import sys

import numpy as np
from mpi4py import MPI

import cbn
import cbn.mpi
from cbn import reference

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

TOLERANCE = {np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10),
             np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
             np.dtype(np.float16): dict(rtol=1e-2, atol=1e-2)}


def shard_sizes(total, with_empty):
    """Unequal sizes (rank r gets about r+1 parts); rank 1 gets nothing if with_empty."""
    weights = np.arange(1, size + 1)
    sizes = (total * weights) // weights.sum()
    sizes[0] += total - sizes.sum()
    if with_empty and size > 1:
        sizes[0] += sizes[1]
        sizes[1] = 0
    return [int(s) for s in sizes]


def my_slice(total, with_empty):
    sizes = shard_sizes(total, with_empty)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def same_on_every_rank(array, what):
    gathered = comm.allgather(np.ascontiguousarray(array).tobytes())
    assert all(g == gathered[0] for g in gathered), f"{what} differs between ranks"


# (shape, feature axes, split axis, dtype, offset, shard with no rows, local layout)
CASES = [
    ((13, 4), -1, 0, np.float64, 0.0, False, "C"),
    ((13, 4), -1, 0, np.float64, 1e4, True, "C"),
    ((11, 3, 5), (1, 2), 0, np.float32, 0.0, True, "C"),
    ((2, 12, 3), [0, -1], 1, np.float64, 3.0, False, "F"),
    ((9, 3, 4, 2), 1, 0, np.float64, -50.0, True, "C"),
    ((3, 10, 4), 0, 1, np.float32, 0.0, False, "T"),
    ((14, 6), -1, 0, np.float16, 0.0, True, "C"),
    ((7,), 0, None, np.float64, 0.0, False, "C"),   # every axis kept: each rank has all rows
]


def layout(array, kind):
    if kind == "F":
        return np.asfortranarray(array)
    if kind == "T":   # a transposed (non-contiguous) view with the same logical content
        return np.ascontiguousarray(array.T).T
    return array


def check_case(case_number, shape, axis, split_axis, dtype, offset, with_empty, kind):
    rng = np.random.default_rng(case_number)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, axis=axis)
    gamma = 1.0 + 0.1 * rng.standard_normal(mean_ref.shape)
    beta = rng.standard_normal(mean_ref.shape)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, gamma, beta, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(
        dy, x, mean_ref, var_ref, gamma, axis=axis)

    if split_axis is None:
        # No reduced axis to split: the whole "batch" is on every rank, and the synchronized
        # statistics are those of size copies of it — the same mean and var.
        index = (slice(None),) * len(shape)
        dx_ref = dx_ref / size
        dgamma_ref, dbeta_ref = dgamma_ref * size, dbeta_ref * size
    else:
        index = [slice(None)] * len(shape)
        index[split_axis] = my_slice(shape[split_axis], with_empty)
        index = tuple(index)
    x_local = layout(x[index], kind)
    dy_local = layout(dy[index], kind)
    tolerance = TOLERANCE[np.dtype(dtype)]
    where = f"case {case_number} rank {rank}"

    mean, var = cbn.mpi.batch_stats(x_local, axis=axis)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12, atol=1e-12, err_msg=where)
    np.testing.assert_allclose(var, var_ref, rtol=1e-10, atol=1e-12, err_msg=where)

    y, mean, var = cbn.mpi.batch_norm_forward(x_local, gamma, beta, axis=axis)
    assert y.dtype == x.dtype and y.shape == x_local.shape, where
    assert mean.dtype == var.dtype == np.float64 and mean.shape == mean_ref.shape, where
    np.testing.assert_allclose(y, y_ref[index], err_msg=where, **tolerance)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12, atol=1e-12, err_msg=where)
    np.testing.assert_allclose(var, var_ref, rtol=1e-10, atol=1e-12, err_msg=where)
    same_on_every_rank(mean, "mean")
    same_on_every_rank(var, "var")

    dx, dgamma, dbeta = cbn.mpi.batch_norm_backward(dy_local, x_local, mean, var, gamma,
                                                    axis=axis)
    assert dx.dtype == x.dtype and dx.shape == x_local.shape, where
    np.testing.assert_allclose(dx, dx_ref[index], err_msg=where, **tolerance)
    grad_tolerance = dict(rtol=1e-8, atol=1e-8) if dtype == np.float64 else tolerance
    np.testing.assert_allclose(dgamma, dgamma_ref, err_msg=where, **grad_tolerance)
    np.testing.assert_allclose(dbeta, dbeta_ref, err_msg=where, **grad_tolerance)
    same_on_every_rank(dgamma, "dgamma")
    same_on_every_rank(dbeta, "dbeta")


def scenario_check():
    for number, case in enumerate(CASES):
        check_case(number, *case)


# (shape, feature axes, split axis, shard with no rows, explicit communicator)
LAYER_CASES = [
    ((23, 5), -1, 0, False, False),
    ((17, 3, 4), [1, 2], 0, True, True),
    ((3, 19, 2), 2, 1, False, True),        # batch split along a non-leading reduced axis
]
LAYER_STEPS, LEARNING_RATE = 4, 0.3


def sgd(layer):
    for weight, gradient in zip(layer.trainable_weights, layer.gradients):
        weight -= LEARNING_RATE * gradient


def layer_weights(layer):
    return dict(zip(("gamma", "beta", "moving_mean", "moving_variance"), layer.get_weights()))


def check_layer_case(case_number, shape, axis, split_axis, with_empty, explicit_comm):
    """Train a synchronized layer on this rank's shard; compare with one process on the
    concatenated batch, and across ranks."""
    rng = np.random.default_rng(100 + case_number)
    layer_comm = comm.Dup() if explicit_comm else None
    kwargs = dict(axis=axis, momentum=0.8, epsilon=1e-3)
    synced = cbn.BatchNormalization(**kwargs, synchronized=True, comm=layer_comm)
    single = cbn.BatchNormalization(**kwargs)
    index = [slice(None)] * len(shape)
    index[split_axis] = my_slice(shape[split_axis], with_empty)
    index = tuple(index)
    where = f"layer case {case_number} rank {rank}"
    for step in range(LAYER_STEPS):
        x = 3.0 + (1.0 + step) * rng.standard_normal(shape)
        target = 0.5 * rng.standard_normal(shape) + 0.2
        # loss = mean over the GLOBAL batch of ½(y − target)²: dy is divided by the global size
        y_single = single(x, training=True)
        single.backward((y_single - target) / x.size)
        y = synced(x[index], training=True)
        np.testing.assert_allclose(y, y_single[index], rtol=1e-12, atol=1e-12, err_msg=where)
        dx = synced.backward((y - target[index]) / x.size)
        assert len(synced.gradients) == len(single.gradients) == 2, where
        for g, g_single in zip(synced.gradients, single.gradients):
            np.testing.assert_allclose(g, g_single, rtol=1e-12, atol=1e-12, err_msg=where)
            same_on_every_rank(g, "layer gradient")
        sgd(single)
        sgd(synced)
    # Inference mode: local, and its gradients are global sums like the training-mode ones.
    x = 3.0 + rng.standard_normal(shape)
    np.testing.assert_allclose(synced(x[index]), single(x)[index], rtol=1e-12, atol=1e-12,
                               err_msg=where)
    dy = rng.standard_normal(shape)
    dx_single = single.backward(dy)
    dx = synced.backward(dy[index])
    np.testing.assert_allclose(dx, dx_single[index], rtol=1e-12, atol=1e-12, err_msg=where)
    for g, g_single in zip(synced.gradients, single.gradients):
        np.testing.assert_allclose(g, g_single, rtol=1e-12, atol=1e-12, err_msg=where)
        same_on_every_rank(g, "inference-mode layer gradient")

    ours, theirs = layer_weights(synced), layer_weights(single)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-12, atol=1e-12,
                                   err_msg=f"{where}: {name}")
        same_on_every_rank(ours[name], name)
    assert not np.allclose(ours["moving_mean"], 0.0), where         # the steps did something

    config = synced.get_config()
    assert config["synchronized"] is True and "comm" not in config, where
    assert single.get_config()["synchronized"] is False, where
    clone = cbn.BatchNormalization.from_config(config, comm=layer_comm)
    assert clone.synchronized and clone.comm is layer_comm, where
    if layer_comm is not None:
        layer_comm.Free()


def scenario_layer():
    assert cbn.BatchNormalization(synchronized=True).comm is None      # None = world
    for number, case in enumerate(LAYER_CASES):
        check_layer_case(number, *case)


def expect_error(kind, pattern, function, *args, **kwargs):
    """Every rank must raise ``kind`` matching ``pattern``; then all meet again."""
    import re
    try:
        function(*args, **kwargs)
    except kind as error:
        assert re.search(pattern, str(error)), f"rank {rank}: unexpected message: {error}"
    else:
        raise AssertionError(f"rank {rank}: {function.__name__} did not raise {kind.__name__}")
    # Everybody got here: nobody is stuck inside a collective.
    assert comm.allreduce(1) == size


def scenario_errors():
    assert size > 1, "the error scenario needs ranks that can disagree: run it with -n >= 2"
    rng = np.random.default_rng(0)
    good = rng.standard_normal((5, 4))
    # Ranks disagree on the feature shape.
    x = good if rank == 0 else rng.standard_normal((5, 3))
    expect_error(ValueError, "feature shape", cbn.mpi.batch_norm_forward, x)
    expect_error(ValueError, "feature shape", cbn.mpi.batch_stats, x)
    dy = np.ones_like(x)
    expect_error(ValueError, "feature shape", cbn.mpi.batch_norm_backward, dy, x,
                 np.zeros(x.shape[-1]), np.ones(x.shape[-1]))
    # Ranks disagree on the dtype.
    x = good.astype(np.float32) if rank == size - 1 else good
    expect_error(ValueError, "dtype", cbn.mpi.batch_norm_forward, x)
    # A bad argument on one rank only: every rank raises, naming that rank.
    gamma = np.ones(3) if rank == size - 1 else np.ones(4)
    expect_error(ValueError, f"rank {size - 1}.*gamma", cbn.mpi.batch_norm_forward, good,
                 gamma)
    x = np.arange(20).reshape(5, 4) if rank == 0 else good        # integer data on rank 0
    expect_error(TypeError, "rank 0", cbn.mpi.batch_norm_forward, x)
    dy = np.ones((4, 4)) if rank == 0 else np.ones((5, 4))
    expect_error(ValueError, "rank 0.*dy", cbn.mpi.batch_norm_backward, dy, good,
                 np.zeros(4), np.ones(4))
    # Every shard empty: there are no statistics to take.
    expect_error(ValueError, "zero elements", cbn.mpi.batch_norm_forward, good[:0])
    # Different collectives on different ranks are reported, not hung on.
    call = cbn.mpi.batch_stats if rank == 0 else cbn.mpi.batch_norm_forward
    expect_error(RuntimeError, "different cbn.mpi collectives", call, good)
    # After all that, the communicator still works.
    y, mean, var = cbn.mpi.batch_norm_forward(good)
    np.testing.assert_allclose(mean, good.mean(axis=0))


def training_step(layer, x, dy_scale=0.1):
    y = layer(x, training=True)
    layer.backward(dy_scale * y)
    sgd(layer)
    return y


def scenario_layer_errors():
    """A synchronized layer's own checks fail on one rank: every rank raises, none hangs.

    Every rank catches its exception (so -m mpi4py's abort on an uncaught one cannot help)."""
    assert size > 1, "the layer error scenario needs ranks that can disagree: run it with -n >= 2"
    rng = np.random.default_rng(rank)
    last = size - 1
    good = rng.standard_normal((6, 4))
    layer = cbn.BatchNormalization(synchronized=True)
    training_step(layer, good)
    # Training-mode calls: an input the built layer refuses, on one rank.
    x = rng.standard_normal((6, 3)) if rank == last else good
    expect_error(ValueError, f"rank {last}: ValueError: layer .* was built for", layer, x,
                 training=True)
    x = rng.standard_normal((6, 2, 4)) if rank == 0 else good
    expect_error(ValueError, "rank 0: .*rank 2", layer, x, training=True)
    # Backward after a training-mode call: a bad dy on one rank.
    layer(good, training=True)
    dy = np.ones((5, 4)) if rank == last else np.ones_like(good)
    expect_error(ValueError, f"rank {last}: .*dy has shape", layer.backward, dy)
    dy = np.ones(good.shape, dtype=np.int64) if rank == 0 else np.ones_like(good)
    expect_error(TypeError, "rank 0: .*floating", layer.backward, dy)
    # Backward after an inference-mode call sums dγ, dβ over the ranks: the same holds.
    layer(good)
    dy = np.ones((6, 5)) if rank == last else np.ones_like(good)
    expect_error(ValueError, f"rank {last}: .*dy has shape", layer.backward, dy)
    # A layer that one rank never called.
    fresh = cbn.BatchNormalization(synchronized=True)
    if rank != 0:
        fresh(good)
    expect_error(RuntimeError, "rank 0: .*call the layer before backward", fresh.backward,
                 np.ones_like(good))
    # A first call that fails everywhere builds nothing anywhere: it can be retried.
    for bad_on_one_rank in (rng.standard_normal((6, 5)),            # ranks disagree
                            rng.standard_normal(6)):                # no feature axis here
        fresh = cbn.BatchNormalization(axis=-1 if bad_on_one_rank.ndim == 2 else 1,
                                       synchronized=True)
        x = bad_on_one_rank if rank == last else rng.standard_normal((6, 4))
        expect_error(ValueError, "rank", fresh, x, training=True)
        assert not fresh.built, f"rank {rank}: a failed first call left the layer built"
        training_step(fresh, good)
    # After all that, the layer still trains in step on every rank.
    training_step(layer, good)
    for weight in layer.get_weights():
        same_on_every_rank(weight, "weights after the errors")


def scenario_layer_copies():
    """Pickled and deep-copied synchronized layers keep weights, config and behaviour."""
    import copy
    import pickle
    rng = np.random.default_rng(7)
    x = [3.0 + rng.standard_normal((8, 3, 2)) for _ in range(3)]
    for explicit_comm in (False, True):
        layer_comm = comm.Dup() if explicit_comm else None
        layer = cbn.BatchNormalization(axis=[1, 2], momentum=0.7, synchronized=True,
                                       comm=layer_comm)
        training_step(layer, x[0][rank::size])
        unpickled = pickle.loads(pickle.dumps(layer))
        deep = copy.deepcopy(layer)
        assert unpickled.comm is None and deep.comm is layer_comm
        for clone in (unpickled, deep):
            assert clone.get_config() == layer.get_config()
            assert clone.synchronized and clone.built
            for ours, theirs in zip(clone.get_weights(), layer.get_weights()):
                assert ours.tobytes() == theirs.tobytes()
            assert clone.moving_mean is not layer.moving_mean
        # The same steps on the original and on each copy: the same bits (collective calls,
        # so every copy still talks to the other ranks).
        for step in x[1:]:
            expected = training_step(layer, step[rank::size])
            for clone in (unpickled, deep):
                assert training_step(clone, step[rank::size]).tobytes() == expected.tobytes()
        for clone in (unpickled, deep):
            for ours, theirs in zip(clone.get_weights(), layer.get_weights()):
                assert ours.tobytes() == theirs.tobytes()
            for ours, theirs in zip(clone.gradients, layer.gradients):
                assert ours.tobytes() == theirs.tobytes()
        if layer_comm is not None:
            layer_comm.Free()


if __name__ == "__main__":
    scenario = sys.argv[1]
    {"check": scenario_check, "errors": scenario_errors, "layer": scenario_layer,
     "layer_errors": scenario_layer_errors, "layer_copies": scenario_layer_copies}[scenario]()
    comm.Barrier()
    print(f"rank {rank}: {scenario} ok", flush=True)
