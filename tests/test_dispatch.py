"""The kernels' instruction-set level: chosen right at import, and every level this machine
runs passes the kernel tests with the same bits (setup.py builds one module per level,
cbn._dispatch picks one)."""
import json
import os
import platform
import sys
from pathlib import Path

import pytest

import cbn
from cbn import _dispatch
from processes import environment, run

TESTS = Path(__file__).resolve().parent
# The kernel tests: every layout and loop order (hypothesis), the edge cases, the thread
# split, the mixed layouts, the fused ops (whose mask reads differ by level), and this
# file's check that the level asked for is in use.
KERNEL_TESTS = ["test_api_oracle.py", "test_api_edges.py", "test_api_threads.py",
                "test_mixed_layouts.py", "test_layout.py", "test_streaming.py", "test_fused.py",
                "test_dispatch.py::test_the_level_asked_for_is_the_one_in_use"]
RUNNABLE = [level for level in _dispatch.BUILT if level in _dispatch.SUPPORTED]
DISPATCHED = _dispatch.BUILT[-1] in _dispatch.LEVELS     # not a single CBN_MARCH build
# The level a plain import picks; the main test run has covered it.
BEST = RUNNABLE[-1] if DISPATCHED else _dispatch.BUILT[0]


@pytest.mark.parametrize("built, supported, requested, expected, warning", [
    (("baseline", "avx2", "avx512"), ("baseline", "avx2", "avx512"), "", "avx512", None),
    (("baseline", "avx2", "avx512"), ("baseline", "avx2"), "", "avx2", None),
    (("baseline", "avx2", "avx512"), ("baseline", "avx2", "avx512"), "baseline", "baseline",
     None),
    (("baseline", "avx2", "avx512"), ("baseline", "avx2", "avx512"), "avx2", "avx2", None),
    (("baseline", "avx2", "avx512"), ("baseline", "avx2"), "avx512", "avx2",
     "does not support it"),
    (("baseline", "avx2", "avx512"), ("baseline",), "avx512", "baseline",
     "does not support it"),
    (("baseline", "avx2"), ("baseline", "avx2", "avx512"), "avx512", "avx2",
     "build does not have it"),
    (("baseline",), ("baseline",), "avx2", "baseline", "build does not have it"),   # ARM
    (("baseline", "avx2", "avx512"), ("baseline", "avx2"), "AVX2", "avx2", "not one of"),
    (("native",), ("baseline", "avx2"), "", "native", None),
    (("native",), ("baseline", "avx2"), "baseline", "native", "ignored"),
])
def test_choice_of_level(built, supported, requested, expected, warning):
    level, message = _dispatch.choose(built, supported, requested)
    assert level == expected
    if warning is None:
        assert message is None
    else:
        assert warning in message and expected in message


def test_a_cpu_without_the_baseline_is_refused_with_a_reason():
    with pytest.raises(ImportError, match="x86-64-v2.*CBN_MARCH=native"):
        _dispatch.choose(("baseline", "avx2"), (), "")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine() != "x86_64",
                    reason="the kernel's list of CPU flags is Linux x86-64 only")
def test_cpu_levels_agree_with_the_kernels_cpu_flags():
    """cbn/_cpu.c reads cpuid and xgetbv itself; Linux lists the flags it found usable."""
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":")[1].split())
    needs = {"baseline": "cx16 lahf_lm popcnt pni ssse3 sse4_1 sse4_2",
             "avx2": "avx avx2 bmi1 bmi2 f16c fma abm movbe",
             "avx512": "avx512f avx512bw avx512cd avx512dq avx512vl"}
    expected = []
    for level in _dispatch.LEVELS:
        if not set(needs[level].split()) <= flags:
            break
        expected.append(level)
    assert _dispatch.SUPPORTED == tuple(expected)


def test_the_level_asked_for_is_the_one_in_use():
    """Run in every level's subprocess below too, where CBN_SIMD names the level."""
    level = os.environ.get("CBN_SIMD") if DISPATCHED else None
    assert cbn.simd_level() == (level or BEST)
    module = sys.modules["cbn._kernels"]
    assert cbn._kernels is module
    assert module.__name__ == f"cbn._kernels_{cbn.simd_level() if DISPATCHED else 'march'}"


@pytest.mark.parametrize("level", [level for level in RUNNABLE if level != BEST])
def test_kernel_tests_pass_on_every_level_this_cpu_runs(level):
    code, output = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", *KERNEL_TESTS], 900,
                       environment(CBN_SIMD=level), cwd=TESTS)
    assert code == 0, output[-4000:]
    assert " passed" in output and " failed" not in output, output[-4000:]


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="one level runs here")
def test_every_level_gives_the_same_bits():
    """What the README promises: the levels differ in speed only. Every kernel path of the
    thread test's cases, each level in a fresh process."""
    results = {}
    for level in RUNNABLE:
        code, output = run([sys.executable, "-c",
                            "import test_api_threads as t; t.print_digests()"], 300,
                           environment(CBN_SIMD=level), cwd=TESTS)
        assert code == 0, output
        results[level] = json.loads(output.splitlines()[-1])["digests"]
    for level in RUNNABLE[1:]:
        for case, digests in results[RUNNABLE[0]].items():
            assert results[level][case] == digests, f"{level} and {RUNNABLE[0]}: {case}"
