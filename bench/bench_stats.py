"""Benchmarks of batch-norm stats: see bench/conftest.py."""
from conftest import run_operation


def bench_stats(benchmark, case, dtype, implementation):
    run_operation(benchmark, "stats", case, dtype, implementation)
