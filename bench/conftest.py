"""pytest-benchmark suite: cbn, the reference and (when installed) PyTorch side by side.

Each benchmark is grouped as ``op|case|shape|dtype`` so the implementations sit in one
table. Run: ``python -m pytest bench --benchmark-enable``. In CI the suite runs once per
benchmark with ``--benchmark-disable`` so it cannot rot.
"""
import functools

import numpy as np

from cbn import benchmark

IMPLEMENTATIONS = ("cbn", "cbn out=", "reference", "torch")


@functools.lru_cache(maxsize=4)
def case_calls(case_name, dtype_name):
    case = next(c for c in benchmark.FULL_CASES if c.name == case_name)
    return benchmark.implementations(case, np.dtype(dtype_name).type)


def run_operation(benchmark_fixture, operation, case, dtype, implementation):
    found, x = case_calls(case.name, np.dtype(dtype).name)
    benchmark_fixture.group = f"{operation}|{case.name}|{'x'.join(map(str, x.shape))}|" \
                              f"{np.dtype(dtype).name}"
    benchmark_fixture(found[implementation][operation])


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", benchmark.FULL_CASES, ids=lambda c: c.name)
    if "implementation" in metafunc.fixturenames:
        has_output = metafunc.function.__name__ != "bench_stats"
        available = [name for name in IMPLEMENTATIONS
                     if (name != "torch" or benchmark.import_torch() is not None)
                     and (name != "cbn out=" or has_output)]
        metafunc.parametrize("implementation", available)
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", ["float32"])
