"""The arrays of a call: inputs as the kernels read them, and the buffers they write.

The only copies cbn makes of input data are made here (kernel_input).
"""
import numpy as np

from . import _checks


def kernel_input(x, name="x", dtype=None):
    """(x as given, x as the kernels read it: in ``dtype`` if one is given).

    The only copies cbn makes of input data are here: float16 (computed in float32), dy of
    another dtype than x, byte-swapped and misaligned arrays.
    """
    if type(x) is np.ndarray:
        char = x.dtype.char
        if (char in "fd" and x.ndim and x.dtype.isnative and x.flags.aligned
                and (dtype is None or x.dtype == dtype)):
            return x, x     # the common case, checked first
    x = _checks.as_data(x, name)
    if dtype is None:
        dtype = np.float32 if x.dtype.char == "e" else x.dtype.newbyteorder("=")
    if x.dtype != dtype or not x.flags.aligned:
        return x, x.astype(dtype, order="K")
    return x, x


ALIGNED_MIN_BYTES = 1 << 20
PAGE_BYTES = 4096


def dense_strides(x):
    """Byte strides of a dense array of x's shape with its axes in x's memory order."""
    strides = [0] * x.ndim
    step = x.itemsize
    for axis in sorted(range(x.ndim), key=lambda a: abs(x.strides[a]), reverse=True)[::-1]:
        strides[axis] = step
        step *= x.shape[axis]
    return tuple(strides)


def bit_strides(shape, itemsize):
    """Byte strides (itemsize per element) of a C-ordered array of shape: the plan's walk of
    a mask then counts bits, element i of x's logical C order being bit i."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def empty_like(x, dense=False):
    """An uninitialised array shaped and ordered like x (NumPy's order 'K'; with ``dense``,
    strides always dense_strides(x), which the fused backward plans with).

    Large ones start on a 64-byte boundary, so that every row whose length is a multiple of
    64 bytes fills whole cache lines and the kernels can write it with streaming stores, and
    at x's offset within a 4 KiB page (rounded down to the line): element i of the output
    then never shares the low 12 address bits of an element of x a few vectors after i,
    which x86 cores take for a possible dependency of that load on the store ("4K
    aliasing") and wait on. NumPy's large arrays start 16 bytes into a page; an output one
    line-aligned step on from there, 48 bytes ahead of x, took 1.1-1.35x as long for
    inference, forward and backward from memory (129 MiB, one thread, fresh outputs).
    """
    if x.nbytes < ALIGNED_MIN_BYTES and not dense:
        return np.empty_like(x, order="K")
    raw = np.empty(x.nbytes + PAGE_BYTES, np.uint8)
    target = x.__array_interface__["data"][0] % PAGE_BYTES // 64 * 64
    offset = (target - raw.__array_interface__["data"][0]) % PAGE_BYTES
    return np.ndarray(x.shape, x.dtype, raw, offset, dense_strides(x))


def writable_output(x_in, x, out, *inputs):
    """The buffer the kernel writes: the caller's ``out`` when usable as is, else new.

    ``out`` may be an input itself (in place) but must not partly overlap any input.
    """
    if out is not None:
        _checks.output_buffer(out, x_in)
        for other in inputs:
            _checks.no_partial_overlap(out, other)
        if out.dtype == x.dtype and out.flags.aligned and out.dtype.isnative:
            return out
    return empty_like(x)


def deliver(x_in, computed, out):
    """Deliver a per-element result in x's dtype, into ``out`` if the caller gave one."""
    if out is None:
        return computed if computed.dtype == x_in.dtype else computed.astype(x_in.dtype)
    if computed is not out:
        np.copyto(out, computed, casting="unsafe")
    return out


def apart_from(out, *vectors):
    """The kernel vectors, each copied if it shares memory with ``out``: the kernels keep
    reading parameters while they write the output."""
    if out is None:
        return vectors
    return tuple(v.copy() if v is not None and np.may_share_memory(out, v) else v
                 for v in vectors)
