"""benches/bench_distributed.py: a smoke run (2 ranks under torchrun, gloo) records its rows."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
from _util import bench_module

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no torch.distributed with gloo")


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_distributed") as mod:
        yield mod


def test_quick_run_records_every_configuration(bench, tmp_path):
    assert bench.main(["--quick", "--max-procs", "2", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "distributed_cpu.json").read_text())
    rows = {(r["procs"], r["threads_per_proc"]): r for r in rec["rows"]}
    assert set(rows) == {(1, 1), (2, 1), (1, 2)}
    assert rows[(2, 1)]["same_bits"] == "yes"  # the sharded job is the single-process job
    assert all(r["images_per_s"] > 0 and r["command_wall_s"] >= r["synthesis_s"] for r in rows.values())
    assert rows[(1, 1)]["speedup"] == 1.0
    md = (tmp_path / "distributed_cpu.md").read_text()
    assert "| 2 × 1 |" in md and "same bits as 1 process" in md


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads-per-rank", "0"])
