"""Real-process checks of cbn.torch.SyncBatchNorm over torch.distributed (gloo, CPU).

``python tests/torch_worker.py N_RANKS`` spawns N_RANKS processes (torch.multiprocessing,
gloo over loopback, a FileStore rendezvous) that each run every check below and print
``rank R: ok``; a failing check raises in its process, which makes the spawn (and the exit
code) fail. tests/test_torch_sync.py runs it with a timeout, so a hang fails the test.
"""
import gc
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cbn.torch as ct

F64 = torch.float64


def shard_rows(total, n_ranks):
    """Unequal shards of ``total`` rows; the last rank's is empty when there are 3 ranks."""
    sizes = {2: [3, total - 3], 3: [total - 4, 4, 0]}[n_ranks]
    starts = [sum(sizes[:r]) for r in range(n_ranks)]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def gathered(tensor):
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, tensor.contiguous())
    return rows


def check_statistics_and_gradients(rank, n_ranks, shape, arrange):
    """One SyncBatchNorm step on unequal shards against one process on the whole batch."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator, dtype=F64) * 2 + 100    # |mean| >> std
    dy = torch.randn(shape, generator=generator, dtype=F64)
    whole = torch.nn.BatchNorm2d(shape[1], dtype=F64) if len(shape) == 4 else \
        torch.nn.BatchNorm1d(shape[1], dtype=F64)
    with torch.no_grad():
        whole.weight.uniform_(0.5, 1.5, generator=generator)
        whole.bias.normal_(generator=generator)
    synchronized = ct.SyncBatchNorm(shape[1], dtype=F64)
    synchronized.load_state_dict(whole.state_dict())

    rows = shard_rows(shape[0], n_ranks)[rank]
    for step in range(2):
        x_whole = x.clone().requires_grad_()
        y_whole = whole(x_whole)
        grads_whole = torch.autograd.grad(y_whole, [x_whole, whole.weight, whole.bias], dy)
        x_shard = arrange(x[rows]).requires_grad_()
        y_shard = synchronized(x_shard)
        grads = torch.autograd.grad(y_shard, [x_shard, synchronized.weight,
                                              synchronized.bias], dy[rows])
        assert torch.allclose(y_shard, y_whole[rows], rtol=0, atol=1e-9), step
        assert torch.allclose(grads[0], grads_whole[0][rows], rtol=0, atol=1e-9), step
        for got, want in zip(grads[1:], grads_whole[1:]):      # local sums add up
            total = torch.stack(gathered(got)).sum(0)
            assert torch.allclose(total, want, rtol=1e-10, atol=1e-9), step
        for name in ("running_mean", "running_var"):
            mine = getattr(synchronized, name)
            assert all(torch.equal(mine, other) for other in gathered(mine)), name  # bitwise
            assert torch.allclose(mine, getattr(whole, name), rtol=1e-12, atol=1e-12), name
        assert int(synchronized.num_batches_tracked) == step + 1


def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))


def check_ddp_matches_one_process(rank, n_ranks, steps=3, batch=12):
    """DDP with convert(model, sync=True) on equal shards == one process on the whole batch."""
    torch.manual_seed(0)
    single = small_cnn().to(F64)
    model = ct.convert(small_cnn().to(F64), sync=True)
    model.load_state_dict(single.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                  for m in (single, ddp)]
    generator = torch.Generator().manual_seed(2)
    per_rank = batch // n_ranks
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for _ in range(steps):
        x = torch.randn(batch, 3, 6, 6, generator=generator, dtype=F64)
        target = torch.randn(batch, 4, generator=generator, dtype=F64)
        for net, optimizer, rows in ((single, optimizers[0], slice(None)),
                                     (ddp, optimizers[1], mine)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x[rows]), target[rows]).backward()
            optimizer.step()
    for (name, want), got in zip(single.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(got.to(F64), want.to(F64), rtol=1e-9, atol=1e-10), name


def expect_error_everywhere(kind, words, call):
    try:
        call()
    except kind as error:
        assert all(w in str(error) for w in words), str(error)
    else:
        raise AssertionError(f"no {kind.__name__} raised")


def check_bad_input_raises_on_every_rank(rank, n_ranks):
    layer = ct.SyncBatchNorm(3)
    good = torch.randn(4, 3, 2, 2)
    bad = torch.randn(4, 5, 2, 2) if rank == 1 else good               # one rank's error
    expect_error_everywhere(ValueError, ["rank 1:", "expected 3 channels"], lambda: layer(bad))
    float64 = good.double() if rank == 0 else good                      # ranks disagree
    expect_error_everywhere(ValueError, ["disagree", "dtype"], lambda: layer(float64))
    single = torch.randn(1 if rank == 0 else 0, 3)                      # one value in all
    expect_error_everywhere(ValueError, ["more than 1 value"], lambda: layer(single))
    layer(good).sum().backward()                                       # still in step
    # Refused inputs count no batch, except the single-value one, which PyTorch also
    # counts before it refuses it.
    assert int(layer.num_batches_tracked) == 2


def run(rank, n_ranks, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=n_ranks)
    torch.set_num_threads(1)
    try:
        check_statistics_and_gradients(rank, n_ranks, (10, 3, 4, 5), lambda x: x)
        check_statistics_and_gradients(
            rank, n_ranks, (10, 3, 4, 5),
            lambda x: x.contiguous(memory_format=torch.channels_last))
        check_statistics_and_gradients(rank, n_ranks, (9, 4), lambda x: x)
        check_ddp_matches_one_process(rank, n_ranks)
        check_bad_input_raises_on_every_rank(rank, n_ranks)
        print(f"rank {rank}: ok", flush=True)
    finally:
        gc.collect()    # DDP's cycles go before the process group (examples/torch_cpu_ddp.py)
        dist.destroy_process_group()
    # Every check passed and the group is gone. Leave without the interpreter's teardown, in
    # which torch's own threads still aborted a rank now and then ("terminate called without
    # an active exception", SIGABRT, after every rank had printed ok: 1 run in about 13 with
    # the collect above, 3 in 20 without it). cbn starts no threads of its own here.
    os._exit(0)


if __name__ == "__main__":
    n_ranks = int(sys.argv[1])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(run, args=(n_ranks, os.path.join(directory, "store")), nprocs=n_ranks)
