"""``python -m cbn bench --torch``: cbn.torch against PyTorch's own CPU batch norm.

Two measurements, each interleaved call by call in one process (so a noisy neighbour slows
both alike, and the order alternates), reported as medians and as the median of the rounds'
ratios:

- the layer: one training-mode forward + backward of ``cbn.torch.BatchNorm2d`` and of
  ``torch.nn.BatchNorm2d`` on the same tensor, NCHW and channels_last, at each thread count;
- a whole training step (forward, cross-entropy, backward, SGD) of a small ResNet-style CNN
  (conv–BN–ReLU blocks with residual connections, batch 32, 56×56 images), as built, after
  ``cbn.torch.convert``, after ``convert(fuse_relu=True)`` (each BN followed by a ReLU in a
  Sequential computes both in one pass), and with its BN layers removed (what the rest of
  the step costs).

Threads: ``torch.set_num_threads`` and threadpoolctl's limit (cbn's OpenMP) together.
Each call's minor page faults are counted too (``getrusage``; not on Windows): a fault of
fresh memory costs microseconds, and which call pays them depends on the process's order
of allocations and frees (README, "Page faults").
"""
import copy
import statistics
import time

try:
    import resource
except ImportError:   # Windows: no getrusage
    resource = None

import torch

from cbn import benchmark
from . import convert
from .modules import BatchNorm2d

LAYER_SHAPE = (32, 64, 56, 56)
QUICK_LAYER_SHAPE = (8, 32, 28, 28)
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def layer_step(module, x, dy):
    """One training forward + backward (input and parameter gradients)."""
    def call():
        x.grad = module.weight.grad = module.bias.grad = None
        module(x).backward(dy)
    return call


def layer_calls(shape, memory_format, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=generator).contiguous(memory_format=memory_format)
    x.requires_grad_()
    return {"cbn": layer_step(BatchNorm2d(shape[1]), x, dy),
            "torch": layer_step(torch.nn.BatchNorm2d(shape[1]), x, dy)}


class Block(torch.nn.Module):
    """conv–BN–ReLU–conv–BN, plus the input, then ReLU (a ResNet basic block)."""

    def __init__(self, channels):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(channels), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(self.body(x) + x)


def small_resnet(width=32, blocks=2, classes=10):
    """A stem conv–BN–ReLU, ``blocks`` basic blocks at full resolution, pooling, a linear
    classifier: 1 + 2·blocks BN layers on ``(N, width, H, W)`` activations."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width),
        torch.nn.ReLU(inplace=True), *[Block(width) for _ in range(blocks)],
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, classes))


def training_step(model, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def call():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    return call


def step_calls(batch, size, memory_format, seed=0):
    """The step with torch's BN, after ``convert`` (cbn's), after ``convert`` with its
    ReLUs fused, and with every BN an Identity (what the rest of the step costs, to tell the
    BN layers' share)."""
    torch.manual_seed(seed)
    model = small_resnet().to(memory_format=memory_format)
    without = copy.deepcopy(model)
    for name, module in list(without.named_modules()):
        if isinstance(module, torch.nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(without.get_submodule(parent) if parent else without, child,
                    torch.nn.Identity())
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    target = torch.randint(0, 10, (batch,))
    return {"cbn": training_step(convert(copy.deepcopy(model)), x, target),
            "cbn fused": training_step(convert(copy.deepcopy(model), fuse_relu=True), x,
                                       target),
            "torch": training_step(model, x, target),
            "no BN": training_step(without, x, target)}


def minor_faults():
    """This process's minor page faults so far (0 where getrusage is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def measure(calls, repeats, clock=time.perf_counter):
    """Interleaved rounds, the order reversed every other round; the median seconds of each
    call, and the median over the rounds of torch's time over cbn's in the same round
    (``ratio``; ``ratio fused`` over "cbn fused"'s, if measured); ``faults``: each call's
    mean minor page faults (None without getrusage).

    ``clock`` may be ``time.thread_time`` for one thread: the CPU time of the calling thread,
    which a busy machine's other processes inflate less than the wall-clock time (they
    still compete for memory bandwidth)."""
    for call in calls.values():   # warm-up: plans, allocator, OpenMP teams
        call()
    times = {name: [] for name in calls}
    faults = {name: 0 for name in calls}
    names = list(calls)
    for round_ in range(repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            before = minor_faults()
            start = clock()
            calls[name]()
            times[name].append(clock() - start)
            faults[name] += minor_faults() - before
    row = {name: statistics.median(t) for name, t in times.items()}
    row["faults"] = {name: n / repeats for name, n in faults.items()} if resource else None
    for key, name in (("ratio", "cbn"), ("ratio fused", "cbn fused")):
        if name in times:
            row[key] = statistics.median(t / c for t, c in zip(times["torch"], times[name]))
    row["fastest"] = {name: min(t) for name, t in times.items()}
    return row


def run(threads=(1, 2), repeats=11, quick=False, formats=tuple(FORMATS), step=True,
        clock=time.perf_counter):
    """Rows of medians (seconds): the layer per format and thread count, then the step."""
    shape = QUICK_LAYER_SHAPE if quick else LAYER_SHAPE
    batch, size = (8, 28) if quick else (32, 56)
    rows = []
    for n_threads in threads:
        with benchmark._thread_limit(n_threads, torch):
            for name in formats:
                rows.append({"what": f"BatchNorm2d fwd+bwd {'x'.join(map(str, shape))}",
                             "format": name, "threads": n_threads,
                             **measure(layer_calls(shape, FORMATS[name]), repeats, clock)})
            if step:
                for name in formats:
                    rows.append({"what": f"training step, small ResNet, batch {batch} "
                                         f"{size}x{size}", "format": name,
                                 "threads": n_threads,
                                 **measure(step_calls(batch, size, FORMATS[name]),
                                           max(3, repeats // 2), clock)})
    return rows


def format_table(rows):
    """Medians (and the fastest of the rounds, the least disturbed on a busy machine) in ms,
    torch / cbn; for the step, also cbn with its ReLUs fused, the step without BN and the BN
    layers' own speed-up inside it, ``(torch − no BN) / (cbn − no BN)`` from the medians;
    last, cbn's and torch's mean page faults per call."""
    lines = ["| what | format | threads | cbn ms (fastest) | torch ms (fastest) | torch / cbn "
             "(fastest) | cbn, ReLUs fused: ms (fastest) | torch / cbn, ReLUs fused "
             "(fastest) | no BN ms | BN layers in the step: torch / cbn | page faults per "
             "call: cbn / torch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def timed(row, name):
        return f"{row[name] * 1e3:.1f} ({row['fastest'][name] * 1e3:.1f})"

    def ratio(row, key, name):
        return f"{row[key]:.2f} ({row['fastest']['torch'] / row['fastest'][name]:.2f})"

    for row in rows:
        cells = [row["what"], row["format"], str(row["threads"]), timed(row, "cbn"),
                 timed(row, "torch"), ratio(row, "ratio", "cbn"), "-", "-", "-", "-", "-"]
        if "cbn fused" in row:
            cells[6], cells[7] = timed(row, "cbn fused"), ratio(row, "ratio fused", "cbn fused")
        if "no BN" in row:
            bn_cbn, bn_torch = row["cbn"] - row["no BN"], row["torch"] - row["no BN"]
            cells[8] = f"{row['no BN'] * 1e3:.1f}"
            cells[9] = f"{bn_torch / bn_cbn:.2f}" if bn_cbn > 0 else "-"
        if row["faults"] is not None:
            cells[10] = f"{row['faults']['cbn']:.0f} / {row['faults']['torch']:.0f}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = benchmark.bench_parser("python -m cbn bench --torch", __doc__, repeats=11)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--no-step", action="store_true", help="the layer only")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the calling thread's CPU time (one thread only)")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != [1]:
        parser.error("--cpu-time measures one thread: use it with --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(format_table(run(tuple(args.threads), args.repeats, args.quick,
                           tuple(args.formats), not args.no_step, clock)))
    return 0
