"""Benchmarks of batch-norm forward: see bench/conftest.py."""
from conftest import run_operation


def bench_forward(benchmark, case, dtype, implementation):
    run_operation(benchmark, "forward", case, dtype, implementation)
