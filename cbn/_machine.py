"""This machine's cache sizes, and the thresholds the kernels take from them.

The kernels' summation order (feature tiles, blocks, runs and chunks of rows) is fixed by
the shape alone, so a result has the same bits on every machine and for every thread count.
What follows the machine is only how that work is stored and scheduled, never its bits:

* streaming (non-temporal) stores, from ``stream_min_bytes`` of output: they skip reading
  each output line before writing it, which pays once the output cannot stay in the
  last-level cache anyway, and costs where it could (the next pass or layer would have
  found it there). The rule is "output >= LLC"; ``python -m cbn calibrate`` measures
  streaming against ordinary stores on an output of twice the LLC and records the verdict
  for this CPU in a user cache file, since on some CPUs streaming stores are slow at any size;
* the serial cut-off, ``parallel_min_bytes``: an operand smaller than a few L1 data caches
  takes about as long to process as starting the OpenMP team does.
* the direction of second passes, up to ``descend_max_bytes`` read by the first: the
  training forward's normalization and the backward's input gradient over features-inner
  data walk its chunks of rows last to first, starting on what the statistics (sums) pass
  read last, while that is still in the caches. It pays while a good part of what the first
  pass read can still be cached: up to twice the LLC (beyond, a quarter or less of it);
* the route of float32 outputs laid out by rows (a C-ordered y or dx) beside an input laid
  out by features (a Fortran x), where they do not stream (streaming ones take the route
  their layout favours, the same on every machine: cross_rows_pay in the kernels):
  crosswise, 8x8 blocks transposed in registers, or through a stage that transposes the
  input's runs in cache. Which is faster in cache differs between CPUs (the Intel Xeon
  staged faster, the AMD EPYC measured crosswise faster), so it is staged unless
  ``python -m cbn calibrate`` measured crosswise faster on this CPU;
* segments of the backward's crosswise passes, ``cross_block_bytes``: an item's rows are
  taken in segments whose two input tiles fill the L2 (dense rows of 1024 float32
  features: 256 rows), so that an input by rows, read a line of each row per pass of 8 or
  16 features, is still in the L2 for the next pass;
* strips, from ``strip_min_bytes`` of per-feature factors a row: rows of features innermost
  whose factor arrays (3 doubles a feature to normalize, 4 for the input gradient) take half
  the L1d or more are written strip by strip with the factors held in registers; loaded at
  every element, they crowd the input out of the L1d (dense rows of 1024 features: 24-32 KiB
  of factors; inference from memory took twice as long per byte as on 64 features).

Cache sizes come from Linux sysfs, else glibc's ``sysconf``, else macOS ``sysctl``, else
(Windows, unknown systems) a conservative default of 32 KiB L1d, 256 KiB L2, 8 MiB LLC.
"""
import functools
import glob
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

KIB = 1024
NEVER = 1 << 62   # a stream_min_bytes that no output reaches


@dataclass(frozen=True)
class Caches:
    l1d: int     # bytes, per core
    l2: int      # bytes, per core
    llc: int     # bytes, the last level (the L2 where there is no L3)
    source: str  # where the sizes came from

    def describe(self):
        return (f"L1d {_size(self.l1d)}, L2 {_size(self.l2)}, last level {_size(self.llc)} "
                f"({self.source})")


DEFAULT_CACHES = Caches(32 * KIB, 256 * KIB, 8 * KIB * KIB, "default: the OS reported none")


def parse_size(text):
    """'32K', '1024K', '32M', '1G' or a plain byte count -> bytes."""
    text = text.strip().upper().rstrip("B")
    factor = {"K": KIB, "M": KIB ** 2, "G": KIB ** 3}.get(text[-1:], 1)
    return int(text[:-1] if factor != 1 else text) * factor


def from_sysfs(root="/sys/devices/system/cpu/cpu0/cache"):
    """Caches from Linux sysfs (index*/level, type, size), or None if it has none."""
    sizes = {}
    for index in sorted(glob.glob(os.path.join(root, "index*"))):
        try:
            level, kind, size = (_read(os.path.join(index, name))
                                 for name in ("level", "type", "size"))
            if kind in ("Data", "Unified"):
                sizes[int(level)] = parse_size(size)
        except (OSError, ValueError):
            continue
    return _caches(sizes, "Linux sysfs")


def from_sysconf(sysconf=os.sysconf, names=os.sysconf_names):
    """Caches from glibc's sysconf (_SC_LEVEL*_CACHE_SIZE), or None."""
    keys = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE", 3: "SC_LEVEL3_CACHE_SIZE"}
    sizes = {}
    for level, key in keys.items():
        if key in names:
            try:
                sizes[level] = sysconf(key)
            except (OSError, ValueError):
                continue
    return _caches(sizes, "sysconf")


def from_sysctl(run=subprocess.run):
    """Caches from macOS sysctl (hw.l1dcachesize, hw.l2cachesize, hw.l3cachesize), or None."""
    keys = {1: "hw.l1dcachesize", 2: "hw.l2cachesize", 3: "hw.l3cachesize"}
    sizes = {}
    for level, key in keys.items():
        try:
            done = run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
            sizes[level] = int(done.stdout)
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
    return _caches(sizes, "sysctl")


def _caches(sizes, source):
    """Caches from {level: bytes}: needs L1d and L2; the LLC is the highest level found."""
    sizes = {level: n for level, n in sizes.items() if n and n > 0}
    if 1 not in sizes or 2 not in sizes:
        return None
    return Caches(sizes[1], sizes[2], sizes[max(sizes)], source)


@functools.lru_cache(maxsize=1)
def cache_sizes():
    """This machine's caches, from the first source that knows them."""
    found = from_sysfs()
    if found is None and sys.platform.startswith("linux"):
        found = from_sysconf()
    if found is None and sys.platform == "darwin":
        found = from_sysctl()
    return found or DEFAULT_CACHES


@dataclass(frozen=True)
class Thresholds:
    stream_min_bytes: int
    parallel_min_bytes: int
    stream_reason: str
    strip_min_bytes: int
    descend_max_bytes: int
    cross_rows_out: bool
    cross_reason: str
    cross_block_bytes: int

    def describe(self):
        stream = ("never" if self.stream_min_bytes >= NEVER
                  else f"outputs from {_size(self.stream_min_bytes)}")
        route = "crosswise" if self.cross_rows_out else "staged"
        return (f"streaming stores: {stream} ({self.stream_reason}); one thread below "
                f"{_size(self.parallel_min_bytes)}; factors in registers from "
                f"{_size(self.strip_min_bytes)} a row; second passes last to first after "
                f"first passes of up to {_size(self.descend_max_bytes)}; outputs by rows "
                f"beside inputs by features {route} ({self.cross_reason}); the "
                f"backward's crosswise segments {_size(self.cross_block_bytes)} of inputs")


def thresholds(caches, calibration=None):
    """The kernels' thresholds for these caches; calibration: a record of calibrate(), or None."""
    stream_min, reason = caches.llc, "output >= last-level cache"
    cross, cross_reason = False, "not calibrated"
    if calibration is not None:
        stream_min = caches.llc if calibration["stream_pays"] else NEVER
        reason = (f"calibrated: streaming {calibration['stream_ms']:.1f} ms, ordinary "
                  f"{calibration['plain_ms']:.1f} ms on {_size(calibration['bytes'])}")
    if calibration is not None and "cross_rows_out" in calibration:   # older records: staged
        cross = calibration["cross_rows_out"]
        cross_reason = (f"calibrated: crosswise {calibration['cross_ms']:.1f} ms, staged "
                        f"{calibration['staged_ms']:.1f} ms on "
                        f"{_size(calibration['cross_bytes'])}")
    return Thresholds(stream_min, 4 * caches.l1d, reason, caches.l1d // 2, 2 * caches.llc,
                      cross, cross_reason, caches.l2)


# --- calibration, cached per CPU ------------------------------------------------------------

def cache_file():
    """Where calibrations are kept: $CBN_CACHE_DIR, else the user cache directory."""
    folder = os.environ.get("CBN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "cbn")
    return os.path.join(folder, "calibration.json")


def machine_key(caches):
    """A calibration holds for one CPU model with these caches and this many threads."""
    return f"{cpu_model()} | {caches.l1d}/{caches.l2}/{caches.llc} | {os.cpu_count()} cpus"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_calibration(caches, path=None):
    """This machine's recorded calibration, or None (no file, another CPU, unreadable)."""
    try:
        with open(path or cache_file()) as f:
            return json.load(f).get(machine_key(caches))
    except (OSError, ValueError, AttributeError):
        return None


def save_calibration(caches, record, path=None):
    path = path or cache_file()
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError):
        records = {}
    records[machine_key(caches)] = record
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def calibrate(caches, time_stores, time_cross, repeats=5):
    """Whether streaming stores beat ordinary ones on an output of twice the LLC, and whether
    outputs by rows beside inputs by features go faster crosswise than staged.

    time_stores(n_bytes, stream) -> seconds of one call writing n_bytes (cbn.benchmark's
    inference with out=), with streaming stores or not; ordinary stores win ties within
    5 % (they leave the output's tail in the cache). time_cross(n_bytes, crosswise) ->
    seconds of the calls that take either route on operands of n_bytes, measured at half
    the LLC, where the route's own work shows (from memory both wait on it); staging wins
    ties within 5 %, being what every other pairing of layouts does.
    """
    stream_s, plain_s = _alternate(time_stores, 2 * caches.llc, repeats)
    cross_s, staged_s = _alternate(time_cross, caches.llc // 2, repeats)
    return {"stream_pays": stream_s < 0.95 * plain_s, "stream_ms": stream_s * 1e3,
            "plain_ms": plain_s * 1e3, "bytes": 2 * caches.llc,
            "cross_rows_out": cross_s < 0.95 * staged_s, "cross_ms": cross_s * 1e3,
            "staged_ms": staged_s * 1e3, "cross_bytes": caches.llc // 2}


def _alternate(time, n_bytes, repeats):
    """Median seconds of time(n_bytes, True) and time(n_bytes, False), called in turn."""
    times = {True: [], False: []}
    time(n_bytes, True)   # first touch of the buffers
    for _ in range(repeats):
        for choice in (True, False):
            times[choice].append(time(n_bytes, choice))
    return tuple(sorted(times[choice])[repeats // 2] for choice in (True, False))


@functools.lru_cache(maxsize=1)
def current():
    """The thresholds in force: this machine's caches and its recorded calibration, if any."""
    caches = cache_sizes()
    return thresholds(caches, load_calibration(caches))


def apply(kernels, chosen):
    """Hand the thresholds to the compiled kernels (cbn.api does this at import)."""
    kernels.set_stream_min_bytes(chosen.stream_min_bytes)
    kernels.set_parallel_min_bytes(chosen.parallel_min_bytes)
    kernels.set_strip_min_bytes(chosen.strip_min_bytes)
    kernels.set_descend_max_bytes(chosen.descend_max_bytes)
    kernels.set_cross_rows_out(chosen.cross_rows_out)
    kernels.set_cross_block_bytes(chosen.cross_block_bytes)


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _size(n_bytes):
    for unit, factor in (("GiB", KIB ** 3), ("MiB", KIB ** 2), ("KiB", KIB)):
        if n_bytes >= factor:
            return f"{n_bytes / factor:g} {unit}"
    return f"{n_bytes} B"
