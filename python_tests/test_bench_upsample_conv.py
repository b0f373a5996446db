"""benches/bench_upsample_conv.py: a short run records every case with the reference and exml_fast rows, and
leaves the generator's fuse_upsample_conv switch as it found it."""

from __future__ import annotations

import json

import pytest
from _util import bench_module, requires_ops

from exml_fast.models.generators import SKDGenerator

pytestmark = requires_ops  # the op benchmarks refuse to run without the compiled library


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_upsample_conv") as mod:
        yield mod


def test_quick_run_records_every_case(bench, tmp_path):
    bench.main(["--quick", "--no-compile", "--batch", "4", "--min-run-time", "0.01", "--threads", "1",
                "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "upsample_conv_cpu_quick.json").read_text())
    cases = {(r["case"], r["direction"]) for r in rec["op_level"]}
    assert len(cases) == 2 * len(bench.PAIRS)
    assert {r["direction"] for r in rec["generator"]} == {"forward", "forward+backward", "fit step"}
    for row in rec["op_level"] + rec["generator"]:
        assert row["variant"] in ("reference", "exml_fast") and row["ms"] > 0 and row["speedup_vs_reference"] > 0
    assert SKDGenerator.fuse_upsample_conv is None
    md = (tmp_path / "upsample_conv_cpu_quick.md").read_text()
    assert "| DFAD fit step" in md and md.count("| exml_fast |") == len(cases) + 3


def test_bf16_run_times_every_case_under_autocast(bench, tmp_path):
    bench.main(["--quick", "--no-compile", "--batch", "4", "--min-run-time", "0.01", "--threads", "1",
                "--precision", "bf16", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "upsample_conv_cpu_quick_bf16.json").read_text())
    assert rec["precision"] == "bf16" and rec["argv"][-4:] == ["--precision", "bf16", "--out", str(tmp_path)]
    assert {r["direction"] for r in rec["generator"]} == {"forward", "forward+backward", "fit step"}
    assert all(row["ms"] > 0 for row in rec["op_level"] + rec["generator"])
    md = (tmp_path / "upsample_conv_cpu_quick_bf16.md").read_text()
    assert "under `torch.autocast` of bf16" in md
    assert SKDGenerator.fuse_upsample_conv is None
