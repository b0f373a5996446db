"""`exml-fast demo` end to end at the smoke budget: every strategy of both tables runs, the report and plots
are written, a second invocation reuses the experts and the finished runs, and bad budgets are refused."""

from __future__ import annotations

import pytest

from exml_fast.cli import main
from exml_fast.data import find_data_root
from exml_fast.experiments.cil import DEMO_CIL_STRATEGIES
from exml_fast.experiments.demo import DEMO_STRATEGIES, run_demo

needs_mnist = pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found")


@needs_mnist
def test_smoke_demo_runs_every_strategy_and_writes_its_report(tmp_path, capsys):
    argv = ["demo", "--budget", "smoke", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    out = tmp_path / "smoke"  # never where the demo budget's experts and runs live
    first = capsys.readouterr().out
    assert "training (once)" in first
    for name in (*DEMO_STRATEGIES, *DEMO_CIL_STRATEGIES):
        assert f"[demo] {name} " in first, name
        assert (out / f"{name}_seed0" / "result.json").exists(), name
    assert "skd" not in DEMO_CIL_STRATEGIES
    report = (out / "report.md").read_text()
    assert "## Demo: Split MNIST" in report and "## Class-incremental learning from data" in report
    assert all(name in report for name in (*DEMO_STRATEGIES, *DEMO_CIL_STRATEGIES))
    assert (out / "stream_accuracy.png").stat().st_size > 0
    assert not (tmp_path / "experts_seed0").exists()
    # A second invocation reuses the experts and reads the finished runs back.
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert (out / "report.md").read_text() == report


def test_demo_budget_is_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="budget"):
        run_demo(out=tmp_path, budget="paper")
    assert main(["demo", "--budget", "huge", "--out", str(tmp_path)]) == 2
    assert "--budget" in capsys.readouterr().err
