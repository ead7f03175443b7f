"""Every SIMD level this CPU runs, side by side on the large cases (README, "Portable
builds"): the same API calls, with cbn.api's kernels module swapped for one level at a time,
grouped ``op|case|shape|dtype`` with the level as the implementation. Swapping modules in
one process times the levels interleaved on the same arrays, which a shared machine needs.
"""
import contextlib
import importlib

import pytest
from conftest import case_calls

from cbn import _dispatch, _gradient, _machine, _plans, api
from cbn import benchmark as cases

RUNNABLE = [level for level in _dispatch.BUILT if level in _dispatch.SUPPORTED]
CASES = cases.FULL_CASES[:3]       # NHWC, NCHW, dense


KERNEL_CALLERS = (api, _gradient, _plans)


def _use(module):
    """Every module that calls the kernels calls ``module``'s; plans are per module, so
    their caches are emptied."""
    for caller in KERNEL_CALLERS:
        caller._kernels = module
    _plans.plan_of.cache_clear()
    _plans.plan_and_own.cache_clear()


@contextlib.contextmanager
def kernels_of(level):
    """cbn.api calling the kernels of ``level``."""
    module = importlib.import_module(f"cbn._kernels_{level}")
    _machine.apply(module, _machine.current())
    saved = api._kernels
    _use(module)
    try:
        yield
    finally:
        _use(saved)


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="one SIMD level built or runnable here")
@pytest.mark.parametrize("level", RUNNABLE)
@pytest.mark.parametrize("operation", cases.OPERATIONS)
@pytest.mark.parametrize("large_case", CASES, ids=lambda c: c.name)
def bench_level(benchmark, large_case, operation, level):
    found, x = case_calls(large_case.name, "float32")
    implementation = "cbn" if operation == "stats" else "cbn out="
    benchmark.group = f"{operation}|{large_case.name}|{'x'.join(map(str, x.shape))}|float32"
    with kernels_of(level):
        benchmark(found[implementation][operation])
