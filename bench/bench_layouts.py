"""Benchmarks of operands that disagree on layout (x in one, dy and out= in another).

Grouped as ``layouts|op|case|shape`` so each pairing sits beside the matched C call; a few
representative pairings only (``python -m cbn bench --layouts`` times all 25 of each case).
"""
import functools

import pytest

from cbn import layout_benchmark

PAIRS = (("C", "C"), ("F", "C"), ("C", "F"), ("transposed", "C"), ("C", "transposed"),
         ("stepped", "C"), ("reversed", "C"))
CASES = [c for c in layout_benchmark.CASES if c.name in ("NHWC", "NCHW")]


@functools.lru_cache(maxsize=1)
def calls_of(case):
    return layout_benchmark.pairing_calls(case, PAIRS)


@pytest.mark.parametrize("pair", PAIRS, ids="/".join)
@pytest.mark.parametrize("operation", layout_benchmark.OPERATIONS)
@pytest.mark.parametrize("layout_case", CASES, ids=lambda c: c.name)
def bench_layouts(benchmark, layout_case, operation, pair):
    shape = "x".join(map(str, layout_case.shape))
    benchmark.group = f"layouts|{operation}|{layout_case.name}|{shape}"
    benchmark(calls_of(layout_case)[(operation,) + pair])
