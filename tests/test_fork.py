"""A forked child keeps working after its parent ran parallel kernels (GNU libgomp would hang).

Each test runs a parent process with two OpenMP threads in a subprocess with a timeout, so a
hang fails the test instead of hanging the suite.
"""
import os
import sys

import pytest

import cbn
from processes import environment, run

TIMEOUT = 60   # seconds; the script takes a second or two

# The parent runs every operation on inputs large enough for both threads, then a forked
# child runs them again: the child must finish, with the parent's bits.
SCRIPT = """
import multiprocessing, os, sys
import numpy as np
import cbn

def results():
    x = np.random.default_rng(0).standard_normal((8, 16, 40, 40))
    dy = np.random.default_rng(1).standard_normal(x.shape)
    out = []
    for axis in (-1, 1):
        y, mean, var = cbn.batch_norm_forward(x, axis=axis)
        dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, axis=axis)
        out += [y, mean, var, dx, dgamma, dbeta,
                cbn.batch_norm_inference(x, mean, var, axis=axis)]
    return b"".join(a.tobytes() for a in out)

def child(expected):
    os._exit(0 if results() == expected else 3)

expected = results()
if sys.argv[1] == "os.fork":
    pid = os.fork()
    if pid == 0:
        child(expected)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
else:
    process = multiprocessing.get_context("fork").Process(target=child, args=(expected,))
    process.start()
    process.join()
    status = process.exitcode
assert results() == expected          # the parent still works too
print("child exit code", status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: no thread pool to lose")
@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_forked_child_after_parallel_calls_finishes_with_the_same_bits(how):
    code, output = run([sys.executable, "-c", SCRIPT, how], TIMEOUT,
                       environment(OMP_NUM_THREADS="2"))
    assert code == 0, output
    assert "child exit code 0" in output, output
