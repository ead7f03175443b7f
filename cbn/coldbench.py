"""``python -m cbn bench --cold``: data from memory, measured against the memory's speed.

Every array is at least ``COLD_FACTOR`` times the last-level cache the OS reports, so each
pass comes from DRAM, not from a cache left warm by the pass before. Each operation's
time is turned into bandwidth from the bytes it must move at least:

==========  ======================================  ==================================
operation   bytes moved (x-sized arrays)            STREAM kernel of the same mix
==========  ======================================  ==================================
stats       1 read                                  read (a sum)
inference   1 read + 1 write                        copy
forward     1 read + 1 write if each feature's      copy, or triad
            second pass finds it in cache, else
            2 reads + 1 write
backward    2 reads + 1 write if in cache, else     triad
            4 reads + 1 write
==========  ======================================  ==================================

and compared with STREAM-style kernels (after McCalpin's STREAM: copy, triad, read; with
ordinary and with streaming stores, the faster counts) run interleaved with the operation
on arrays of the same size and the same threads: "% STREAM" is the operation's bandwidth
over the kernel's. cbn runs with ``out=`` there (an allocation's page faults are not memory
bandwidth); "other stores" is the same call with the streaming decision of
cbn._machine reversed. The PyTorch ratio compares fresh outputs on both sides, as the
library calls are normally made.
"""
import math

import numpy as np

from . import _kernels, _machine, _plans, benchmark

COLD_FACTOR = 4
GOALS = {   # issue 9: (minimum torch / cbn, minimum fraction of STREAM)
    "forward": (1.5, 0.70), "inference": (None, 0.85), "backward": (1.3, 0.60),
    "stats": (None, None),
}


def cold_cases(llc_bytes, factor=COLD_FACTOR):
    """The README's four large cases and its short NCHW planes (7 x 7: every plane shares
    its first and last cache lines with its neighbours), batch grown until x (float32) >=
    factor x LLC."""
    def batch(sample_elements):
        return max(1, math.ceil(factor * llc_bytes / (4 * sample_elements)))
    return (
        benchmark.Case("NHWC", (batch(56 * 56 * 64), 56, 56, 64), -1, torch_view="nhwc"),
        benchmark.Case("NCHW", (batch(64 * 56 * 56), 64, 56, 56), 1),
        benchmark.Case("dense", (batch(1024), 1024), -1, torch_view="nc"),
        benchmark.Case("NCHW-256", (batch(256 * 28 * 28), 256, 28, 28), 1),
        benchmark.Case("NCHW-7x7", (batch(512 * 7 * 7), 512, 7, 7), 1),
    )


def bytes_moved(operation, n_bytes, in_cache):
    """(reads, writes) of x-sized arrays the operation must make at least, and STREAM's
    kernel with that mix; in_cache: each feature's second pass finds it in cache."""
    reads, writes = {"stats": (1, 0), "inference": (1, 1),
                     "forward": (1, 1) if in_cache else (2, 1),
                     "backward": (2, 1) if in_cache else (4, 1)}[operation]
    kernel = "read" if writes == 0 else ("copy" if reads == 1 else "triad")
    return (reads + writes) * n_bytes, kernel


STREAM_BYTES = {"read": 1, "copy": 2, "triad": 3}   # x-sized arrays each kernel moves


def stream_calls(n_elements):
    """{kernel name with store kind: call} on fresh float32 arrays of n_elements."""
    a, b, c = (np.ones(n_elements, np.float32) for _ in range(3))
    calls = {"read": lambda: _kernels.bandwidth_kernel("read", a)}
    for store, nontemporal in (("", False), (" nt", True)):
        calls["copy" + store] = lambda nt=nontemporal: _kernels.bandwidth_kernel(
            "copy", a, b, None, nt)
        calls["triad" + store] = lambda nt=nontemporal: _kernels.bandwidth_kernel(
            "triad", a, b, c, nt)
    return calls


def with_stream_threshold(call, n_bytes):
    """call, run with streaming stores switched from cbn._machine's choice to the other."""
    def reversed_choice():
        old = _kernels.set_stream_min_bytes(n_bytes)
        try:
            return call()
        finally:
            _kernels.set_stream_min_bytes(old)
    return reversed_choice


def second_pass_in_cache(x, axis):
    """Whether the kernels' plan for x re-reads each feature from cache (cbn._kernels)."""
    axes = tuple(sorted(np.atleast_1d(axis) % x.ndim))
    plan = _plans.plan_of(x.shape, axes, x.itemsize, x.strides, x.strides)
    return plan.kernel.second_pass_in_cache()


def run(cases, threads=(1, 2), repeats=7, with_torch=True,
        operations=benchmark.OPERATIONS):
    """Rows of medians (seconds) with bytes moved and the matching STREAM kernel."""
    torch = benchmark.import_torch() if with_torch else None
    chosen = _machine.current().stream_min_bytes
    rows = []
    for case in cases:
        found, x = benchmark.implementations(case, with_reference=False, with_torch=with_torch)
        streams = x.nbytes >= chosen
        other = {name: with_stream_threshold(call, _machine.NEVER if streams else 0)
                 for name, call in found["cbn out="].items()}
        bandwidth = stream_calls(x.size)
        in_cache = second_pass_in_cache(x, case.axis)
        for n_threads in threads:
            with benchmark._thread_limit(n_threads, torch):
                for operation in operations:
                    moved, kernel = bytes_moved(operation, x.nbytes, in_cache)
                    calls = {name: impl[operation] for name, impl in found.items()
                             if operation in impl}
                    if operation in other:
                        calls["other stores"] = other[operation]
                    calls.update({k: c for k, c in bandwidth.items() if k.startswith(kernel)})
                    medians = benchmark._median_seconds(calls, repeats)
                    stream_s = min(t for k, t in medians.items() if k.startswith(kernel))
                    rows.append({"case": case.name, "shape": x.shape, "op": operation,
                                 "threads": n_threads, "bytes": moved, "streams": streams,
                                 "kernel": kernel,
                                 "stream_gbs": STREAM_BYTES[kernel] * x.nbytes / stream_s / 1e9,
                                 **{k: t for k, t in medians.items()
                                    if not k.startswith(kernel)}})
    return rows


def format_table(rows):
    header = ["case", "op", "thr", "MB moved", "cbn out= ms", "GB/s", "STREAM GB/s",
              "% STREAM", "other stores ms", "cbn ms", "torch ms", "torch / cbn", "goal"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        timed = row.get("cbn out=", row["cbn"])
        gbs = row["bytes"] / timed / 1e9
        fraction = gbs / row["stream_gbs"]
        ratio = row["torch"] / row["cbn"] if "torch" in row else None
        cells = [row["case"], row["op"], str(row["threads"]), f"{row['bytes'] / 1e6:.0f}",
                 benchmark._ms(timed), f"{gbs:.1f}", f"{row['stream_gbs']:.1f} {row['kernel']}",
                 f"{100 * fraction:.0f}",
                 _other_stores(row), benchmark._ms(row["cbn"]), benchmark._ms(row.get("torch")),
                 "-" if ratio is None else f"{ratio:.2f}", _goal(row["op"], ratio, fraction)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _other_stores(row):
    if "other stores" not in row:
        return "-"
    return f"{benchmark._ms(row['other stores'])} ({'ordinary' if row['streams'] else 'streaming'})"


def _goal(operation, ratio, fraction):
    """'met' or what is missing of issue 9's goals for this operation."""
    min_ratio, min_fraction = GOALS[operation]
    missing = []
    if min_ratio is not None and ratio is not None and ratio < min_ratio:
        missing.append(f"torch < {min_ratio}x")
    if min_fraction is not None and fraction < min_fraction:
        missing.append(f"< {100 * min_fraction:.0f} %")
    if min_ratio is None and min_fraction is None:
        return "-"
    return "; ".join(missing) or "met"


def header(caches, chosen, cases):
    lines = [f"Caches: {caches.describe()}.", f"Thresholds: {chosen.describe()}."]
    lines += [f"{case.name}: {case.shape}, {4 * math.prod(case.shape) / 2 ** 20:.0f} MiB"
              for case in cases]
    return "\n".join(lines)


def main(args):
    caches = _machine.cache_sizes()
    cases = cold_cases(caches.llc)
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    print(header(caches, _machine.current(), cases))
    rows = run(cases, tuple(args.threads), args.repeats, not args.no_torch, tuple(args.ops))
    print(format_table(rows))
