"""Keep the child of a ``fork()`` from hanging in GNU libgomp.

After a parallel region libgomp keeps its worker threads for the next one. ``fork()`` copies
only the calling thread, yet the child inherits libgomp's record of the workers, and its
first parallel region waits for threads that do not exist (GCC bug 60035). So every forked
child — ``os.fork()``, ``multiprocessing`` with the "fork" start method — runs cbn's kernels
on its one thread. Its results are bitwise the same: the work is split by shape, not by
thread count.
"""
import os

from . import _kernels

if hasattr(os, "register_at_fork"):          # every platform that has fork()
    os.register_at_fork(after_in_child=_kernels.run_serially)
