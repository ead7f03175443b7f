"""Builds with other settings: without OpenMP, and under AddressSanitizer."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from building import ROOT, build_copy

pytest.importorskip("Cython")

SERIAL_CHECK = """
import numpy as np, cbn
from cbn import reference
assert not cbn.openmp_enabled()
x = np.random.default_rng(0).standard_normal((64, 40, 3))
for axis in (-1, 1, [0, 2]):
    y, mean, var = cbn.batch_norm_forward(x, axis=axis)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(var, var_ref, rtol=1e-10)
print("serial build ok")
"""

# The kernel tests, whose hypothesis cases walk every layout and loop order.
KERNEL_TESTS = ["test_api_oracle.py", "test_api_edges.py", "test_api_threads.py",
                "test_api_sync.py", "test_api_concurrency.py", "test_layout.py"]


def test_serial_build_without_openmp(tmp_path):
    env, build = build_copy(tmp_path, CBN_OPENMP="0")
    assert "built SERIAL" in build.stderr
    check = subprocess.run([sys.executable, "-c", SERIAL_CHECK], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "serial build ok" in check.stdout


def test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """Every kernel test again, with each out-of-bounds read or write a hard error."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip() if shutil.which("gcc") else ""
    if not Path(libasan).is_file():
        pytest.skip("gcc's AddressSanitizer runtime is not installed")
    env, _ = build_copy(tmp_path, CFLAGS="-fsanitize=address -fno-omit-frame-pointer",
                        LDFLAGS="-fsanitize=address")
    shutil.copytree(ROOT / "tests", tmp_path / "tests")
    env.update(LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "-W", "ignore", "-o", "addopts=", *KERNEL_TESTS],
                         cwd=tmp_path / "tests", env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "AddressSanitizer" not in run.stderr
