"""Benchmarks of batch norm fused with relu (and a residual): cbn.fusedbench's comparison
(BN alone, fused, BN then NumPy) in pytest-benchmark groups; one small case, cheap for CI.
Full-size figures: ``python -m cbn bench --fused``."""
import functools

import pytest

from cbn import benchmark as cbn_benchmark, fusedbench

CASE = next(c for c in cbn_benchmark.QUICK_CASES if c.name == "NHWC")


@functools.lru_cache(maxsize=2)
def case_calls(residual):
    return fusedbench.calls(CASE, residual=residual)[0]


@pytest.mark.parametrize("residual", [False, True], ids=["no residual", "residual"])
@pytest.mark.parametrize("operation", ["forward", "backward"])
@pytest.mark.parametrize("variant", ["BN", "fused", "fused, y", "BN + NumPy"])
def bench_fused(benchmark, operation, variant, residual):
    benchmark.group = f"fused {operation}|{CASE.name}|{'x'.join(map(str, CASE.shape))}|" \
                      f"float32|{'residual' if residual else 'no residual'}"
    benchmark(case_calls(residual)[operation][variant])
