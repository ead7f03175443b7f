"""Benchmarks of batch-norm backward: see bench/conftest.py."""
from conftest import run_operation


def bench_backward(benchmark, case, dtype, implementation):
    run_operation(benchmark, "backward", case, dtype, implementation)
