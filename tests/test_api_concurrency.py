"""Kernels release the GIL: calls from several Python threads at once give the same results."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import cbn


def test_concurrent_calls_match_sequential_calls():
    rng = np.random.default_rng(0)
    cases = [(rng.standard_normal(shape).astype(np.float32), axis)
             for shape, axis in [((64, 32, 8, 8), 1), ((256, 512), -1), ((64, 32, 8, 8), 1),
                                 ((256, 512), -1), ((30, 40, 50), [0, 2])] * 4]

    def run(case):
        x, axis = case
        y, mean, var = cbn.batch_norm_forward(x, axis=axis)
        dx, dgamma, dbeta = cbn.batch_norm_backward(y, x, mean, var, axis=axis)
        return y, mean, var, dx, dgamma, dbeta

    sequential = [run(case) for case in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, cases))
    for expected, got in zip(sequential, concurrent):
        for a, b in zip(expected, got):
            assert a.tobytes() == b.tobytes()
