"""cbn.torch's outputs: ``torch.empty_like`` in the input's memory format, large ones advised
as transparent huge pages (cbn/torch/_memory.py). Skipped without torch, except under CI."""
import os

import pytest

from processes import unavailable

try:
    import torch
    import cbn.torch as ct
    from cbn.torch import _memory
except ImportError:
    torch = None

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


@pytest.fixture(autouse=True, scope="module")
def needs_torch():
    if torch is None:
        unavailable("torch is not installed (pip install -e '.[torch]')")


def vm_flags(address):
    """The VmFlags of the mapping holding ``address``, from /proc/self/smaps."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def huge_pages_available():
    try:
        with open(THP) as setting:
            return "[never]" not in setting.read() and _memory._ADVISE is not None
    except OSError:
        return False


@pytest.mark.parametrize("memory_format", ["contiguous_format", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 64, 96, 96)], ids=["small", "9 MiB"])
def test_outputs_are_like_the_input(shape, memory_format):
    x = torch.randn(shape).contiguous(memory_format=getattr(torch, memory_format))
    out = _memory.empty_like(x)
    assert (out.shape, out.dtype, out.stride()) == (x.shape, x.dtype, x.stride())


def test_large_outputs_are_advised_as_huge_pages():
    if not os.path.exists("/proc/self/smaps") or not huge_pages_available():
        pytest.skip("no transparent huge pages on this system")
    x = torch.randn(4, 64, 96, 96).contiguous(memory_format=torch.channels_last)   # 9 MiB
    y = ct.BatchNorm2d(64)(x)
    storage = y.untyped_storage()
    first = -(-storage.data_ptr() // _memory.HUGE_PAGE) * _memory.HUGE_PAGE
    last = (storage.data_ptr() + storage.nbytes()) // _memory.HUGE_PAGE * _memory.HUGE_PAGE
    assert last - first >= 3 * _memory.HUGE_PAGE
    for page in range(first, last, _memory.HUGE_PAGE):
        assert "hg" in vm_flags(page), f"{page:#x} of the output not advised"
    assert _memory.advise_huge_pages(y) == last - first     # whole pages inside it only
