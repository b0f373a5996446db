"""benches/dfad_teacher_control.py (issue 42's DFAD control): a short run on a saved teacher prints the teacher's
figures and the student's validation accuracy at every scored step; teacher 'zskd' needs its file."""

from __future__ import annotations

import re

import pytest
from _util import bench_module

from exml_fast import data
from exml_fast.checkpoint import save_model
from exml_fast.models import build_model


@pytest.fixture(scope="module")
def bench():
    with bench_module("dfad_teacher_control") as mod:
        yield mod


@pytest.mark.skipif(data.find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")
def test_a_short_run_scores_the_student_every_k_steps(bench, tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    save_model(build_model("lenet5_dafl", num_classes=10, in_channels=1), path, arch="lenet5_dafl", num_classes=10,
               in_channels=1, input_shape=(1, 32, 32), mean=(0.1307,), std=(0.3081,))
    bench.main(["zskd", "--zskd-teacher", str(path), "--steps", "3", "--every", "2", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert re.search(r"^zskd: teacher val \d+\.\d\d %, mean\|logit\| \d+\.\d\d, mean max logit", out, re.M)
    steps = re.findall(r"^zskd step (\d+): val (\d+\.\d\d) %", out, re.M)
    assert [int(s) for s, _ in steps] == [2, 3]  # every second step and the last
    assert all(0 <= float(v) <= 100 for _, v in steps)


def test_teacher_zskd_needs_its_file(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["zskd"])
    assert "teacher 'zskd' needs --zskd-teacher PATH" in capsys.readouterr().err
