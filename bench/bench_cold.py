"""Cold-mode benchmarks (cbn.coldbench): cbn with out=, with the other store kind, PyTorch
and the STREAM kernel of the same memory traffic, on data >= 4x the last-level cache.

CI runs one small case once, untimed; ``python -m pytest bench/bench_cold.py --cold
--benchmark-enable`` runs the four cold cases at full size (128 MiB and more per array).
"""
import functools


from cbn import _machine, benchmark, coldbench


@functools.lru_cache(maxsize=1)
def case_calls(case):
    found, x = benchmark.implementations(case, with_reference=False)
    streams = x.nbytes >= _machine.current().stream_min_bytes
    found["cbn out= other stores"] = {
        op: coldbench.with_stream_threshold(call, _machine.NEVER if streams else 0)
        for op, call in found["cbn out="].items()}
    in_cache = coldbench.second_pass_in_cache(x, case.axis)
    stream = coldbench.stream_calls(x.size)
    found["STREAM"] = {op: stream[coldbench.bytes_moved(op, x.nbytes, in_cache)[1]]
                       for op in benchmark.OPERATIONS}
    return found, x, in_cache


def bench_cold(benchmark, cold_case, operation, implementation):
    found, x, in_cache = case_calls(cold_case)
    moved, kernel = coldbench.bytes_moved(operation, x.nbytes, in_cache)
    benchmark.group = f"cold|{operation}|{cold_case.name}|{'x'.join(map(str, x.shape))}"
    benchmark.extra_info.update(bytes_moved=moved, stream_kernel=kernel)
    benchmark(found[implementation][operation])
