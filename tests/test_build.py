"""The build works without OpenMP: serial kernels, a warning, the same results."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
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


def test_serial_build_without_openmp(tmp_path):
    pytest.importorskip("Cython")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "cbn", tmp_path / "cbn",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    env = dict(os.environ, CBN_OPENMP="0", PYTHONPATH=str(tmp_path))
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "built SERIAL" in build.stderr
    check = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "serial build ok" in check.stdout
