"""Pick, once at import, the build of the kernels this CPU runs best.

setup.py compiles the kernels once per instruction-set level, as cbn._kernels_<level>
(x86-64: baseline = x86-64-v2, avx2 = x86-64-v3, avx512 = x86-64-v4; elsewhere one
baseline). This module takes the highest level both built and runnable here (cbn._cpu
asks the CPU and the OS) — or a lower one named by the environment variable CBN_SIMD —
imports it and registers it as cbn._kernels. Every ``from . import _kernels`` then gets that
module itself: the choice costs nothing per call, and module state (the fork hook's serial
switch, the streaming threshold) lives in the one module in use. A CBN_MARCH build has a
single module, cbn._kernels_march, and no choice.
"""
import importlib
import os
import sys
import warnings

from . import _cpu

LEVELS = ("baseline", "avx2", "avx512")     # lowest first; each runs where the next does


def choose(built, supported, requested):
    """(the level to import, a warning or None), from the levels ``built`` and ``supported``
    (lowest first) and the CBN_SIMD value ``requested`` ("" for the best)."""
    if len(built) == 1 and built[0] not in LEVELS:
        ignored = f"CBN_SIMD={requested} ignored: a CBN_MARCH={built[0]} build has one level"
        return built[0], ignored if requested else None
    runnable = [level for level in built if level in supported]
    if not runnable:
        raise ImportError(f"cbn: this CPU runs none of the levels built ({' '.join(built)}; "
                          "the x86-64 baseline is x86-64-v2: SSE4.2, POPCNT). Build cbn from "
                          "source on it with CBN_MARCH=native.")
    if not requested:
        return runnable[-1], None
    if requested not in LEVELS:
        return runnable[-1], (f"CBN_SIMD={requested!r} is not one of {', '.join(LEVELS)}; "
                              f"using {runnable[-1]}")
    if requested in runnable:
        return requested, None
    rank = LEVELS.index(requested)
    fallback = [level for level in runnable if LEVELS.index(level) < rank][-1:] or runnable
    lacking = "this CPU (or its OS) does not support it" if requested in built else \
        "this build does not have it"
    return fallback[0], f"CBN_SIMD={requested}: {lacking}; using {fallback[0]}"


BUILT = tuple(_cpu.BUILT_LEVELS.split())
SUPPORTED = _cpu.supported_levels()
level, _warning = choose(BUILT, SUPPORTED, os.environ.get("CBN_SIMD", ""))
if _warning:
    warnings.warn(f"cbn: {_warning}", RuntimeWarning, stacklevel=2)
kernels = importlib.import_module(f"{__package__}._kernels_"
                                  f"{level if level in LEVELS else 'march'}")
sys.modules[f"{__package__}._kernels"] = kernels


def simd_level():
    """The instruction-set level of the kernels in use: "baseline", "avx2" or "avx512"
    (x86-64), "baseline" (other architectures), or the CBN_MARCH value it was built with."""
    return level
