"""``python -m cbn``: what was built, a check against the reference, and a timing table.

``python -m cbn bench [...]`` runs the full side-by-side benchmark (see cbn.benchmark);
``python -m cbn bench --torch [...]`` cbn.torch's modules against PyTorch's (cbn.torch.benchmark);
``python -m cbn calibrate`` measures streaming against ordinary stores, and crosswise against
staged walks, on this machine and records the verdicts for its CPU (see cbn._machine).
``python -m cbn bench --layouts [...]`` times every pairing of operand layouts against the
matched call (see cbn.layout_benchmark).
"""
import platform
import sys

import numpy as np

import cbn
from cbn import _dispatch, _kernels, _machine, benchmark, reference

CHECKS = (
    ("NHWC (8,14,14,32) axis=-1", (8, 14, 14, 32), -1, "C"),
    ("NCHW (8,32,14,14) axis=1", (8, 32, 14, 14), 1, "C"),
    ("pixels (64,28,28) axis=[1,2]", (64, 28, 28), [1, 2], "C"),
    ("transposed view (300,512).T axis=-1", (300, 512), -1, "T"),
    ("non-adjacent (4,6,5,7) axis=[1,3]", (4, 6, 5, 7), [1, 3], "C"),
)


def print_build():
    print(f"cbn {cbn.__version__} on Python {platform.python_version()}, "
          f"NumPy {np.__version__}, {platform.machine()}")
    print(f"OpenMP: {'yes' if cbn.openmp_enabled() else 'NO (serial build)'}; "
          f"threads available: {_kernels.max_threads()}; "
          f"SIMD: {' '.join(_kernels.simd_flags()) or 'none detected'}")
    print(f"SIMD level in use: {cbn.simd_level()} (compiled: {' '.join(_dispatch.BUILT)}; "
          f"this CPU runs: {' '.join(_dispatch.SUPPORTED) or 'none'}; "
          "CBN_SIMD=<level> picks a lower one)")
    print(f"Caches: {_machine.cache_sizes().describe()}")
    print(f"Chosen: {_machine.current().describe()}")


def calibrate():
    """Time streaming against ordinary stores and crosswise against staged walks, record the
    verdicts, print the thresholds."""
    caches = _machine.cache_sizes()
    record = _machine.calibrate(caches, benchmark.time_stores, benchmark.time_cross)
    _machine.save_calibration(caches, record)
    _machine.current.cache_clear()
    print(f"Caches: {caches.describe()}")
    print(f"Recorded in {_machine.cache_file()}: {_machine.current().describe()}")
    return 0


def check_against_reference():
    """Max |cbn - reference| for every output, per layout and dtype; True if all pass."""
    rng = np.random.default_rng(0)
    passed = True
    print("\nKernels against cbn.reference (max abs difference over all outputs):")
    for label, shape, axis, layout in CHECKS:
        for dtype, tolerance in ((np.float32, 1e-4), (np.float64, 1e-10)):
            x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
            x = x.T if layout == "T" else x     # a transposed view: (512, 300), strided
            dy = rng.standard_normal(x.shape).astype(dtype)
            got = cbn.batch_norm_forward(x, axis=axis)
            want = reference.batch_norm_forward(x, axis=axis)
            got += cbn.batch_norm_backward(dy, x, want[1], want[2], axis=axis)
            want += reference.batch_norm_backward(dy, x, want[1], want[2], axis=axis)
            error = max(float(np.max(np.abs(np.asarray(g, np.float64) - w)))
                        for g, w in zip(got, want))
            ok = error <= tolerance
            passed &= ok
            print(f"  {'ok  ' if ok else 'FAIL'} {label:36s} {np.dtype(dtype).name:8s} "
                  f"{error:.2e}")
    return passed


def main(argv):
    if argv and argv[0] == "bench" and "--torch" in argv:   # cbn.torch against PyTorch
        from cbn.torch import benchmark as torch_benchmark
        return torch_benchmark.main([a for a in argv[1:] if a != "--torch"])
    if argv and argv[0] == "bench":
        if "--layouts" in argv:
            from cbn import layout_benchmark
            return layout_benchmark.main([a for a in argv[1:] if a != "--layouts"])
        return benchmark.main(argv[1:])
    if argv and argv[0] == "calibrate":
        return calibrate()
    if argv and argv[0] == "demo":
        from cbn import demo
        return demo.main(argv[1:])
    print_build()
    passed = check_against_reference()
    print("\nMedian times, float32 (python -m cbn bench for the full table):")
    rows = benchmark.run(benchmark.QUICK_CASES, threads=(_kernels.max_threads(),), repeats=5,
                         operations=("forward", "backward"))
    print(benchmark.format_table(rows))
    print(benchmark.load_note())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
