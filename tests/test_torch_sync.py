"""cbn.torch.SyncBatchNorm with real processes: torch.multiprocessing spawn, gloo on CPU.

tests/torch_worker.py runs every check in each rank (statistics bitwise equal on every rank
and equal to one process on the concatenated unequal shards, an empty shard among them;
gradients; DDP steps against one process; bad input on one rank raising on all). Each run
is a subprocess with a timeout, so a hang fails the test instead of blocking the suite.
"""
import sys

import pytest

from processes import ROOT, environment, run, unavailable

WORKER = ROOT / "tests" / "torch_worker.py"
TIMEOUT = 240   # seconds for one run; it takes 10-40 s (spawning torch processes is slow)


def run_python(*args):
    """``python *args`` with torch's gloo over loopback; fails on a non-zero exit."""
    try:
        import torch.distributed as dist
    except ImportError:
        unavailable("torch is not installed (pip install -e '.[torch]')")
    if not dist.is_available() or not dist.is_gloo_available():
        unavailable("this torch build has no gloo backend")
    env = environment(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    code, output = run([sys.executable, *map(str, args)], TIMEOUT, env)
    assert code == 0, f"exit code {code}:\n{output}"
    return output


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_synchronized_batch_norm_over_gloo(n_ranks):
    output = run_python(WORKER, n_ranks)
    for rank in range(n_ranks):
        assert f"rank {rank}: ok" in output, output


def test_example_trains_under_torchrun():
    example = ROOT / "examples" / "torch_cpu_ddp.py"
    output = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        example, "--steps", "2", "--batch", "8", "--size", "8", "--width", "4")
    assert "2 processes: held-out accuracy" in output, output
    assert "bitwise identical on every process" in output, output
