"""Batch norm for Dask arrays: exact statistics in one pass over the chunks, lazy normalize.

:func:`batch_stats` computes :func:`cbn.batch_moments` of every chunk as the chunk is made
(each chunk is read once and then dropped: only the per-chunk ``(count, mean, M2)`` of the
features it holds is kept), merges them with the exact pairwise merge of
:func:`cbn.merge_moments` in a tree of fan-in ``split_every``, and assembles the features of
chunks split along the feature axes. So it works on arrays far larger than memory, for every
axis layout the core supports, and gives the statistics of the whole array to float64 rounding
even when |mean| ≫ std.

:func:`batch_norm_inference` is lazy: it returns a Dask array with the chunks of the input,
each chunk normalized by :func:`cbn.batch_norm_inference` with the slices of the parameters
for the features it holds.
"""
try:
    import dask
    import dask.array as da
except ImportError as error:   # pragma: no cover - exercised with dask hidden
    raise ImportError(
        "cbn.dask needs Dask: `pip install 'dask[array]'` (add `distributed` for clusters), "
        "or `pip install -e '.[dask]'` in the cbn checkout.") from error

import itertools
import math

import numpy as np

import cbn
from . import _checks

__all__ = ["batch_moments", "batch_stats", "batch_norm_inference", "moments_delayed"]

SPLIT_EVERY = 32


def _as_dask(darr, axis):
    if not isinstance(darr, da.Array):
        _checks.refuse_masked(darr, "x")
        darr = da.asarray(darr)
    _checks.refuse_masked(darr._meta, "x")       # a Dask array of masked chunks
    if not _checks.is_data_dtype(darr.dtype):
        raise TypeError(f"x must be float16, float32 or float64, got dtype {darr.dtype}")
    if darr.ndim == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    return darr, _checks.kept_axes(darr.ndim, axis)


def _chunk_moments(block, axes, expected_shape, dtype, where):
    """Moments of one chunk, after checking it is what the Dask array says it is."""
    _checks.refuse_masked(block, f"chunk {where}")
    block = np.asarray(block)
    if block.dtype != dtype:
        raise ValueError(f"chunk {where} has dtype {block.dtype}, but the Dask array declares "
                         f"{dtype}: shards of one batch must share a dtype")
    if any(not math.isnan(e) and e != s for e, s in zip(expected_shape, block.shape)):
        raise ValueError(f"chunk {where} has shape {block.shape}, but the Dask array's chunks "
                         f"say {expected_shape}")
    return cbn.batch_moments(block, axis=axes)


def _merge(*parts):
    return cbn.merge_moments(parts)


def _assemble(merged, grid_shape):
    """One Moments from the merged Moments of each block of features (C order over the grid)."""
    counts = {m.count for m in merged}
    if len(counts) > 1:    # every feature sees every row: cannot happen with a valid array
        raise ValueError(f"feature blocks disagree on the element count: {sorted(counts)}")
    if len(merged) == 1:
        return merged[0]

    def nest(arrays):
        grid = np.empty(len(arrays), dtype=object)
        grid[:] = arrays
        return grid.reshape(grid_shape).tolist()

    dtypes = {m.dtype for m in merged}
    return cbn.Moments(counts.pop(), np.block(nest([m._mean for m in merged])),
                       np.block(nest([m.m2 for m in merged])), dtype=dtypes.pop())


def moments_delayed(darr, axis=-1, split_every=SPLIT_EVERY):
    """A ``dask.delayed`` object that computes the :class:`cbn.Moments` of the whole array."""
    darr, axes = _as_dask(darr, axis)
    split_every = _checks.as_integer(split_every, "split_every")
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    blocks = darr.to_delayed()
    dtype = np.dtype(darr.dtype)
    reduced = [a for a in range(darr.ndim) if a not in axes]
    kept_grid = tuple(darr.numblocks[a] for a in axes)
    chunk_moments = dask.delayed(_chunk_moments, pure=True)
    merge = dask.delayed(_merge, pure=True)
    per_feature_block = []
    for kept_index in itertools.product(*(range(n) for n in kept_grid)):
        parts = []
        for reduced_index in itertools.product(*(range(darr.numblocks[a]) for a in reduced)):
            index = [0] * darr.ndim
            for a, i in zip(axes, kept_index):
                index[a] = i
            for a, i in zip(reduced, reduced_index):
                index[a] = i
            index = tuple(index)
            expected = tuple(darr.chunks[a][i] for a, i in enumerate(index))
            parts.append(chunk_moments(blocks[index], axes, expected, dtype, index))
        while len(parts) > 1:                           # tree of merges, fan-in split_every
            parts = [merge(*parts[i:i + split_every])
                     for i in range(0, len(parts), split_every)]
        per_feature_block.append(parts[0])
    return dask.delayed(_assemble, pure=True)(per_feature_block, kept_grid)


def batch_moments(darr, axis=-1, split_every=SPLIT_EVERY):
    """:class:`cbn.Moments` of a whole Dask array, computed now in one pass over its chunks."""
    return moments_delayed(darr, axis, split_every).compute()


def batch_stats(darr, axis=-1, compute=True, split_every=SPLIT_EVERY):
    """Batch ``(mean, var)`` (float64, biased variance) of a Dask array, as cbn.batch_stats.

    Parameters
    ----------
    darr : dask.array.Array (or array_like)
    axis : int or sequence of int
        The feature axes, as in the core API. Chunks may split any axis.
    compute : bool
        True (default): compute now (one pass) and return NumPy arrays. False: return lazy
        Dask arrays; compute them together (``dask.compute(mean, var)``) for one pass.
    split_every : int
        Fan-in of the merge tree.
    """
    darr, axes = _as_dask(darr, axis)
    features = _checks.feature_shape(darr.shape, axes)
    if any(math.isnan(e) for e in features):
        raise ValueError("the extents of the feature axes must be known "
                         "(call compute_chunk_sizes() first)")
    merged = moments_delayed(darr, axes, split_every)
    if compute:
        result = merged.compute()
        return result.mean, result.var
    mean = da.from_delayed(dask.delayed(lambda m: m.mean)(merged), features, np.float64)
    var = da.from_delayed(dask.delayed(lambda m: m.var)(merged), features, np.float64)
    return mean, var


def _normalize_chunk(block, mean, var, gamma, beta, axes, epsilon):
    features = tuple(block.shape[a] for a in axes)
    if block.size == 0:
        return np.empty(block.shape, dtype=block.dtype)
    shaped = [None if p is None else p.reshape(features) for p in (mean, var, gamma, beta)]
    return cbn.batch_norm_inference(block, *shaped, axis=axes, epsilon=epsilon)


def batch_norm_inference(darr, mean, var, gamma=None, beta=None, axis=-1, epsilon=1e-3):
    """Lazy inference-mode batch norm of a Dask array with given statistics.

    Returns a Dask array with ``darr``'s shape, chunks and dtype; each chunk is normalized by
    :func:`cbn.batch_norm_inference` with the slices of ``mean``, ``var``, ``gamma`` and
    ``beta`` (NumPy arrays of the feature shape) for the features it holds.
    """
    darr, axes = _as_dask(darr, axis)
    features = _checks.feature_shape(darr.shape, axes)
    mean = _checks.as_parameter(mean, "mean", features)
    var = _checks.as_parameter(var, "var", features)
    if mean is None or var is None:
        raise TypeError("mean and var are required")
    gamma = _checks.as_parameter(gamma, "gamma", features)
    beta = _checks.as_parameter(beta, "beta", features)
    epsilon = _checks.as_epsilon(epsilon)

    # Parameters become Dask arrays of extent 1 on the reduced axes, chunked like darr on the
    # feature axes: blockwise broadcasting then hands each chunk exactly its slice.
    broadcast_shape = tuple(darr.shape[a] if a in axes else 1 for a in range(darr.ndim))
    chunks = tuple(darr.chunks[a] if a in axes else (1,) for a in range(darr.ndim))

    def aligned(p):
        return None if p is None else da.from_array(p.reshape(broadcast_shape), chunks=chunks)

    return da.map_blocks(_normalize_chunk, darr, aligned(mean), aligned(var), aligned(gamma),
                         aligned(beta), axes=axes, epsilon=epsilon, dtype=darr.dtype,
                         meta=np.empty((0,) * darr.ndim, dtype=darr.dtype))
