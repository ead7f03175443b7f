"""Synchronized batch norm over MPI: the statistics of the batch split across all ranks.

Every function mirrors the core API with one more argument, ``comm`` (an mpi4py
communicator; None means ``MPI.COMM_WORLD``), and must be called by every rank of ``comm``
(it is collective). Each rank passes its own shard of the batch — the shards may differ in size
along the reduced axes, and a rank may have no rows at all — and every rank gets the result the
single-process core API would give on the concatenation of all shards:

- forward gathers every rank's partial statistics ``(count, mean, M2)`` (one ``Allgather`` of
  ``2·n_features`` doubles per rank) and merges them with the exact pairwise merge of
  :func:`cbn.merge_moments`, then normalizes the local shard with :func:`cbn.batch_norm_inference`
  and those global statistics. Every rank merges the same data in the same canonical order, so
  ``mean`` and ``var`` (and hence moving statistics) are bitwise identical on every rank.
- backward computes the local ``Σdy`` and ``Σdy·x̂`` (with the global mean/var), all-reduces
  them (one ``Allreduce`` of ``2·n_features`` doubles), and finishes ``dx`` with the global
  count and sums via :func:`cbn.batch_norm_backward_from_sums`. The returned ``dgamma`` and
  ``dbeta`` are already the GLOBAL sums, identical on every rank: do not all-reduce them again.

Bad input never deadlocks: before any data moves, every rank validates its arguments locally
and all ranks exchange a small descriptor (the operation, error if any, rank, feature axes,
feature shape, dtypes, epsilon, row count). If any rank's input is bad, or the ranks disagree on
feature shape, dtype or axes, every rank raises the same exception together.
"""
import contextlib

import numpy as np

try:
    from mpi4py import MPI
except ImportError as error:   # pragma: no cover - exercised with mpi4py hidden
    raise ImportError(
        "cbn.mpi needs mpi4py and an MPI library. Install both from PyPI with "
        "`pip install mpi4py mpich`, then start your program "
        "with `mpiexec -n 4 python your_script.py`.") from error

import cbn
from . import _checks
from .api import gradient_sums

__all__ = ["batch_stats", "batch_moments", "batch_norm_forward", "batch_norm_backward",
           "sum_over_ranks", "checks_agreed"]

_ERROR_KINDS = {"TypeError": TypeError, "RuntimeError": RuntimeError}


class _LocalCheck:
    """Local validation whose error is shared with every rank instead of raised alone."""

    def __init__(self):
        self.error = None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None and issubclass(kind, Exception):
            self.error = value
            return True   # swallowed here; re-raised on every rank after the exchange
        return False


def _world(comm):
    return MPI.COMM_WORLD if comm is None else comm


def _agree(comm, operation, check, **fields):
    """Exchange descriptors; raise on every rank if any rank failed or the ranks disagree.

    Returns the list of every rank's ``fields`` (rank order).
    """
    local_error = check.error
    descriptor = {"operation": operation, "fields": fields if local_error is None else None,
                  "error": None if local_error is None
                  else (type(local_error).__name__, str(local_error))}
    everyone = comm.allgather(descriptor)

    failed = [(rank, d["error"]) for rank, d in enumerate(everyone) if d["error"] is not None]
    if failed:
        kind = _ERROR_KINDS.get(failed[0][1][0], ValueError)
        message = "; ".join(f"rank {rank}: {name}: {text}" for rank, (name, text) in failed)
        raise kind(f"bad input to cbn.mpi.{operation} — {message}") from local_error

    operations = {d["operation"] for d in everyone}
    if len(operations) > 1:
        calls = ", ".join(f"rank {r}: {d['operation']}" for r, d in enumerate(everyone))
        raise RuntimeError(f"ranks called different cbn.mpi collectives ({calls})")

    all_fields = [d["fields"] for d in everyone]
    for key in ("ndim", "axes", "feature_shape", "dtype", "dy_dtype", "epsilon", "has_gamma",
                "has_beta", "shapes"):
        if key not in fields:
            continue
        values = [f[key] for f in all_fields]
        if any(v != values[0] for v in values):
            by_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            what = {"ndim": "number of dimensions of x", "axes": "feature axes",
                    "feature_shape": "feature shape",
                    "dtype": "dtype of x", "dy_dtype": "dtype of dy", "epsilon": "epsilon",
                    "has_gamma": "whether gamma is given",
                    "has_beta": "whether beta is given",
                    "shapes": "shapes of the arrays to sum"}[key]
            raise ValueError(f"cbn.mpi.{operation}: ranks disagree on the {what} ({by_rank})")
    return all_fields


@contextlib.contextmanager
def checks_agreed(operation, comm=None):
    """Validate arguments before a cbn.mpi collective without hanging the other ranks.

    An exception raised inside the block is not raised on this rank alone: it is sent
    through the agreement that opens every cbn.mpi collective (named ``operation`` in the
    message), which the other ranks are entering, and every rank raises it together. A
    block that raises nothing communicates nothing. ``BatchNormalization(synchronized=True)``
    checks its inputs this way.
    """
    with _LocalCheck() as check:
        yield
    if check.error is not None:
        _agree(_world(comm), operation, check)


def sum_over_ranks(arrays, comm=None):
    """Element-wise sums over all ranks of each rank's list of ``arrays`` (collective).

    Entries may be None (they stay None). The sums are taken in rank order in float64, so
    they are bitwise identical on every rank. Ranks whose arrays differ in shape all raise.
    """
    with _LocalCheck() as check:
        local = [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]
        shapes = [None if a is None else a.shape for a in local]
    if check.error is not None:
        local = shapes = None
    everyone = _agree(_world(comm), "sum_over_ranks", check, shapes=shapes, arrays=local)
    summed = []
    for i, first in enumerate(everyone[0]["arrays"]):
        total = None if first is None else first.copy()
        for other in everyone[1:]:
            if total is not None:
                total += other["arrays"][i]
        summed.append(total)
    return summed


def _describe_x(x, axis):
    x = _checks.as_data(x)
    axes = _checks.kept_axes(x.ndim, axis)
    features = _checks.feature_shape(x.shape, axes)
    return x, axes, features


def _global_moments(x, axis, comm, operation, extra_check=None, **extra_fields):
    """Validate everywhere, then allgather every rank's moments and merge them."""
    comm = _world(comm)
    with _LocalCheck() as check:
        x, axes, features = _describe_x(x, axis)
        count = _checks.element_count(x.shape, axes)
        if extra_check is not None:
            extra_fields.update(extra_check(features))
        local = cbn.batch_moments(x, axis=axes)
    if check.error is not None:
        axes = features = count = None
        dtype = None
    else:
        dtype = x.dtype.str
    fields = _agree(comm, operation, check, ndim=getattr(x, "ndim", None), axes=axes,
                    feature_shape=features, dtype=dtype, count=count, **extra_fields)
    counts = [f["count"] for f in fields]
    if sum(counts) == 0:
        raise ValueError(
            f"cbn.mpi.{operation}: cannot take batch statistics over zero elements: every rank "
            f"has an empty shard (feature shape {features})")

    n_features = int(np.prod(features, dtype=np.int64))
    send = np.concatenate([local._mean.reshape(-1), local.m2.reshape(-1)])
    received = np.empty((comm.Get_size(), 2 * n_features), dtype=np.float64)
    comm.Allgather([send, MPI.DOUBLE], [received, MPI.DOUBLE])
    shards = [cbn.Moments(c, row[:n_features].reshape(features),
                          row[n_features:].reshape(features), dtype=x.dtype)
              for c, row in zip(counts, received)]
    return x, axes, cbn.merge_moments(shards)


def batch_moments(x, axis=-1, comm=None):
    """:func:`cbn.batch_moments` of the batch split across the ranks of ``comm`` (collective).

    Unlike the core function, raises ValueError if every rank's shard is empty.
    """
    return _global_moments(x, axis, comm, "batch_moments")[2]


def batch_stats(x, axis=-1, comm=None):
    """Batch ``(mean, var)`` of the whole batch split across the ranks (collective)."""
    merged = _global_moments(x, axis, comm, "batch_stats")[2]
    return merged.mean, merged.var


def batch_norm_forward(x, gamma=None, beta=None, axis=-1, epsilon=1e-3, comm=None):
    """Synchronized training-mode batch norm (collective).

    Returns ``(y, mean, var)``: ``y`` is this rank's shard normalized with the statistics of
    the whole batch; ``mean`` and ``var`` (float64, biased variance) are those statistics,
    bitwise identical on every rank.
    """
    def parameters(features):
        _checks.as_parameter(gamma, "gamma", features)
        _checks.as_parameter(beta, "beta", features)
        return {"epsilon": _checks.as_epsilon(epsilon), "has_gamma": gamma is not None,
                "has_beta": beta is not None}

    x, axes, merged = _global_moments(x, axis, comm, "batch_norm_forward", parameters)
    mean, var = merged.mean, merged.var
    if merged.count and x.size and _checks.element_count(x.shape, axes):
        y = cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axes, epsilon=epsilon)
    else:                                    # this rank holds no rows
        y = np.empty(x.shape, dtype=x.dtype)
    return y, mean, var


def batch_norm_backward(dy, x, mean, var, gamma=None, axis=-1, epsilon=1e-3, comm=None):
    """Synchronized training-mode batch-norm gradients (collective).

    ``mean`` and ``var`` are the global statistics the synchronized forward returned. Returns
    ``(dx, dgamma, dbeta)``: ``dx`` for this rank's shard, and the GLOBAL parameter gradients
    ``dgamma = Σ dy·x̂`` and ``dbeta = Σ dy`` over the whole batch (identical on every rank;
    they must not be all-reduced again).
    """
    comm = _world(comm)
    with _LocalCheck() as check:
        x, axes, features = _describe_x(x, axis)
        dy = _checks.as_data(dy, "dy")
        _checks.same_shape(dy, x)
        mean64 = _checks.as_parameter(mean, "mean", features)
        var64 = _checks.as_parameter(var, "var", features)
        if mean64 is None or var64 is None:
            raise TypeError("mean and var are required")
        _checks.as_parameter(gamma, "gamma", features)
        epsilon = _checks.as_epsilon(epsilon)
        count = _checks.element_count(x.shape, axes)
    ok = check.error is None
    fields = _agree(comm, "batch_norm_backward", check,
                    ndim=x.ndim if ok else None, axes=axes if ok else None,
                    feature_shape=features if ok else None,
                    dtype=x.dtype.str if ok else None, dy_dtype=dy.dtype.str if ok else None,
                    epsilon=epsilon if ok else None, has_gamma=gamma is not None,
                    count=count if ok else None)
    total = sum(f["count"] for f in fields)
    if total == 0:
        raise ValueError("cbn.mpi.batch_norm_backward: every rank has an empty shard")

    n_features = mean64.size
    sums = np.zeros(2 * n_features, dtype=np.float64)
    if count and x.size:
        # With the GLOBAL mean/var these are this shard's share of Σdy·x̂ and Σdy.
        local_dgamma, local_dbeta = gradient_sums(dy, x, mean64, var64, axis=axes,
                                                  epsilon=epsilon)
        sums[:n_features] = np.asarray(local_dgamma, dtype=np.float64).reshape(-1)
        sums[n_features:] = np.asarray(local_dbeta, dtype=np.float64).reshape(-1)
    comm.Allreduce(MPI.IN_PLACE, [sums, MPI.DOUBLE], op=MPI.SUM)
    dgamma = sums[:n_features].reshape(features).copy()
    dbeta = sums[n_features:].reshape(features).copy()
    dx = cbn.batch_norm_backward_from_sums(dy, x, mean64, var64, gamma, dbeta, dgamma, total,
                                           axis=axes, epsilon=epsilon)
    return dx, dgamma, dbeta
