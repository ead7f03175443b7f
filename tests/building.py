"""Build a copy of the package in a temporary directory with other compiler settings, and
run test files against that copy."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_copy(target, **environment):
    """Copy the sources to ``target`` and build the extension in place there.

    Returns (the environment that imports that copy, the build's completed process).
    """
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "cbn", target / "cbn",
                    ignore=shutil.ignore_patterns("*.so", "_kernels.c", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(target), **environment)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=target, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    return env, build


def run_tests(target, env, test_files, timeout):
    """Run ``test_files`` of tests/ in a pytest subprocess against the copy in ``target``."""
    shutil.copytree(ROOT / "tests", target / "tests")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "-W", "ignore", "-o", "addopts=", *test_files],
                          cwd=target / "tests", env=env, capture_output=True, text=True,
                          timeout=timeout)
