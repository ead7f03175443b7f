"""Every SIMD level this CPU runs, side by side on the large cases (README, "Portable
builds"): the same API calls, with cbn.api's kernels module swapped for one level at a time,
grouped ``op|case|shape|dtype`` with the level as the implementation. Swapping modules in
one process times the levels interleaved on the same arrays, which a shared machine needs.
"""
import contextlib
import importlib

import pytest
from conftest import case_calls

from cbn import _dispatch, _machine, api
from cbn import benchmark as cases

RUNNABLE = [level for level in _dispatch.BUILT if level in _dispatch.SUPPORTED]
CASES = cases.FULL_CASES[:3]       # NHWC, NCHW, dense


@contextlib.contextmanager
def kernels_of(level):
    """cbn.api calling the kernels of ``level``; plans are per module, so their cache is
    emptied on the way in and out."""
    module = importlib.import_module(f"cbn._kernels_{level}")
    _machine.apply(module, _machine.current())
    saved = api._kernels
    api._kernels = module
    api._plan.cache_clear()
    try:
        yield
    finally:
        api._kernels = saved
        api._plan.cache_clear()


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
