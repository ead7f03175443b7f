"""Builds with other settings: without OpenMP, and under AddressSanitizer."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from building import build_copy, run_tests
from processes import unavailable

pytest.importorskip("Cython")

# The kernel tests, whose hypothesis cases walk every layout and loop order; under
# AddressSanitizer with the thread tests too, where the parallel split matters.
KERNEL_TESTS = ["test_api_oracle.py", "test_api_edges.py", "test_mixed_layouts.py",
                "test_layout.py", "test_fused.py", "test_streaming.py"]
SANITIZED_TESTS = ["test_api_oracle.py", "test_api_edges.py", "test_api_threads.py",
                   "test_api_sync.py", "test_api_concurrency.py", "test_layout.py",
                   "test_fused.py", "test_streaming.py"]

BUILD_REQUESTED = ["test_api_threads.py::test_build_is_the_one_asked_for",
                   "test_dispatch.py::test_the_level_asked_for_is_the_one_in_use"]


def test_kernel_tests_pass_on_the_serial_build(tmp_path):
    # Built for this CPU only (CBN_MARCH=native: one module, not one per level), which
    # tests that build too.
    env, build = build_copy(tmp_path, CBN_OPENMP="0", CBN_MARCH="native")
    assert "built SERIAL" in build.stderr
    run = run_tests(tmp_path, env, [*KERNEL_TESTS, *BUILD_REQUESTED], timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-3000:]


def address_sanitizer_runtime():
    """The path of gcc's libasan.so, or None."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip() if shutil.which("gcc") else ""
    return libasan if Path(libasan).is_file() else None


def test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """Every kernel test again, with each out-of-bounds read or write a hard error."""
    libasan = address_sanitizer_runtime()
    if libasan is None:
        unavailable("gcc's AddressSanitizer runtime is not installed")
    env, _ = build_copy(tmp_path, CFLAGS="-fsanitize=address -fno-omit-frame-pointer",
                        LDFLAGS="-fsanitize=address", CBN_MARCH="native")  # one module
    env.update(LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    run = run_tests(tmp_path, env, SANITIZED_TESTS, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "AddressSanitizer" not in run.stderr


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception),
                                         ("", pytest.skip.Exception)])
def test_missing_address_sanitizer_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path,
                                                                        ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys.modules[__name__], "address_sanitizer_runtime", lambda: None)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception),
                       match="AddressSanitizer runtime is not installed") as raised:
        test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path)
    assert raised.type is outcome
