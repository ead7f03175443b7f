"""``python -m cbn bench --fused``: batch norm fused with an activation (and a residual).

On one thread (the goals of issue 9 part 3 are per core), interleaved in one process:

* ``BN``: cbn's batch norm alone, ``out=`` a reused buffer;
* ``fused``: the same call with ``activation="relu"`` (and ``residual=``), as a training step
  makes it: the forward returns the mask of z > 0 (``return_mask=True``), which the backward
  takes; ``fused, y``: without the mask, the backward reading y;
* ``BN + NumPy``: cbn's batch norm, then the activation in NumPy the way NumPy training code
  writes it: ``np.maximum(y, 0, out=y)`` (after ``np.add(y, r, out=y)``), and backward
  ``dz = np.where(y > 0, dy, 0)`` (a new array, as such code makes it) before cbn's backward.

Ratios: fused / BN (goals <= 1.1 forward, <= 1.15 backward) and (BN + NumPy) / fused
(goal >= 1.6).
"""
import numpy as np

from . import _buffers, _plans, api, benchmark

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it the thread count is OpenMP's default
    threadpool_limits = None

GOALS = {"forward": (1.10, 1.6), "backward": (1.15, 1.6)}   # (max fused/BN, min NumPy/fused)


def calls(case, dtype=np.float32, residual=False, seed=0):
    """{operation: {"BN": f, "fused": f, "BN + NumPy": f}} on one case's data."""
    rng = np.random.default_rng(seed)
    x = case.make(dtype, rng)
    axes = _plans.feature_axes(x.shape, _plans.axis_key(case.axis))[0]
    features = tuple(x.shape[a] for a in axes)
    gamma, beta = rng.standard_normal(features), rng.standard_normal(features)
    r = rng.standard_normal(x.shape, dtype=np.float32).astype(dtype) if residual else None
    dy = rng.standard_normal(x.shape, dtype=np.float32).astype(dtype)
    y, dx = _buffers.empty_like(x), _buffers.empty_like(x)
    y_fused, mean, var, mask = api.batch_norm_forward(x, gamma, beta, case.axis,
                                                      activation="relu", residual=r,
                                                      return_mask=True)
    y_fused = y_fused.copy()
    axis = case.axis

    def bn_then_numpy():
        api.batch_norm_forward(x, gamma, beta, axis, out=y)
        if r is not None:
            np.add(y, r, out=y)
        np.maximum(y, 0, out=y)

    def numpy_then_backward():
        dz = np.where(y_fused > 0, dy, np.float32(0))
        api.batch_norm_backward(dz, x, mean, var, gamma, axis, out=dx)

    return {
        "forward": {
            "BN": lambda: api.batch_norm_forward(x, gamma, beta, axis, out=y),
            "fused": lambda: api.batch_norm_forward(x, gamma, beta, axis, out=y,
                                                    activation="relu", residual=r,
                                                    return_mask=True),
            "fused, y": lambda: api.batch_norm_forward(x, gamma, beta, axis, out=y,
                                                       activation="relu", residual=r),
            "BN + NumPy": bn_then_numpy},
        "backward": {
            "BN": lambda: api.batch_norm_backward(dy, x, mean, var, gamma, axis, out=dx),
            "fused": lambda: api.batch_norm_backward(dy, x, mean, var, gamma, axis, out=dx,
                                                     activation="relu", mask=mask,
                                                     residual=r is not None),
            "fused, y": lambda: api.batch_norm_backward(dy, x, mean, var, gamma, axis, out=dx,
                                                        activation="relu", y=y_fused,
                                                        residual=r is not None),
            "BN + NumPy": numpy_then_backward},
    }, x


def run(cases, repeats=7, residuals=(False, True)):
    rows = []
    limits = threadpool_limits(1, user_api="openmp") if threadpool_limits else None
    try:
        for case in cases:
            for residual in residuals:
                found, x = calls(case, residual=residual)
                for operation, implementations in found.items():
                    seconds = benchmark._median_seconds(
                        implementations, benchmark._repeats_for(x, repeats))
                    rows.append((case, residual, operation, x.nbytes, seconds))
    finally:
        if limits is not None:
            limits.unregister()
    return rows


def format_rows(rows):
    lines = ["| case | shape | op | residual | BN | fused | fused, y | BN + NumPy "
             "| fused/BN (goal) | (BN + NumPy)/fused (goal) |", "|" + "---|" * 10]
    for case, residual, operation, _, s in rows:
        at_most, at_least = GOALS[operation]
        lines.append(
            f"| {case.name} | {'x'.join(map(str, case.shape))} | {operation} | "
            f"{'yes' if residual else 'no'} | {s['BN'] * 1e3:.2f} ms | "
            f"{s['fused'] * 1e3:.2f} ms | {s['fused, y'] * 1e3:.2f} ms | "
            f"{s['BN + NumPy'] * 1e3:.2f} ms | "
            f"{s['fused'] / s['BN']:.2f} (<= {at_most}) | "
            f"{s['BN + NumPy'] / s['fused']:.2f} (>= {at_least}) |")
    return "\n".join(lines)


def main(args):
    names = {"NHWC", "NCHW", "dense", "tiny"}
    cases = benchmark.QUICK_CASES if args.quick else benchmark.FULL_CASES
    cases = [c for c in cases if c.name in (set(args.cases) if args.cases else names)]
    print("relu, float32, 1 thread; medians of interleaved calls (cbn.fusedbench)")
    print(format_rows(run(cases, repeats=args.repeats)))
    return 0
