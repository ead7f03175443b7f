"""The per-epoch progress display of ``fit`` (Keras' ``verbose`` meanings).

``verbose=1`` on a terminal redraws one bar per epoch in place (at most ~10 times a second);
``verbose=2``, or ``verbose=1``/``"auto"`` when the stream is not a terminal (a log file, CI,
a notebook capture), prints one line per epoch; ``verbose=0`` prints nothing.
"""
import sys
import time

__all__ = ["EpochProgress", "resolve_verbose"]


def resolve_verbose(verbose, stream=None):
    stream = sys.stdout if stream is None else stream
    if verbose == "auto":
        verbose = 1
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")
    if verbose == 1 and not (hasattr(stream, "isatty") and stream.isatty()):
        verbose = 2
    return verbose


def _format_metrics(metrics):
    return "".join(f" - {name}: {value:.4f}" for name, value in metrics.items())


class EpochProgress:
    def __init__(self, epoch, epochs, steps, verbose, stream=None, width=30):
        self.stream = sys.stdout if stream is None else stream
        self.verbose = verbose
        self.epoch, self.epochs, self.steps, self.width = epoch, epochs, steps, width
        self.start = self._last_draw = time.perf_counter()
        if verbose == 1:
            self.stream.write(f"Epoch {epoch + 1}/{epochs}\n")

    def update(self, step, metrics):
        """Called after ``step`` (1-based) batches with the running metrics."""
        if self.verbose != 1:
            return
        now = time.perf_counter()
        if step < self.steps and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        done = int(self.width * step / self.steps)
        bar = "=" * max(done - 1, 0) + (">" if done < self.width else "=") + \
            "." * (self.width - done)
        eta = (now - self.start) / step * (self.steps - step)
        self.stream.write(f"\r{step:>{len(str(self.steps))}}/{self.steps} [{bar}]"
                          f" - ETA: {eta:.0f}s{_format_metrics(metrics)}")
        self.stream.flush()

    def finish(self, metrics):
        elapsed = time.perf_counter() - self.start
        timing = f"{elapsed:.1f}s {1000 * elapsed / max(self.steps, 1):.0f}ms/step"
        if self.verbose == 1:
            bar = "=" * self.width
            self.stream.write(f"\r{self.steps}/{self.steps} [{bar}] - {timing}"
                              f"{_format_metrics(metrics)}\n")
        elif self.verbose == 2:
            self.stream.write(f"Epoch {self.epoch + 1}/{self.epochs} - {timing}"
                              f"{_format_metrics(metrics)}\n")
        self.stream.flush()
        return elapsed
