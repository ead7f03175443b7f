"""Benchmarks of batch-norm inference: see bench/conftest.py."""
from conftest import run_operation


def bench_inference(benchmark, case, dtype, implementation):
    run_operation(benchmark, "inference", case, dtype, implementation)
