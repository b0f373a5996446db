"""benches/skd_transfer.py (SKD Table I's sanity figure): a smoke run records T_0, S_0 with T_0's head and the
gap; the head swap puts exactly the teacher's classifier on the student."""

from __future__ import annotations

import json

import pytest
import torch
from _util import bench_module

from exml_fast import data
from exml_fast.models import LeNet5BN
from exml_fast.models.features import classifier_layer


@pytest.fixture(scope="module")
def bench():
    with bench_module("skd_transfer") as mod:
        yield mod


@pytest.mark.skipif(data.find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")
def test_quick_run_records_the_gap_and_resumes(bench, tmp_path):
    argv = ["--quick", "--datasets", "mnist", "--epochs", "1", "--threads", "1", "--state", str(tmp_path / "s"),
            "--out", str(tmp_path / "r")]
    assert bench.main(argv) == 0
    rec = json.loads((tmp_path / "r" / "skd_transfer_cpu_skd-narrow.json").read_text())
    (row,) = rec["rows"]
    assert row["dataset"] == "mnist" and row["iterations"] == 10 and row["test_images"] == 10000
    assert row["gap"] == pytest.approx(row["teacher_test_acc"] - row["student_test_acc"])
    assert 0.5 < row["teacher_test_acc"] <= 1.0
    md = (tmp_path / "r" / "skd_transfer_cpu_skd-narrow.md").read_text()
    assert "| mnist |" in md and "| CIFAR-100 | 76.08 % | 75.86 % | 0.22 |" in md
    # A rerun reads the teacher and the finished fit back: the same figures.
    assert bench.main(argv) == 0
    again = json.loads((tmp_path / "r" / "skd_transfer_cpu_skd-narrow.json").read_text())["rows"][0]
    assert {k: again[k] for k in ("teacher_test_acc", "student_test_acc", "fit_s")} == \
        {k: row[k] for k in ("teacher_test_acc", "student_test_acc", "fit_s")}  # the fit's time, not the rerun's
    assert row["fit_s"] > 0 and not again["fit_s_incomplete"]


def test_with_head_of_copies_the_teacher_classifier_only(bench):
    torch.manual_seed(0)
    teacher, student = LeNet5BN(10, in_channels=1), LeNet5BN(10, in_channels=1)
    s = bench.with_head_of(student, teacher)
    assert torch.equal(classifier_layer(s, "t").weight, classifier_layer(teacher, "t").weight)
    assert torch.equal(classifier_layer(s, "t").bias, classifier_layer(teacher, "t").bias)
    assert torch.equal(s.features[0].weight, student.features[0].weight)  # the body stays the student's
    assert not torch.equal(classifier_layer(student, "t").weight, classifier_layer(teacher, "t").weight)


@pytest.mark.parametrize("argv", [["--datasets", "cifar"], ["--iterations", "0"], ["--batch", "1"],
                                  ["--arch", "resnet"]])
def test_bad_arguments(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
