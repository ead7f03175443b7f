"""cbn.torch's BatchNorm2d and a whole CNN training step against PyTorch's own CPU kernels.

Grouped ``torch-layer|format|shape`` and ``torch-step|format`` so the two libraries sit
side by side (``python -m cbn bench --torch`` prints the same comparison interleaved, with
ratios). Needs torch (``pip install -e ".[torch]"``).
"""
import functools

import pytest

torch_benchmark = pytest.importorskip("cbn.torch.benchmark")

LIBRARIES = ("cbn", "torch")


@functools.lru_cache(maxsize=2)
def layer(memory_format):
    return torch_benchmark.layer_calls(torch_benchmark.LAYER_SHAPE,
                                       torch_benchmark.FORMATS[memory_format])


@functools.lru_cache(maxsize=2)
def training(memory_format):
    return torch_benchmark.step_calls(32, 56, torch_benchmark.FORMATS[memory_format])


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("memory_format", list(torch_benchmark.FORMATS))
def bench_batch_norm_2d_forward_backward(benchmark, memory_format, library):
    shape = "x".join(map(str, torch_benchmark.LAYER_SHAPE))
    benchmark.group = f"torch-layer|{memory_format}|{shape}"
    benchmark(layer(memory_format)[library])


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("memory_format", list(torch_benchmark.FORMATS))
def bench_small_resnet_training_step(benchmark, memory_format, library):
    benchmark.group = f"torch-step|{memory_format}|batch 32 56x56"
    benchmark(training(memory_format)[library])
