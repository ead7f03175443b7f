"""cbn.batch_norm_backward_from_sums and gradient_sums: a backward split across shards."""
import numpy as np
import pytest

import cbn
from cbn import reference


@pytest.mark.parametrize("shape, axis, split_axis, dtype", [
    ((11, 3), -1, 0, np.float64),
    ((5, 4, 3), (0, 2), 1, np.float64),
    ((6, 2, 3, 2), 1, 0, np.float32),
    ((6, 2, 3, 2), [-1, 1], 2, np.float32),
])
def test_shards_reassemble_the_reference_backward(shape, axis, split_axis, dtype):
    rng = np.random.default_rng(0)
    x = (5.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, var = reference.batch_norm_forward(x, axis=axis)
    features = mean.shape
    gamma = rng.standard_normal(features)
    dx_ref, dgamma, dbeta = reference.batch_norm_backward(dy, x, mean, var, gamma, axis=axis)
    count = x.size // mean.size
    cuts = [1, 1, shape[split_axis] - 1]                 # includes an empty shard
    pieces = [cbn.batch_norm_backward_from_sums(d, s, mean, var, gamma, dbeta, dgamma, count,
                                                axis=axis)
              for d, s in zip(np.split(dy, cuts, axis=split_axis),
                              np.split(x, cuts, axis=split_axis))]
    dx = np.concatenate(pieces, axis=split_axis)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    tolerance = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(dx, dx_ref, rtol=tolerance, atol=tolerance)


def test_gamma_none_and_validation():
    x = np.random.default_rng(1).standard_normal((8, 2))
    dy = np.ones_like(x)
    _, mean, var = reference.batch_norm_forward(x)
    dx_ref, dgamma, dbeta = reference.batch_norm_backward(dy, x, mean, var)
    dx = cbn.batch_norm_backward_from_sums(dy, x, mean, var, None, dbeta, dgamma, 8)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="count"):
        cbn.batch_norm_backward_from_sums(dy, x, mean, var, None, dbeta, dgamma, 0)
    with pytest.raises(ValueError, match="sum_dy"):
        cbn.batch_norm_backward_from_sums(dy, x, mean, var, None, dbeta[:1], dgamma, 8)
    with pytest.raises(ValueError, match="shape"):
        cbn.batch_norm_backward_from_sums(dy[:3], x, mean, var, None, dbeta, dgamma, 8)
