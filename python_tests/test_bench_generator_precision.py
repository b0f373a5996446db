"""benches/bench_generator_precision.py: a short run records both presets in both precisions, the float32
fit as the peer."""

from __future__ import annotations

import json

import pytest
from _util import bench_module, requires_ops

pytestmark = requires_ops  # the op benchmarks refuse to run without the compiled library


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_generator_precision") as mod:
        yield mod


def test_quick_run_records_both_presets_in_both_precisions(bench, tmp_path):
    bench.main(["--quick", "--batch", "4", "--steps", "2", "--min-run-time", "0.01", "--threads", "1",
                "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "generator_precision_cpu_quick.json").read_text())
    assert [r["case"] for r in rec["results"]] == ["dafl fit step, batch 4", "dfad fit step, batch 4"]
    for r in rec["results"]:
        by = {row["variant"]: row for row in r["rows"]}
        assert set(by) == {"fp32", "bf16"} and by["fp32"]["speedup_vs_fp32"] == 1.0
        assert by["bf16"]["ms"] > 0 and by["bf16"]["speedup_min"] <= by["bf16"]["speedup_vs_fp32"]
        assert r["steps_per_call"] == 2 and by["bf16"]["ms_min"] <= by["bf16"]["ms"] <= by["bf16"]["ms_max"]
    md = (tmp_path / "generator_precision_cpu_quick.md").read_text()
    assert md.count("| dafl fit step, batch 4 |") == 2 and "`precision=\"bf16\"`" in md
