"""`make demo` end to end: train a LeNet-5-BN for one epoch, invert it, save the grid."""

from __future__ import annotations

import pytest

from exml_fast import data
from exml_fast.experiments import demo_inversion as demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    if data.find_data_root("mnist") is None:
        pytest.skip("MNIST files not found (set EXML_FAST_DATA)")
    rc = demo.main(["--out", str(tmp_path), "--seed", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    png = tmp_path / "demo_inversion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = next(ln for ln in out.splitlines() if "teacher accuracy on the 64 images" in ln)
    acc = float(line.split("images")[1].split()[0])
    assert acc >= 0.9, line
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"
