"""Side-by-side timing of cbn, the NumPy reference and (when installed) PyTorch.

All implementations run in one process on the same data, interleaved call by call, so a
noisy neighbour slows them alike; the table reports medians and ratios, and each time is
also expressed in "copies": the median time of ``np.copyto`` of an x-sized array into an
existing buffer, measured in the same run (one read and one write of x, the floor of
inference). Used by ``python -m cbn bench`` and by ``python -m cbn``'s short table.
"""
import argparse
import functools
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from . import _kernels, _machine, api, reference

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it the thread count is OpenMP's default
    threadpool_limits = None


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    axis: object
    layout: str = "C"  # "C"; "T": stored transposed (a view; for 4-D, Fortran order);
    #                    "S": every other entry of a twice-as-long axis -2 (a stepped slice)
    torch_view: str = "nchw"  # how PyTorch sees it: "nchw", "nhwc" (channels_last), "nc"

    def make(self, dtype, rng):
        if self.layout == "S":
            wide = self.shape[:-2] + (2 * self.shape[-2], self.shape[-1])
            return rng.standard_normal(wide, dtype=np.float32).astype(dtype)[..., ::2, :]
        x = rng.standard_normal(self.shape, dtype=np.float32).astype(dtype)
        if self.layout == "T":
            return np.ascontiguousarray(x.T).T
        return x


FULL_CASES = (
    Case("NHWC", (32, 56, 56, 64), -1, torch_view="nhwc"),
    Case("NCHW", (32, 64, 56, 56), 1),
    Case("dense", (8192, 1024), -1, torch_view="nc"),
    Case("pixels", (256, 28, 28), [1, 2], torch_view="nc"),
    Case("NCHW-256", (64, 256, 28, 28), 1),
    Case("dense-T", (8192, 1024), -1, layout="T", torch_view="nc"),
    Case("NHWC-F", (32, 56, 56, 64), -1, layout="T", torch_view="nhwc"),
    Case("NHWC-step", (32, 56, 56, 64), -1, layout="S", torch_view="nhwc"),
    Case("tiny", (8, 16), -1, torch_view="nc"),
    # A late stage of a ResNet at batch 32 (3.2 MB: in the last-level cache, not in L2),
    # where each channel's plane is 49 values and PyTorch's in-cache loops are at their best.
    Case("NCHW-7x7", (32, 512, 7, 7), 1),
    Case("NHWC-7x7", (32, 7, 7, 512), -1, torch_view="nhwc"),
)
QUICK_CASES = (
    Case("NHWC", (16, 28, 28, 64), -1, torch_view="nhwc"),
    Case("NCHW", (16, 64, 28, 28), 1),
    Case("dense-T", (2048, 512), -1, layout="T", torch_view="nc"),
    Case("tiny", (8, 16), -1, torch_view="nc"),
)
OPERATIONS = ("forward", "inference", "backward", "stats")


def _numpy_calls(module, x, dy, params, case, out=None):
    gamma, beta, mean, var = params
    axis = case.axis
    extra = {} if out is None else {"out": out}
    return {
        "forward": lambda: module.batch_norm_forward(x, gamma, beta, axis=axis, **extra),
        "inference": lambda: module.batch_norm_inference(x, mean, var, gamma, beta, axis=axis,
                                                         **extra),
        "backward": lambda: module.batch_norm_backward(dy, x, mean, var, gamma, axis=axis,
                                                       **extra),
        "stats": lambda: module.batch_stats(x, axis=axis),
    }


def _torch_calls(torch, x, dy, params, case):
    """PyTorch's native CPU kernels on the same values, in its fastest memory format."""
    gamma, beta, mean, var = (torch.from_numpy(np.ascontiguousarray(p, np.float32)).reshape(-1)
                              for p in params)

    def view(a):
        if case.torch_view == "nhwc":   # (N, H, W, C) memory -> NCHW tensor, channels_last
            return torch.from_numpy(a).permute(0, 3, 1, 2)
        if case.torch_view == "nc":     # feature axes flattened into channels
            return torch.from_numpy(a if a.ndim == 2 else a.reshape(a.shape[0], -1))
        return torch.from_numpy(a)

    xt, dyt = view(x), view(dy)
    reduce_dims = [d for d in range(xt.dim()) if d != 1]
    _, save_mean, save_invstd = torch.native_batch_norm(xt, gamma, beta, None, None, True,
                                                        0.0, 1e-3)
    backward = torch.ops.aten.native_batch_norm_backward
    return {
        "forward": lambda: torch.native_batch_norm(xt, gamma, beta, None, None, True, 0.0,
                                                   1e-3),
        "inference": lambda: torch.native_batch_norm(xt, gamma, beta, mean, var, False, 0.0,
                                                     1e-3),
        "backward": lambda: backward(dyt, xt, gamma, None, None, save_mean, save_invstd,
                                     True, 1e-3, [True, True, True]),
        "stats": lambda: torch.var_mean(xt, dim=reduce_dims, correction=0),
    }


def _median_seconds(calls, repeats):
    """Interleave the calls, ``repeats`` rounds; the median seconds of each."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _repeats_for(x, repeats):
    # Tiny calls are timed over many rounds; big ones over the requested few.
    return max(repeats, min(2000, int(2e7 / max(x.nbytes, 1))))


def time_stores(n_bytes, stream):
    """Seconds of one inference call writing n_bytes of float32 with out=, with streaming
    stores on or off (cbn._machine.calibrate's measurement)."""
    x, out = _store_buffers(n_bytes)
    ones = np.ones(x.shape[1])
    old = _kernels.set_stream_min_bytes(0 if stream else _machine.NEVER)
    try:
        start = time.perf_counter()
        api.batch_norm_inference(x, ones * 0, ones, out=out)
        return time.perf_counter() - start
    finally:
        _kernels.set_stream_min_bytes(old)


@functools.lru_cache(maxsize=1)
def _store_buffers(n_bytes):
    x = np.ones((max(1, n_bytes // 1024), 256), np.float32)
    return x, np.empty_like(x)


def time_cross(n_bytes, crosswise):
    """Seconds of an inference and a backward call with out=, each operand n_bytes of dense
    float32 rows of 1024 features, x and dy in Fortran order, out= in C order, crosswise or
    staged (cbn._machine.calibrate's measurement)."""
    x, dy, out, mean, var = _cross_buffers(n_bytes)
    old = _kernels.set_cross_rows_out(crosswise)
    try:
        start = time.perf_counter()
        api.batch_norm_inference(x, mean, var, out=out)
        api.batch_norm_backward(dy, x, mean, var, out=out)
        return time.perf_counter() - start
    finally:
        _kernels.set_cross_rows_out(old)


@functools.lru_cache(maxsize=1)
def _cross_buffers(n_bytes):
    rng = np.random.default_rng(0)
    x, dy = (np.asfortranarray(rng.standard_normal((max(8, n_bytes // 4096), 1024),
                                                   np.float32)) for _ in range(2))
    return (x, dy, np.empty(x.shape, np.float32), *api.batch_stats(x))


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def implementations(case, dtype=np.float32, with_reference=True, with_torch=True, seed=0):
    """{implementation: {operation: zero-argument call}} on one case's data, and x."""
    rng = np.random.default_rng(seed)
    x = case.make(dtype, rng)
    dy = case.make(dtype, rng)
    axes = sorted(np.atleast_1d(case.axis) % x.ndim)
    features = tuple(x.shape[a] for a in axes)
    mean, var = reference.batch_stats(x, axis=case.axis)
    params = (rng.random(features) + 0.5, rng.standard_normal(features), mean, var)
    out = np.empty_like(x, order="K")
    found = {"cbn": _numpy_calls(api, x, dy, params, case),
             "cbn out=": _numpy_calls(api, x, dy, params, case, out=out)}
    del found["cbn out="]["stats"]   # statistics have no per-element output
    if with_reference:
        found["reference"] = _numpy_calls(reference, x, dy, params, case)
    torch = import_torch() if with_torch else None
    if torch is not None and dtype == np.float32:
        found["torch"] = _torch_calls(torch, x, dy, params, case)
    return found, x


def run(cases=FULL_CASES, threads=(1, 2), repeats=7, with_reference=True, with_torch=True,
        operations=OPERATIONS, dtype=np.float32):
    """Measure every case; returns a list of row dicts (times in seconds)."""
    torch = import_torch() if with_torch else None
    rows = []
    for case in cases:
        found, x = implementations(case, dtype, with_reference, with_torch)
        copy_src, copy_dst = np.ascontiguousarray(x), np.empty(x.shape, x.dtype)
        for n_threads in threads:
            with _thread_limit(n_threads, torch):
                for operation in operations:
                    calls = {name: impl[operation] for name, impl in found.items()
                             if operation in impl}
                    calls["copy"] = lambda: np.copyto(copy_dst, copy_src)
                    medians = _median_seconds(calls, _repeats_for(x, repeats))
                    rows.append({"case": case.name, "shape": x.shape, "op": operation,
                                 "threads": n_threads, "bytes": x.nbytes, **medians})
    return rows


class _thread_limit:
    def __init__(self, n_threads, torch):
        self.n_threads, self.torch = n_threads, torch
        self.limit = None

    def __enter__(self):
        if threadpool_limits is not None:
            self.limit = threadpool_limits(self.n_threads)
        if self.torch is not None:
            self.saved = self.torch.get_num_threads()
            self.torch.set_num_threads(self.n_threads)

    def __exit__(self, *exc):
        if self.limit is not None:
            self.limit.unregister()
        if self.torch is not None:
            self.torch.set_num_threads(self.saved)


def format_table(rows):
    """A Markdown table: medians in ms, speedups, and cbn's time in plain copies."""
    names = [n for n in ("cbn", "cbn out=", "reference", "torch") if any(n in r for r in rows)]
    header = (["case", "op", "thr"] + [f"{n} ms" for n in names] + ["copy ms"]
              + [f"{n} / cbn" for n in names if n != "cbn"] + ["cbn in copies"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["case"], row["op"], str(row["threads"])]
        cells += [_ms(row.get(n)) for n in names] + [_ms(row["copy"])]
        cells += [_ratio(row.get(n), row["cbn"]) for n in names if n != "cbn"]
        cells.append(_ratio(row["cbn"], row["copy"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(rows):
    """One line per case and operation, thread counts side by side: cbn (fresh output),
    PyTorch, their ratio, and cbn with ``out=`` in plain copies."""
    threads = sorted({row["threads"] for row in rows})
    by_key = {(row["case"], row["op"], row["threads"]): row for row in rows}
    header = ["case", "op"]
    for n in threads:
        header += [f"cbn ms ({n} thr)", f"torch ms ({n} thr)", f"torch / cbn ({n} thr)"]
    header += [f"cbn out= in copies ({threads[0]} thr)", f"reference / cbn ({threads[0]} thr)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seen = []
    for row in rows:
        if (row["case"], row["op"]) not in seen:
            seen.append((row["case"], row["op"]))
    for case, op in seen:
        cells = [case, op]
        for n in threads:
            row = by_key[(case, op, n)]
            cells += [_ms(row["cbn"]), _ms(row.get("torch")), _ratio(row.get("torch"), row["cbn"])]
        first = by_key[(case, op, threads[0])]
        cells += [_ratio(first.get("cbn out=", first["cbn"]), first["copy"]),
                  _ratio(first.get("reference"), first["cbn"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f}" if seconds < 1e-2 else f"{seconds * 1e3:.1f}"


def _ratio(numerator, denominator):
    return "-" if numerator is None else f"{numerator / denominator:.2f}"


def bench_parser(prog, description, repeats, quick_help="small shapes, a few seconds"):
    """The options every ``python -m cbn bench`` mode shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    return parser


def main(argv=None):
    parser = bench_parser("python -m cbn bench", __doc__, repeats=7)
    parser.add_argument("--ops", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    parser.add_argument("--cases", nargs="+", help="case names to run (default: all)")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--summary", action="store_true",
                        help="one line per case and operation, thread counts side by side")
    parser.add_argument("--cold", action="store_true",
                        help="arrays >= 4x the last-level cache, in GB/s and %% of STREAM "
                             "(cbn.coldbench)")
    parser.add_argument("--fused", action="store_true",
                        help="batch norm fused with relu (and a residual) against batch norm "
                             "alone and followed by NumPy, 1 thread (cbn.fusedbench)")
    args = parser.parse_args(argv)
    if args.cold:
        from . import coldbench
        return coldbench.main(args)
    if args.fused:
        from . import fusedbench
        return fusedbench.main(args)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    print(f"Caches: {_machine.cache_sizes().describe()}. At the start: {load_note()}")
    rows = run(cases, tuple(args.threads), args.repeats, not args.no_reference,
               not args.no_torch, tuple(args.ops))
    print(format_summary(rows) if args.summary else format_table(rows))
    print(f"At the end: {load_note()}")


def load_note():
    """The load average, printed beside every table: other processes on the same cores
    change every figure in it, and OpenMP's spinning threads slow multi-threaded calls most
    (README, Threads)."""
    try:
        loads = os.getloadavg()
    except (AttributeError, OSError):    # not reported on this OS
        return "Load average: not reported."
    cpus = os.cpu_count() or 1
    note = f"Load average {loads[0]:.1f}, {loads[1]:.1f}, {loads[2]:.1f} on {cpus} CPUs."
    if loads[0] > cpus and "OMP_WAIT_POLICY" not in os.environ:
        note += (" Other processes hold the cores: the times are disturbed, threaded calls"
                 " most (OMP_WAIT_POLICY=passive helps; README, Threads).")
    return note
