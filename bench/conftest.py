"""pytest-benchmark suite: cbn, the reference and (when installed) PyTorch side by side.

Each benchmark is grouped as ``op|case|shape|dtype`` so the implementations sit in one
table. Run: ``python -m pytest bench --benchmark-enable``. In CI the suite runs once per
benchmark with ``--benchmark-disable`` so it cannot rot.
"""
import functools

import numpy as np

from cbn import _machine, benchmark, coldbench

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


def pytest_addoption(parser):
    parser.addoption("--cold", action="store_true",
                     help="bench_cold.py at full size: arrays >= 4x the last-level cache")


def cold_cases(config):
    """The cold cases at full size with --cold; else one small case, cheap enough for CI."""
    if config.getoption("cold"):
        return coldbench.cold_cases(_machine.cache_sizes().llc)
    return coldbench.cold_cases(256 * 1024, factor=1)[2:3]


def pytest_generate_tests(metafunc):
    if "cold_case" in metafunc.fixturenames:
        metafunc.parametrize("cold_case", cold_cases(metafunc.config), ids=lambda c: c.name)
        implementations = ["cbn out=", "cbn out= other stores", "STREAM"]
        if benchmark.import_torch() is not None:
            implementations.append("torch")
        metafunc.parametrize("operation, implementation", [
            (op, name) for op in benchmark.OPERATIONS for name in implementations
            if op != "stats" or not name.startswith("cbn out=")])   # stats have no output
        return
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
