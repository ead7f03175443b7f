"""Operands that disagree on layout: every pairing of x's layout with dy's / out='s.

For each case, operation and thread count, the calls of all pairings (x in one layout, dy
and ``out=`` in another, among C, Fortran, transposed, stepped and reversed) run in one
process and each is compared with its two matched calls (the same call with every operand
in x's layout, and with every operand in the other's), the three timed back to back. The
ratio to the slower matched call is what mixing the layouts costs; the ratio to the faster
also counts what the slower layout costs on its own (a stepped view reads twice the
memory lines, say). Used by
``python -m cbn bench --layouts``; bench/bench_layouts.py times a few pairings with
pytest-benchmark.
"""
import statistics
import time
from dataclasses import dataclass

import numpy as np

from . import api
from .benchmark import _thread_limit, bench_parser

LAYOUTS = ("C", "F", "transposed", "stepped", "reversed")
OPERATIONS = ("forward out=", "inference out=", "backward", "backward out=")


@dataclass(frozen=True)
class LayoutCase:
    name: str
    shape: tuple
    axis: int
    transposed: tuple   # memory order (outermost first) of the "transposed" layout

    def arrange(self, values, layout):
        """``values`` (C-ordered) stored in ``layout``, with the same contents."""
        if layout == "C":
            return values
        if layout == "F":
            return np.asfortranarray(values)
        if layout == "transposed":
            return np.ascontiguousarray(values.transpose(self.transposed)).transpose(
                np.argsort(self.transposed))
        if layout == "stepped":   # every other entry of a twice-as-long axis -2
            wide = np.empty(values.shape[:-2] + (2 * values.shape[-2], values.shape[-1]),
                            values.dtype)
            view = wide[..., ::2, :]
            view[...] = values
            return view
        if layout == "reversed":  # the last axis walked backwards (a negative stride)
            return np.ascontiguousarray(values[..., ::-1])[..., ::-1]
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# The cases: NHWC stored as NCHW is "transposed" and the other way round.
CASES = (
    LayoutCase("NHWC", (32, 56, 56, 64), -1, (0, 3, 1, 2)),
    LayoutCase("NCHW", (32, 64, 56, 56), 1, (0, 2, 3, 1)),
    LayoutCase("dense", (8192, 1024), -1, (1, 0)),
)
QUICK_CASES = (
    LayoutCase("NHWC", (8, 28, 28, 64), -1, (0, 3, 1, 2)),
)


def pairing_calls(case, pairs, dtype=np.float32, seed=0):
    """{(operation, x layout, other layout): zero-argument call} for the given pairs."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype)
    dy_values = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype)
    needed_x = {x for x, _ in pairs}
    needed_other = {other for _, other in pairs}
    x = {layout: case.arrange(values, layout) for layout in needed_x}
    dy = {layout: case.arrange(dy_values, layout) for layout in needed_other}
    out = {layout: case.arrange(np.empty_like(values), layout) for layout in needed_other}
    features = case.shape[case.axis]
    mean, var = api.batch_stats(values, axis=case.axis)
    gamma, beta = rng.random(features) + 0.5, rng.standard_normal(features)
    axis = case.axis

    def calls(xl, ol):
        return {
            "forward out=": lambda: api.batch_norm_forward(x[xl], gamma, beta, axis=axis,
                                                           out=out[ol]),
            "inference out=": lambda: api.batch_norm_inference(x[xl], mean, var, gamma, beta,
                                                               axis=axis, out=out[ol]),
            "backward": lambda: api.batch_norm_backward(dy[ol], x[xl], mean, var, gamma,
                                                        axis=axis),
            "backward out=": lambda: api.batch_norm_backward(dy[ol], x[xl], mean, var, gamma,
                                                             axis=axis, out=out[ol]),
        }

    return {(op, xl, ol): call for xl, ol in pairs for op, call in calls(xl, ol).items()}


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(calls, layouts, repeats):
    """Median seconds of every pairing, and the median ratio of each mixed pairing to its
    slower and its faster matched call, the three timed back to back in every round (so
    load that varies over a run, as on a shared machine, cancels in the ratios)."""
    samples = {(xl, ol): [] for xl in layouts for ol in layouts}
    slower = {pair: [] for pair in samples if pair[0] != pair[1]}
    faster = {pair: [] for pair in slower}
    for call in calls.values():   # plans are made and cached at the first call
        call()
    for _ in range(repeats):
        for xl, ol in slower:
            a, b = _seconds(calls[(xl, xl)]), _seconds(calls[(ol, ol)])
            t = _seconds(calls[(xl, ol)])
            samples[(xl, xl)].append(a)
            samples[(ol, ol)].append(b)
            samples[(xl, ol)].append(t)
            slower[(xl, ol)].append(t / max(a, b))
            faster[(xl, ol)].append(t / min(a, b))
    median = statistics.median
    return ({pair: median(t) for pair, t in samples.items()},
            {pair: median(r) for pair, r in slower.items()},
            {pair: median(r) for pair, r in faster.items()})


def run(cases=CASES, threads=(1, 2), repeats=7, operations=OPERATIONS, layouts=LAYOUTS):
    """A list of row dicts, one per (case, op, threads): medians and ratios (measure)."""
    pairs = [(xl, ol) for xl in layouts for ol in layouts]
    rows = []
    for case in cases:
        calls = pairing_calls(case, pairs)
        for n_threads in threads:
            with _thread_limit(n_threads, None):
                for op in operations:
                    times, slower, faster = measure(
                        {pair: calls[(op,) + pair] for pair in pairs}, layouts, repeats)
                    rows.append({"case": case.name, "op": op, "threads": n_threads,
                                 "times": times, "slower": slower, "faster": faster})
    return rows


def format_matrices(rows, layouts=LAYOUTS):
    """Per case, operation and thread count: x's layout down, dy's / out='s across; the
    diagonal holds the matched calls (ms, and in C/C calls), the rest each pairing's time
    over its slower matched call (its faster one in brackets)."""
    blocks = []
    for row in rows:
        times = row["times"]
        lines = [f"{row['case']} {row['op']}, {row['threads']} thread(s): diagonal "
                 "matched ms (in C/C calls), elsewhere time / slower matched (/ faster)",
                 "| x \\ dy, out | " + " | ".join(layouts) + " |",
                 "|" + "---|" * (len(layouts) + 1)]
        for xl in layouts:
            cells = [f"{times[(xl, xl)] * 1e3:.2f} ms ({times[(xl, xl)] / times[('C', 'C')]:.2f})"
                     if ol == xl else
                     f"{row['slower'][(xl, ol)]:.2f} ({row['faster'][(xl, ol)]:.2f})"
                     for ol in layouts]
            lines.append(f"| {xl} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_summary(rows, limit=1.5):
    """One line per case, operation and thread count: the worst pairings."""
    lines = ["| case | op | threads | worst / slower matched | pairings over "
             f"{limit} | worst / faster matched | pairings over {limit} |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["case"], row["op"], str(row["threads"])]
        for key in ("slower", "faster"):
            ratios = row[key]
            worst = max(ratios, key=ratios.get)
            cells += [f"{ratios[worst]:.2f} ({worst[0]} / {worst[1]})",
                      str(sum(r > limit for r in ratios.values()))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = bench_parser("python -m cbn bench --layouts", __doc__, repeats=9,
                          quick_help="one small case, a few seconds")
    parser.add_argument("--ops", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    parser.add_argument("--cases", nargs="+", help="case names to run (default: all)")
    parser.add_argument("--summary", action="store_true",
                        help="only the worst pairing of each case, operation and thread count")
    args = parser.parse_args(argv)
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    rows = run(cases, tuple(args.threads), args.repeats, tuple(args.ops))
    if not args.summary:
        print(format_matrices(rows), end="\n\n")
    print(format_summary(rows))
