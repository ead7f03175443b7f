"""Mergeable batch statistics: per-shard ``(count, mean, M2)`` and their exact merge.

The statistics of a batch split into shards (processes, Dask chunks, files) are the merge of
each shard's partial statistics: the element count ``n`` (the same for every feature), the
per-feature mean and the per-feature sum of squared deviations from that mean,
``M2 = Σ (x − mean)²``, all in float64. Two shards ``a`` and ``b`` merge with Chan, Golub &
LeVeque's pairwise formula (Chan et al., "Updating formulae and a pairwise algorithm for
computing sample variances", 1979)::

    n     = n_a + n_b
    δ     = mean_b − mean_a
    mean  = mean_a + δ · n_b / n
    M2    = M2_a + M2_b + δ² · n_a · n_b / n

It never forms Σx², so it keeps its accuracy when |mean| ≫ std, where summing plain sums and
squares (E[x²] − E[x]²) cancels catastrophically.

:func:`merge_moments` first puts the shards in a canonical order (by count, then by the bit
patterns of mean and M2) and then merges them as a balanced binary tree. The result is
therefore bitwise independent of the order the shards are given in (so every MPI rank, and
every rerun, gets the same bits), and the rounding error grows with the tree depth
(log₂ of the number of shards), not with the number of shards.
"""
import numpy as np

import cbn
from . import _checks

__all__ = ["Moments", "batch_moments", "merge_moments"]


class Moments:
    """Partial batch statistics of one shard: ``count``, per-feature ``mean`` and ``m2``.

    Parameters
    ----------
    count : int
        Number of elements each feature's statistics are taken over (>= 0). The same for
        every feature, since every feature sees the same rows.
    mean, m2 : array_like
        Per-feature mean and sum of squared deviations from it, of the feature shape. Stored
        as float64. For ``count == 0`` both must be zero (as :func:`batch_moments` makes them).
    dtype : numpy dtype or None
        The dtype of the data the statistics were taken from, if known. :func:`merge_moments`
        refuses to merge shards of different data dtypes.

    Attributes
    ----------
    mean : ndarray (float64)
        Per-feature mean (ValueError when ``count == 0``: there is no mean of nothing).
    var : ndarray (float64)
        Population (biased) variance ``m2 / count``, as :func:`cbn.batch_stats` returns it.
    feature_shape : tuple
    """

    __slots__ = ("count", "_mean", "m2", "dtype")

    def __init__(self, count, mean, m2, dtype=None):
        count = _checks.as_integer(count, "count")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        _checks.refuse_masked(mean, "mean")
        _checks.refuse_masked(m2, "m2")
        mean = np.array(mean, dtype=np.float64)   # a private copy: Moments are values
        m2 = np.array(m2, dtype=np.float64)
        if mean.shape != m2.shape:
            raise ValueError(f"mean has shape {mean.shape} but m2 has shape {m2.shape}")
        self.count = count
        self._mean = mean
        self.m2 = m2
        self.dtype = None if dtype is None else np.dtype(dtype)

    @property
    def feature_shape(self):
        return self._mean.shape

    def _require_elements(self):
        if self.count == 0:
            raise ValueError(
                "cannot take batch statistics over zero elements (these Moments have count 0)")

    @property
    def mean(self):
        self._require_elements()
        return self._mean.copy()

    @property
    def var(self):
        self._require_elements()
        return self.m2 / self.count

    @property
    def M2(self):
        """Alias of ``m2`` under the name used in the literature."""
        return self.m2

    def __repr__(self):
        return (f"Moments(count={self.count}, feature_shape={self.feature_shape}, "
                f"dtype={self.dtype})")


def batch_moments(x, axis=-1):
    """Partial statistics ``Moments(count, mean, M2)`` of one shard ``x``.

    ``axis`` names the feature axes exactly as in :func:`cbn.batch_stats`. A shard with zero
    elements per feature is allowed (it gives ``count == 0`` and merges as a no-op), so that
    every process or chunk can contribute whatever rows it has.

    Built on :func:`cbn.batch_stats` (``M2 = var · count``), so it uses the fast kernels.
    """
    x = _checks.as_data(x)
    axes = _checks.kept_axes(x.ndim, axis)
    features = _checks.feature_shape(x.shape, axes)
    count = _checks.element_count(x.shape, axes)
    if count == 0:
        zeros = np.zeros(features, dtype=np.float64)
        return Moments(0, zeros, zeros, dtype=x.dtype)
    mean, var = cbn.batch_stats(x, axis=axes)
    mean = np.asarray(mean, dtype=np.float64)
    return Moments(count, mean, np.asarray(var, dtype=np.float64) * count, dtype=x.dtype)


def _canonical_key(m):
    return (m.count, m._mean.tobytes(), m.m2.tobytes())


def merge_moments(moments):
    """Exact merge of the partial statistics of any split of a batch.

    Parameters
    ----------
    moments : iterable of Moments
        Shards of one batch, in any order; shards with ``count == 0`` are allowed.

    Returns
    -------
    Moments
        The statistics of the whole batch: ``count`` is the total, ``.mean``/``.var`` equal
        :func:`cbn.batch_stats` of the concatenation to float64 rounding. The result is
        bitwise the same for every order of the input.

    Raises
    ------
    ValueError
        If no shard is given, or shards disagree on the feature shape or the data dtype.
    """
    moments = list(moments)
    if not moments:
        raise ValueError("merge_moments needs at least one Moments")
    for i, m in enumerate(moments):
        if not isinstance(m, Moments):
            raise TypeError(f"merge_moments takes Moments objects; item {i} is {type(m)!r}")
    shapes = {m.feature_shape for m in moments}
    if len(shapes) > 1:
        detail = ", ".join(f"#{i}: {m.feature_shape}" for i, m in enumerate(moments)
                           if m.feature_shape != moments[0].feature_shape)
        raise ValueError(
            f"cannot merge statistics of different feature shapes: shard #0 has "
            f"{moments[0].feature_shape}, but {detail}")
    dtypes = {m.dtype for m in moments if m.dtype is not None}
    if len(dtypes) > 1:
        raise ValueError(
            f"cannot merge statistics of data of different dtypes: "
            f"{sorted(str(d) for d in dtypes)}")
    features = moments[0].feature_shape
    dtype = dtypes.pop() if dtypes else None

    nonempty = sorted((m for m in moments if m.count > 0), key=_canonical_key)
    if not nonempty:
        zeros = np.zeros(features, dtype=np.float64)
        return Moments(0, zeros, zeros, dtype=dtype)

    # Balanced tree, one vectorised level at a time: row 2i merges with row 2i+1 and an odd
    # last row is carried up unchanged.
    counts = np.array([m.count for m in nonempty], dtype=np.int64)
    means = np.stack([m._mean.reshape(-1) for m in nonempty])
    m2s = np.stack([m.m2.reshape(-1) for m in nonempty])
    while len(counts) > 1:
        pairs = len(counts) // 2
        n_a, n_b = counts[0:2 * pairs:2], counts[1:2 * pairs:2]
        n = n_a + n_b
        share_b = (n_b / n)[:, None]                     # n_b / n in float64
        delta = means[1:2 * pairs:2] - means[0:2 * pairs:2]
        merged_mean = means[0:2 * pairs:2] + delta * share_b
        merged_m2 = (m2s[0:2 * pairs:2] + m2s[1:2 * pairs:2]
                     + np.square(delta) * (n_a[:, None] * share_b))
        if len(counts) % 2:
            n = np.append(n, counts[-1])
            merged_mean = np.vstack([merged_mean, means[-1:]])
            merged_m2 = np.vstack([merged_m2, m2s[-1:]])
        counts, means, m2s = n, merged_mean, merged_m2
    total = sum(m.count for m in nonempty)               # exact, even past 2**63
    return Moments(total, means[0].reshape(features), m2s[0].reshape(features), dtype=dtype)
