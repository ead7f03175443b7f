"""Run a command in its own process group with a time limit, so a hang fails a test
instead of the suite, and tell the tests when a tool they need is missing."""
import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def environment(**variables):
    """This process's environment, importing cbn from this checkout, plus ``variables``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **variables)


def run(command, timeout, env=None, cwd=ROOT):
    """(exit code, stdout and stderr together); kills the whole group if it hangs."""
    process = subprocess.Popen(command, cwd=cwd, env=env or environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)          # the command and all it started
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(map(str, command))} hung (killed after {timeout} s):\n{output}")
    return process.returncode, output


def unavailable(reason):
    """Skip a test whose tool is missing, except under CI=true (what .ci/run sets): there
    the tool is part of the install, and a test that silently skipped would hide its loss."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the test must run)", pytrace=False)
    pytest.skip(reason)
