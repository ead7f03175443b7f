"""``python -m cbn bench --torch`` (cbn/torch/benchmark.py) on its quick layer: the rows and
the table it prints. Timings are not checked (speed goes in bench/ and the README)."""
import re

import pytest

from processes import unavailable

try:
    from cbn.torch import benchmark
except ImportError:
    benchmark = None


def test_quick_layer_rows_and_table():
    if benchmark is None:
        unavailable("torch is not installed (pip install -e '.[torch]')")
    rows = benchmark.run(threads=(1,), repeats=2, quick=True, formats=("channels_last",),
                         step=False)
    (row,) = rows
    assert row["format"] == "channels_last" and row["threads"] == 1
    assert row["cbn"] > 0 and row["torch"] > 0 and row["ratio"] > 0
    if row["faults"] is None:
        pytest.skip("no getrusage here: page faults are not counted")
    assert set(row["faults"]) == {"cbn", "torch"} and min(row["faults"].values()) >= 0
    header, rule, line = benchmark.format_table(rows).splitlines()
    assert header.count("|") == rule.count("|") == line.count("|") == 12
    assert re.search(r"\| \d+ / \d+ \|$", line), line
