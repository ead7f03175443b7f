"""The demo's quick mode runs end to end (needs the demo extra)."""
import numpy as np
import pytest

pytest.importorskip("sklearn")

from cbn import demo  # noqa: E402


def test_quick_demo_prints_the_table_and_writes_the_picture(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Total params: 52,466" in out            # the chapter's model on 8x8 inputs
    assert "epochs to 95% val acc" in out
    for config in demo.CONFIGS:
        assert config[0] in out
    assert "max |difference| of predicted probabilities" in out
    picture = tmp_path / "learning_curves.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_data_and_models():
    x_train, x_val, y_train, y_val = demo.load_data()
    assert x_train.shape[1:] == (8, 8) and len(x_train) + len(x_val) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_val)) == set(range(10))
    counts = {p: demo.build_model(p).count_params() for p in ("after", "before", "none")}
    # no BN: 64*300+300 + 300*100+100 + 100*10+10; BN adds 4 per feature (64, 300, 100),
    # and BN before the activation drops the two hidden biases.
    assert counts["none"] == 19500 + 30100 + 1010
    assert counts["after"] == counts["none"] + 4 * (64 + 300 + 100)
    assert counts["before"] == counts["after"] - 300 - 100


def test_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])
