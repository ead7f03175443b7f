"""cbn._machine: cache sizes from the OS, the thresholds taken from them, the calibration;
and that no threshold changes a result's bits."""
import numpy as np
import pytest

import cbn
from cbn import _kernels, _machine, coldbench

KIB, MIB = 1024, 1024 ** 2


def fake_sysfs(root, entries):
    for i, (level, kind, size) in enumerate(entries):
        index = root / f"index{i}"
        index.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (index / name).write_text(f"{value}\n")
    return str(root)


@pytest.mark.parametrize("text, expected", [("32K", 32 * KIB), ("1024K", MIB), ("32M", 32 * MIB),
                                            ("1G", 1024 * MIB), ("65536", 65536), ("48KB", 48 * KIB)])
def test_sizes_parse(text, expected):
    assert _machine.parse_size(text) == expected


def test_sysfs_tree_with_three_levels(tmp_path):
    root = fake_sysfs(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "32K"),
                                 (2, "Unified", "2048K"), (3, "Unified", "36864K")])
    assert _machine.from_sysfs(root) == _machine.Caches(48 * KIB, 2 * MIB, 36 * MIB,
                                                        "Linux sysfs")


def test_sysfs_without_l3_takes_l2_as_last_level(tmp_path):
    root = fake_sysfs(tmp_path, [(1, "Data", "64K"), (2, "Unified", "4096K")])
    caches = _machine.from_sysfs(root)
    assert (caches.l2, caches.llc) == (4 * MIB, 4 * MIB)


def test_sysfs_unreadable_or_missing_gives_none(tmp_path):
    assert _machine.from_sysfs(str(tmp_path / "absent")) is None
    root = fake_sysfs(tmp_path, [(1, "Data", "lots"), (2, "Unified", "1024K")])
    assert _machine.from_sysfs(root) is None   # no usable L1d


def test_sysconf_and_sysctl_sources():
    values = {"SC_LEVEL1_DCACHE_SIZE": 32 * KIB, "SC_LEVEL2_CACHE_SIZE": 512 * KIB,
              "SC_LEVEL3_CACHE_SIZE": 0}   # 0: glibc knows no L3
    caches = _machine.from_sysconf(values.__getitem__, values)
    assert (caches.l1d, caches.l2, caches.llc) == (32 * KIB, 512 * KIB, 512 * KIB)
    assert _machine.from_sysconf(values.__getitem__, {}) is None

    class Done:
        def __init__(self, stdout):
            self.stdout = stdout

    sysctl = {"hw.l1dcachesize": "65536\n", "hw.l2cachesize": "4194304\n", "hw.l3cachesize": ""}
    caches = _machine.from_sysctl(lambda argv, **kw: Done(sysctl[argv[-1]]))
    assert (caches.l1d, caches.l2, caches.llc) == (64 * KIB, 4 * MIB, 4 * MIB)


def test_thresholds_follow_the_caches_and_the_calibration():
    caches = _machine.Caches(32 * KIB, MIB, 36 * MIB, "test")
    assert _machine.thresholds(caches).stream_min_bytes == 36 * MIB
    assert _machine.thresholds(caches).parallel_min_bytes == 128 * KIB
    assert _machine.thresholds(caches).strip_min_bytes == 16 * KIB
    assert _machine.thresholds(caches).descend_max_bytes == 72 * MIB
    assert _machine.thresholds(caches).cross_rows_out is False
    assert _machine.thresholds(caches).cross_block_bytes == MIB
    slow = {"stream_pays": False, "stream_ms": 12.9, "plain_ms": 7.3, "bytes": 72 * MIB}
    assert _machine.thresholds(caches, slow).stream_min_bytes == _machine.NEVER
    assert "12.9 ms" in _machine.thresholds(caches, slow).describe()
    assert _machine.thresholds(caches, slow).cross_rows_out is False   # an older record
    crosswise = dict(slow, cross_rows_out=True, cross_ms=3.5, staged_ms=4.5,
                     cross_bytes=18 * MIB)
    assert _machine.thresholds(caches, crosswise).cross_rows_out is True
    assert "crosswise 3.5 ms" in _machine.thresholds(caches, crosswise).describe()


@pytest.mark.parametrize("fast_s, slow_s, pays", [(1.0, 2.0, True), (2.0, 1.0, False),
                                                  (0.97, 1.0, False)])
def test_calibration_decides_by_the_medians(fast_s, slow_s, pays):
    caches = _machine.Caches(32 * KIB, MIB, 8 * MIB, "test")
    asked = {"stores": [], "cross": []}

    def timer(name):
        def time(n_bytes, choice):
            asked[name].append(n_bytes)
            return fast_s if choice else slow_s
        return time

    record = _machine.calibrate(caches, timer("stores"), timer("cross"))
    assert record["stream_pays"] is pays
    assert record["cross_rows_out"] is pays
    assert set(asked["stores"]) == {16 * MIB}   # twice the last-level cache
    assert set(asked["cross"]) == {4 * MIB}     # half of it


def test_calibration_is_kept_per_machine(tmp_path):
    path = str(tmp_path / "cbn" / "calibration.json")
    caches = _machine.Caches(32 * KIB, MIB, 8 * MIB, "test")
    other = _machine.Caches(32 * KIB, MIB, 16 * MIB, "test")
    record = {"stream_pays": False, "stream_ms": 2.0, "plain_ms": 1.0, "bytes": 16 * MIB}
    assert _machine.load_calibration(caches, path) is None
    _machine.save_calibration(caches, record, path)
    assert _machine.load_calibration(caches, path) == record
    assert _machine.load_calibration(other, path) is None


def test_the_kernels_use_this_machines_thresholds():
    chosen = _machine.current()
    old = _kernels.set_stream_min_bytes(0)
    _kernels.set_stream_min_bytes(old)
    assert old == chosen.stream_min_bytes
    old = _kernels.set_parallel_min_bytes(0)
    _kernels.set_parallel_min_bytes(old)
    assert old == chosen.parallel_min_bytes
    old = _kernels.set_strip_min_bytes(0)
    _kernels.set_strip_min_bytes(old)
    assert old == chosen.strip_min_bytes
    old = _kernels.set_descend_max_bytes(0)
    _kernels.set_descend_max_bytes(old)
    assert old == chosen.descend_max_bytes
    old = _kernels.set_cross_rows_out(True)
    _kernels.set_cross_rows_out(old)
    assert old == chosen.cross_rows_out
    old = _kernels.set_cross_block_bytes(0)
    _kernels.set_cross_block_bytes(old)
    assert old == chosen.cross_block_bytes


LAYOUTS = [((64, 6, 6, 64), -1, "C"), ((48, 16, 9, 9), 1, "C"), ((40, 6, 6, 64), -1, "F"),
           ((300, 136), -1, "C"), ((40, 6, 12, 64), -1, "S"), ((8, 60, 64), (0, 2), "C")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, layout", LAYOUTS)
def test_streaming_strips_and_the_serial_cut_off_never_change_bits(shape, axis, layout, dtype):
    """Every combination against none: streaming stores (outputs 16 bytes past a cache line,
    as NumPy allocates them, stream from the next line on), strips of factors in registers
    (forced onto every width here), the parallel split, and second passes last to first
    (with the parallel split and without; with a ReLU and its mask too)."""
    rng = np.random.default_rng(1)
    x, dy = (rng.standard_normal(shape).astype(dtype) + 3 for _ in range(2))
    if layout == "F":
        x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    if layout == "S":
        x, dy = x[:, :, ::2], dy[:, :, ::2]
    mean, var = cbn.batch_stats(x, axis=axis)
    gamma = rng.random(mean.shape) + 0.5

    def past_a_line():   # laid out like x, 16 bytes past a cache line whatever NumPy gives
        strides = np.empty_like(x, order="K").strides
        raw = np.empty(x.nbytes + 128, np.uint8)
        return np.ndarray(x.shape, x.dtype, raw, -raw.ctypes.data % 64 + 16, strides)

    def outputs():
        return (cbn.batch_norm_forward(x, gamma, gamma, axis=axis)
                + (cbn.batch_norm_inference(x, mean, var, gamma, gamma, axis=axis),
                   cbn.batch_norm_inference(x, mean, var, gamma, gamma, axis=axis,
                                            out=past_a_line()),
                   cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis,
                                           out=past_a_line())[0])
                + cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis)
                + relu_forward_backward())

    def relu_forward_backward():
        y, mean, var, mask = cbn.batch_norm_forward(x, gamma, gamma, axis=axis,
                                                    activation="relu", return_mask=True)
        return (y, mask) + cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis,
                                                   activation="relu", mask=mask)

    setters = (_kernels.set_stream_min_bytes, _kernels.set_parallel_min_bytes,
               _kernels.set_strip_min_bytes, _kernels.set_descend_max_bytes)

    def with_thresholds(*thresholds):
        old = [setter(value) for setter, value in zip(setters, thresholds)]
        try:
            return outputs()
        finally:
            for setter, value in zip(setters, old):
                setter(value)

    never = _machine.NEVER
    plain = with_thresholds(never, never, never, 0)
    for thresholds in ((0, 0, never, never), (0, never, 0, 0), (never, 0, 0, never),
                       (never, never, never, never)):
        for got, expected in zip(with_thresholds(*thresholds), plain):
            np.testing.assert_array_equal(got, expected, strict=True, err_msg=str(thresholds))


def test_cold_cases_are_four_last_level_caches():
    for case in coldbench.cold_cases(32 * MIB):
        assert 4 * 32 * MIB <= 4 * np.prod(case.shape) < 4 * 32 * MIB * 1.05


@pytest.mark.parametrize("operation, in_cache, moved, kernel", [
    ("stats", False, 1, "read"), ("inference", False, 2, "copy"), ("forward", True, 2, "copy"),
    ("forward", False, 3, "triad"), ("backward", True, 3, "triad"),
    ("backward", False, 5, "triad")])
def test_bytes_moved_follow_issue_9(operation, in_cache, moved, kernel):
    assert coldbench.bytes_moved(operation, 100, in_cache) == (moved * 100, kernel)
