"""`exml-fast reproduce exml-mnist`: the Table 2 pipeline at the smoke budget, its records and resumption."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from exml_fast.cli import main
from exml_fast.data import find_data_root
from exml_fast.experiments.records import seconds_or_lower_bound
from exml_fast.experiments.table2 import PAPER_TABLE2, reproduce_exml_mnist, summarize
from exml_fast.training import evaluate, minibatch_bounds

needs_mnist = pytest.mark.skipif(find_data_root("mnist") is None or find_data_root("fashion-mnist") is None,
                                 reason="MNIST / Fashion-MNIST files not found")


def test_summary_rows_compare_with_the_paper():
    rows = summarize({("split_mnist", "mi-ed"): [0.40, 0.44, 0.45], ("split_mnist", "oracle"): [0.90],
                      ("joint_mnist", "aux-ed"): [0.80, 0.82]})
    by = {(r["scenario"], r["strategy"]): r for r in rows}
    mi = by[("split_mnist", "mi-ed")]
    assert mi["mean"] == pytest.approx(43.0) and mi["std"] == pytest.approx(2.6457513, rel=1e-6)
    assert mi["within_2_std"]  # |43.0 - 43.23| <= 2 * 3.00
    assert not by[("split_mnist", "oracle")]["within_2_std"] and math.isnan(by[("split_mnist", "oracle")]["std"])
    assert not by[("joint_mnist", "aux-ed")]["within_2_std"]  # 81 vs 89.35 ± 0.18
    # Table order: split rows first, in the paper's order.
    assert [(r["scenario"], r["strategy"]) for r in rows] == [("split_mnist", "oracle"), ("split_mnist", "mi-ed"),
                                                              ("joint_mnist", "aux-ed")]
    assert set(PAPER_TABLE2) >= set(by)


def test_reproduce_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        reproduce_exml_mnist(budget="huge", out=tmp_path, results=None)
    with pytest.raises(ValueError, match="scenarios"):
        reproduce_exml_mnist(scenarios=("split_cifar10",), out=tmp_path, results=None)
    with pytest.raises(ValueError, match="strategies"):
        reproduce_exml_mnist(strategies=("replay",), out=tmp_path, results=None)
    with pytest.raises(ValueError, match="runs"):
        reproduce_exml_mnist(runs=0, out=tmp_path, results=None)


@needs_mnist
def test_smoke_reproduction_writes_records_and_resumes(tmp_path, capsys):
    args = ["reproduce", "exml-mnist", "--runs", "2", "--budget", "smoke", "--scenarios", "split_mnist",
            "--strategies", "oracle,mi-ed,param-avg", "--out", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--device", "cpu"]
    assert main(args) == 0
    first = json.loads((tmp_path / "res" / "exml_mnist_smoke.json").read_text())
    assert first["meta"]["budget"] == "smoke" and first["meta"]["runs"] == 2
    assert first["meta"]["machine"]["torch"] and first["meta"]["wall_s"] > 0 and first["meta"]["runs_s"] > 0
    assert [(r["strategy"], r["runs"]) for r in first["rows"]] == [("oracle", 2), ("param-avg", 2), ("mi-ed", 2)]
    md = (tmp_path / "res" / "exml_mnist_smoke.md").read_text()
    assert "| split_mnist | mi-ed | 2 |" in md and "not the paper's" in md
    ckpt = tmp_path / "runs" / "smoke" / "split_mnist" / "mi-ed_s1" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # everything on disk: read back, nothing retrained
    assert ckpt.stat().st_mtime_ns == stamp
    second = json.loads((tmp_path / "res" / "exml_mnist_smoke.json").read_text())
    assert [r["accs"] for r in second["rows"]] == [r["accs"] for r in first["rows"]]


@needs_mnist
@pytest.mark.parametrize("experiment", ["zskd-mnist", "zskd-fmnist"])
def test_zskd_smoke_writes_the_record_beside_the_paper(tmp_path, experiment):
    args = ["reproduce", experiment, "--budget", "smoke", "--out", str(tmp_path / "w"), "--results",
            str(tmp_path / "res"), "--device", "cpu"]
    assert main(args) == 0
    stem = experiment.replace("-", "_") + "_smoke"
    rec = json.loads((tmp_path / "res" / f"{stem}.json").read_text())
    assert rec["n_dis"] == 64 and rec["paper"]["n"] in (24000, 48000)
    assert 0 <= rec["student_acc"] <= 100 and 0 <= rec["teacher_acc"] <= 100
    # the paper's networks by default, scored on the held-out validation images and the test set
    assert rec["networks"] == "paper"
    assert (rec["networks_detail"]["teacher_params"], rec["networks_detail"]["student_params"]) == (61706, 35820)
    assert set(rec["student"]) == set(rec["teacher"]) == set(rec["control"]["student"]) == {"validation", "test"}
    assert rec["student"]["test"] == rec["student_acc"] and rec["control"]["n"] == 64
    md = (tmp_path / "res" / f"{stem}.md").read_text()
    assert f"{rec['student_acc']:.2f}" in md and "not the paper's" in md
    assert "control: the same student and KD on 64 real training images" in md and "35820 parameters" in md
    # the DIs' targets at the networks' synthesis τ for the dataset (not the paper's 20), said in the settings and
    # the notes, and kept apart from DIs made at another τ
    tau = {"zskd-mnist": 5, "zskd-fmnist": 3}[experiment]
    assert rec["synth_tau"] == tau
    # MNIST's DI targets from the β mixture (10, 1) its validation split chose, Fashion-MNIST's the paper's
    beta = {"zskd-mnist": "10, 1", "zskd-fmnist": "1.0, 0.1"}[experiment]
    assert f"- DIs: β ({beta}), τ {tau}," in md and f"drawn at τ {tau}, not the paper's 20" in md
    assert rec["synth_beta"] == ([10.0, 1.0] if experiment == "zskd-mnist" else [1.0, 0.1])
    assert ("the DIs' Dirichlet targets are drawn with β (10, 1), not the paper's (1.0, 0.1)" in md) == (
        experiment == "zskd-mnist")
    # MNIST's DIs carry the l2 total-variation prior its validation split chose, Fashion-MNIST's none: said in the
    # settings and the notes, and kept in a folder of their own
    tv = {"zskd-mnist": 1e-4, "zskd-fmnist": 0.0}[experiment]
    assert rec["synth_tv_l2"] == tv
    assert ("2 px jitter, l2 total-variation prior of weight 1e-4," in md) == bool(tv)
    assert ("the DIs carry an l2 total-variation prior of weight 1e-4, which the paper's do not" in md) == bool(tv)
    folder = f"dis_seed0_n64_tau{tau}" + ("_tv1e-4_beta10_1" if tv else "")
    assert (tmp_path / "w" / "smoke" / "paper" / folder / "manifest.json").exists()
    # MNIST's KD also rotates and zooms its inputs (the paper's augmentation, chosen on its validation split),
    # Fashion-MNIST's translates only
    affine = experiment == "zskd-mnist"
    assert (rec["networks_detail"]["kd_rotate"], rec["networks_detail"]["kd_scale"]) == (
        (15.0, 0.1) if affine else (0.0, 0.0))
    assert ("rotation by up to 15 degrees and zoom by 0.9-1.1" in md) == affine
    assert ("(we translate, rotate and zoom, and do not flip digits)" in md) == affine
    assert (next((tmp_path / "w" / "smoke" / "paper").glob("control_*.json")).name.endswith(
        "_rot15_zoom0.1.json")) == affine
    # The teacher, the DIs and the control are on disk: a rerun reads them back and gives the same student.
    control = next((tmp_path / "w" / "smoke" / "paper").glob("control_*.json"))
    stamp = control.stat().st_mtime_ns
    assert main(args) == 0
    assert control.stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "res" / f"{stem}.json").read_text())
    assert again["control"] == rec["control"]
    assert again["teacher_acc"] == rec["teacher_acc"] and again["student_acc"] == rec["student_acc"]
    # ... and the synthesis time of the DIs read back is the one of the invocation that made them.
    assert again["synthesis_s"] == rec["synthesis_s"] > 0 and not again["synthesis_s_incomplete"]


@needs_mnist
def test_zskd_networks_kd_epochs_mixup_and_decay_reach_the_kd_its_control_and_the_record(tmp_path, monkeypatch):
    from exml_fast.experiments import zskd

    calls = []
    real_distill = zskd.distill

    def spy(*args, **kwargs):
        if kwargs.get("teacher") is not None:  # a KD (the teacher trains on labels by the same function)
            calls.append((kwargs["epochs"], kwargs["mixup"], kwargs["weight_decay"], kwargs["rotate"], kwargs["scale"]))
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(zskd, "distill", spy)
    # at every budget but smoke the networks' KD epochs win over the budget's: run "smoke" as if it were not
    smoke = {**zskd.ZSKD_BUDGETS["smoke"], "kd_epochs": 1}
    monkeypatch.setitem(zskd.ZSKD_BUDGETS, "smokeplus", smoke)
    monkeypatch.setitem(zskd.ZSKD_NETWORKS, "paper", {**zskd.ZSKD_NETWORKS["paper"], "kd_mixup": 0.5, "kd_epochs": 2,
                                                       "synth_iterations": 2, "teacher_epochs": 1,
                                                       "kd_weight_decay": {"mnist": 1e-4, "fashion-mnist": 0.0}})
    rec = zskd.reproduce_zskd("zskd-mnist", budget="smokeplus", out=tmp_path / "w", results=tmp_path / "res",
                              device="cpu", log=lambda line: None)
    # the DIs' student and the real-data control: MNIST's decay, rotation and zoom
    assert calls == [(2, 0.5, 1e-4, 15.0, 0.1), (2, 0.5, 1e-4, 15.0, 0.1)]
    assert rec["networks_detail"]["kd_epochs"] == 2 and rec["networks_detail"]["kd_mixup"] == 0.5
    assert rec["networks_detail"]["kd_weight_decay"] == 1e-4
    assert (rec["networks_detail"]["kd_rotate"], rec["networks_detail"]["kd_scale"]) == (15.0, 0.1)
    assert (tmp_path / "w" / "smokeplus" / "paper" /
            "control_seed0_n64_ep2_warmup500_mixup0.5_rot15_zoom0.1_wd1e-4.json").exists()
    md = (tmp_path / "res" / "zskd_mnist_smokeplus.md").read_text()
    assert ("weight decay 1e-4, batch 64, 2 epochs (the networks' setting, not the budget's), per-sample pad-crop 4"
            in md)
    assert "by a weight from Beta(0.5, 0.5) (mixup)" in md and "mix pairs of augmented DIs (mixup)" in md
    assert "±1 px roll, rotation by up to 15 degrees and zoom by 0.9-1.1, each augmented input" in md
    assert "(we translate, rotate and zoom, and do not flip digits, and mix pairs" in md
    # a record made before the networks set them reads as the budget's epochs without mixup
    old = {**{k: v for k, v in rec.items() if k != "synth_beta"},
           "networks_detail": {k: v for k, v in rec["networks_detail"].items()
                               if k not in ("kd_epochs", "kd_mixup", "kd_weight_decay", "kd_rotate", "kd_scale")}}
    text = zskd._markdown(old, "")
    assert "- DIs: β (10, 1), τ 5," in md and "- DIs: β (1.0, 0.1), τ 5," in text  # before β was kept: the paper's
    assert "drawn with β" not in text
    # another β says so without the evidence that chose (10, 1)
    assert "drawn with β (3, 1), not the paper's (1.0, 0.1); its public" in zskd._markdown(
        {**rec, "synth_beta": [3.0, 1.0]}, "")
    assert "weight decay 5e-4, batch 64, 1 epochs, per-sample pad-crop 4" in text and "(mixup)" not in text
    assert "±1 px roll; the final model" in text and "(we translate only: rotation and zoom did not help" in text
    assert [zskd._decay(v) for v in (5e-4, 1e-4, 2.5e-4, 0.0)] == ["5e-4", "1e-4", "2.5e-4", "0"]


@needs_mnist
def test_zskd_kd_seeds_each_train_a_student_kept_apart_and_summarised(tmp_path, monkeypatch, capsys):
    from exml_fast.experiments import zskd

    seeds = []
    real_distill = zskd.distill

    def spy(student, *args, **kwargs):
        if kwargs.get("teacher") is not None:  # a KD: the student's first weight tells its initialisation
            seeds.append((kwargs["generator"], next(student.parameters()).detach().flatten()[:4].clone()))
        return real_distill(student, *args, **kwargs)

    monkeypatch.setattr(zskd, "distill", spy)
    kwargs = dict(budget="smoke", out=tmp_path / "w", results=tmp_path / "res", device="cpu", log=lambda line: None)
    rec = zskd.reproduce_zskd("zskd-mnist", kd_seeds=3, **kwargs)
    # three DI students and the control (KD seed 0's initialisation and batches)
    assert [g for g, _ in seeds] == [0, 1, 2, 0]
    assert torch.equal(seeds[0][1], seeds[3][1]) and not torch.equal(seeds[0][1], seeds[1][1])
    assert [r["kd_seed"] for r in rec["kd_seeds"]] == [0, 1, 2]
    assert rec["student"] == rec["kd_seeds"][0]["student"] and rec["student_acc"] == rec["student"]["test"]
    for split in ("validation", "test"):
        values = torch.tensor([r["student"][split] for r in rec["kd_seeds"]], dtype=torch.float64)
        assert rec["student_mean"][split] == pytest.approx(values.mean().item())
        assert rec["student_std"][split] == pytest.approx(values.std().item())
    assert rec["kd_s"] == pytest.approx(sum(r["kd_s"] for r in rec["kd_seeds"]))
    md = (tmp_path / "res" / "zskd_mnist_smoke.md").read_text()
    assert "| student on 64 DIs only, KD seed 0 |" in md
    mean, std = rec["student_mean"]["test"], rec["student_std"]["test"]
    assert "| student on 64 DIs only, mean ± std of KD seeds 0-2 |" in md and f"**{mean:.2f}** ± {std:.2f}" in md
    assert "KD seed k initialises the student from seed 0 + 1 + k" in md and "(3 KD seeds)" in md
    # each KD seed is kept on disk: a rerun with one more trains only that one
    folder = tmp_path / "w" / "smoke" / "paper"
    assert len(list(folder.glob("student_seed0_kdseed*_n64_tau5_tv1e-4_beta10_1_ep*.json"))) == 3
    seeds.clear()
    again = zskd.reproduce_zskd("zskd-mnist", kd_seeds=4, **kwargs)
    assert [g for g, _ in seeds] == [3]
    assert again["kd_seeds"][:3] == rec["kd_seeds"] and len(again["kd_seeds"]) == 4
    # a kept student belongs to the teacher it was distilled from: one of another teacher, or a control that
    # names none (kept before runs named theirs), is trained again, and the log says why
    (kept,) = folder.glob("student_seed0_kdseed1_n64_*.json")
    (control,) = folder.glob("control_seed0_n64_*.json")
    run = json.loads(kept.read_text())
    assert run["teacher"] == again["kd_seeds"][0]["teacher"] and len(run["teacher"]) == 64
    kept.write_text(json.dumps({**run, "teacher": "0" * 64}))
    control.write_text(json.dumps({k: v for k, v in json.loads(control.read_text()).items() if k != "teacher"}))
    seeds.clear()
    lines = []
    redone = zskd.reproduce_zskd("zskd-mnist", kd_seeds=4, **{**kwargs, "log": lines.append})
    assert [g for g, _ in seeds] == [1, 0]
    assert redone["kd_seeds"][1]["teacher"] == run["teacher"] and redone["control"]["teacher"] == run["teacher"]
    assert any("KD seed 1 at" in line and "distilled from teacher 000000000000, not this one" in line
               for line in lines)
    assert any("real-data control at" in line and "a teacher it does not name" in line for line in lines)
    # one KD seed (the default): the record as before, without a mean
    one = zskd.reproduce_zskd("zskd-mnist", **kwargs)
    assert len(one["kd_seeds"]) == 1 and "student_mean" not in one and one["student"] == rec["student"]
    assert "mean ± std" not in (tmp_path / "res" / "zskd_mnist_smoke.md").read_text()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="kd_seeds must be an int >= 1"):
            zskd.reproduce_zskd("zskd-mnist", kd_seeds=bad, **kwargs)
    assert main(["reproduce", "cil-mnist", "--kd-seeds", "2"]) == 2
    assert "--kd-seeds is for zskd-mnist and zskd-fmnist" in capsys.readouterr().err
    assert main(["reproduce", "zskd-mnist", "--kd-seeds", "0"]) == 2
    assert "--kd-seeds: expected a positive integer" in capsys.readouterr().err


@needs_mnist
def test_zskd_synth_tv_l2_overrides_the_networks_prior_into_a_record_of_its_own(tmp_path, capsys):
    from exml_fast.experiments import zskd

    kwargs = dict(budget="smoke", out=tmp_path / "w", results=tmp_path / "res", device="cpu", log=lambda line: None)
    rec = zskd.reproduce_zskd("zskd-mnist", synth_tv_l2=0.0, **kwargs)  # the paper's prior-free DIs
    assert rec["synth_tv_l2"] == 0.0 and (tmp_path / "res" / "zskd_mnist_smoke_tv0.json").exists()
    assert not (tmp_path / "res" / "zskd_mnist_smoke.json").exists()
    md = (tmp_path / "res" / "zskd_mnist_smoke_tv0.md").read_text()
    assert "total-variation" not in md
    folder = tmp_path / "w" / "smoke" / "paper"
    assert (folder / "dis_seed0_n64_tau5_beta10_1" / "manifest.json").exists()
    assert [p.name for p in folder.glob("student_*.json")] == [
        "student_seed0_kdseed0_n64_tau5_beta10_1_ep2_warmup500_rot15_zoom0.1.json"]
    # the networks' own weight, named or not, is the record of the networks
    assert zskd.reproduce_zskd("zskd-mnist", synth_tv_l2=1e-4, **kwargs)["synth_tv_l2"] == 1e-4
    assert (tmp_path / "res" / "zskd_mnist_smoke.json").exists()
    assert not (tmp_path / "res" / "zskd_mnist_smoke_tv1e-4.json").exists()
    for bad in (-1e-4, float("nan"), float("inf"), True, "0"):
        with pytest.raises(ValueError, match="synth_tv_l2 must be a finite number >= 0 or None"):
            zskd.reproduce_zskd("zskd-mnist", synth_tv_l2=bad, **kwargs)
    assert main(["reproduce", "dfkd-mnist", "--synth-tv-l2", "0"]) == 2
    assert "--synth-tv-l2 is for zskd-mnist and zskd-fmnist" in capsys.readouterr().err


def test_zskd_record_names_the_synthesis_settings_the_networks_override():
    from exml_fast.experiments.budgets import ZSKD_BUDGETS
    from exml_fast.experiments.zskd import ZSKD_NETWORKS, _networks_not_budget

    demo = ZSKD_BUDGETS["demo"]
    nets = ZSKD_NETWORKS["paper"]
    # the paper networks' DIs take their own lr and the 1500 steps their τ was chosen at, whatever the budget
    record = {"synth_lr": nets["synth_lr"], "synth_iterations": nets["synth_iterations"]}
    assert _networks_not_budget(record, demo) == " (the networks' lr and steps, not the budget's)"
    assert _networks_not_budget({"synth_lr": demo["synth_lr"], "synth_iterations": 1500}, demo) == (
        " (the networks' steps, not the budget's)")
    assert _networks_not_budget({"synth_lr": demo["synth_lr"]}, demo) == ""  # a record made before the option


def test_zskd_record_tau_reads_records_of_every_age():
    from exml_fast.experiments.zskd import _record_tau

    fmnist = {"paper": {"dataset": "fashion-mnist"}}
    assert _record_tau({**fmnist, "synth_tau": 3.0, "networks_detail": {}}) == 3.0
    # made before the record kept its τ: the networks' (a number, or one per dataset), else the paper's 20
    assert _record_tau({**fmnist, "networks_detail": {"synth_tau": 5.0}}) == 5.0
    assert _record_tau({**fmnist, "networks_detail": {"synth_tau": {"mnist": 5.0, "fashion-mnist": 3.0}}}) == 3.0
    assert _record_tau({**fmnist, "networks_detail": {}}) == 20.0


@needs_mnist
def test_zskd_exml_networks_keep_the_records_made_before(tmp_path):
    args = ["reproduce", "zskd-mnist", "--budget", "smoke", "--networks", "exml", "--out", str(tmp_path / "w"),
            "--results", str(tmp_path / "res"), "--device", "cpu"]
    assert main(args) == 0
    rec = json.loads((tmp_path / "res" / "zskd_mnist_smoke_exml_nets.json").read_text())
    assert rec["networks"] == "exml" and set(rec["student"]) == {"test"}
    assert (rec["networks_detail"]["teacher_params"], rec["networks_detail"]["student_params"]) == (61706, 15738)
    assert (tmp_path / "w" / "smoke" / "teacher_lenet5_seed0_ep1.pt").exists()  # the old layout, read back
    assert (tmp_path / "w" / "smoke" / "dis_seed0_n64").exists()  # DIs at τ 20, in their old folder


def test_zskd_networks_option_is_checked(tmp_path, capsys):
    from exml_fast.experiments.zskd import reproduce_zskd

    with pytest.raises(ValueError, match="networks"):
        reproduce_zskd("zskd-mnist", networks="vgg", out=tmp_path, results=None)
    assert main(["reproduce", "dfkd-mnist", "--networks", "paper", "--budget", "smoke"]) == 2
    assert "--networks is for zskd-mnist and zskd-fmnist" in capsys.readouterr().err


def test_zskd_refuses_unknown_budget(capsys):
    assert main(["reproduce", "zskd-mnist", "--budget", "demo-x"]) == 2


@needs_mnist
def test_dfkd_smoke_compares_generators_with_data_impressions_and_resumes(tmp_path, capsys):
    args = ["reproduce", "dfkd-mnist", "--budget", "smoke", "--out", str(tmp_path / "w"), "--results",
            str(tmp_path / "res"), "--device", "cpu"]
    assert main(args) == 0
    rec = json.loads((tmp_path / "res" / "dfkd_mnist_smoke.json").read_text())
    assert [r["method"] for r in rec["rows"]] == ["data-impressions", "dafl", "dfad", "skd"]
    assert rec["validation_size"] == 500 and rec["n"] == 64
    for r in rec["rows"]:
        assert r["synthesis_s"] > 0 and sum(r["class_counts"]) == 64
        assert all(0 <= r["student"][k] <= 100 for k in ("validation", "test"))
    by = {r["method"]: r for r in rec["rows"]}
    assert "fit_student" in by["dfad"] and "fit_student" not in by["dafl"]
    # the "ours" recipe fits every generator with the settings its records were made with, not the presets' public
    # code's (--recipe public)
    for m in ("dafl", "dfad", "skd"):
        job = torch.load(tmp_path / "w" / "smoke" / f"{m}_fit_seed0.pt", weights_only=False)["job"]
        assert (job["lr_generator"], job["generator_betas"], job["lr_student"], job["student_kd"]) == \
            (1e-3, [0.5, 0.999], 0.1, 0.0), m
    dafl_job = torch.load(tmp_path / "w" / "smoke" / "dafl_fit_seed0.pt", weights_only=False)["job"]
    assert dafl_job["weights"]["diversity"] == 5.0
    assert all(r["threads"] >= 1 for r in rec["rows"])
    for m in ("dafl", "dfad", "skd"):  # a generator's synthesis time includes its whole fit
        assert 0 < by[m]["fit_s"] < by[m]["synthesis_s"] and not by[m].get("fit_s_incomplete")
        # one invocation did the whole fit, on the row's threads
        assert [(seg["steps"], seg["threads"]) for seg in by[m]["fit_segments"]] == \
            [(rec["budget_detail"]["fit_iterations"], by[m]["threads"])]
    assert "fit_s" not in by["data-impressions"] and not any(r.get("synthesis_s_incomplete") for r in rec["rows"])
    # The selection is the generator preset with the best validation accuracy, never Data Impressions.
    best = max((r for r in rec["rows"] if r["method"] != "data-impressions"), key=lambda r: r["student"]["validation"])
    assert rec["selected"] == best["method"]
    md = (tmp_path / "res" / "dfkd_mnist_smoke.md").read_text()
    assert f"| {best['method']} **(selected)** |" in md and "not the paper budget" in md
    # The real-data control: the same student and KD on as many real training images, a row of the table.
    control = rec["control"]
    assert control["n"] == 64 and all(0 <= control["student"][k] <= 100 for k in ("validation", "test"))
    assert f"| control: 64 **real** training images | | | | | | {control['student']['validation']:.2f} |" in md
    # Every method's result is on disk: a rerun reads them back unchanged.
    assert main(args) == 0
    again = json.loads((tmp_path / "res" / "dfkd_mnist_smoke.json").read_text())
    assert again["rows"] == rec["rows"] and again["teacher_acc"] == rec["teacher_acc"]
    assert again["control"] == control
    # each row names its teacher: one kept for another teacher is made again, not reported beside this one
    assert len({r["teacher"] for r in rec["rows"]}) == 1 and len(rec["rows"][0]["teacher"]) == 64
    done = tmp_path / "w" / "smoke" / "data-impressions_seed0_n64.json"
    stale = json.loads(done.read_text())
    stale["teacher"], stale["student"]["test"] = "f" * 64, -1.0
    done.write_text(json.dumps(stale))
    assert main(args) == 0
    assert "dfkd-mnist: data-impressions at " in (out := capsys.readouterr().out)
    assert "was distilled from teacher ffffffffffff, not this one" in out
    again = json.loads((tmp_path / "res" / "dfkd_mnist_smoke.json").read_text())
    assert again["rows"][0]["teacher"] == rec["rows"][0]["teacher"] and again["rows"][0]["student"]["test"] >= 0
    # A subset of the methods (rows run in separate processes) has a record of its own, named after them.
    assert main([*args, "--methods", "skd,data-impressions"]) == 0
    part = json.loads((tmp_path / "res" / "dfkd_mnist_smoke_data-impressions_skd.json").read_text())
    assert [r["method"] for r in part["rows"]] == ["data-impressions", "skd"] and part["selected"] == "skd"
    assert json.loads((tmp_path / "res" / "dfkd_mnist_smoke.json").read_text()) == again


def test_dfkd_threads_column_lists_a_fit_resumed_on_other_threads():
    from exml_fast.experiments.dfkd import _threads_cell
    assert _threads_cell({"threads": 2}) == "2"  # Data Impressions, or a row from before fits kept segments
    assert _threads_cell({"threads": 2, "fit_segments": [{"steps": 40, "threads": 2}, {"steps": 0, "threads": 1}]}) \
        == "2"  # a segment without steps (a call that found the fit done) does not count
    mixed = {"threads": 2, "fit_segments": [{"steps": 1375, "threads": None}, {"steps": 25, "threads": 1},
                                            {"steps": 2600, "threads": 2}]}
    assert _threads_cell(mixed) == "fit: ? × 1375 steps, 1 × 25 steps, 2 × 2600 steps; rest: 2"


def test_dfkd_arguments_are_checked(capsys):
    assert main(["reproduce", "dfkd-mnist", "--methods", "dafl,gan"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["reproduce", "zskd-mnist", "--methods", "dafl"]) == 2
    assert main(["reproduce", "dfkd-mnist", "--budget", "huge"]) == 2
    from exml_fast.experiments.dfkd import reproduce_dfkd
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        reproduce_dfkd(methods=("gan",), results=None)
    with pytest.raises(ValueError, match="budget for dfkd-mnist"):
        reproduce_dfkd(budget="huge", results=None)
    with pytest.raises(ValueError, match="kd_samples must be one of fixed, fresh; got 'new'"):
        reproduce_dfkd(kd_samples="new", results=None)
    assert main(["reproduce", "zskd-mnist", "--kd-samples", "fresh"]) == 2
    assert "--kd-samples is for dfkd-mnist" in capsys.readouterr().err
    assert main(["reproduce", "dfkd-mnist", "--kd-samples", "new"]) == 2
    # the public recipe: DAFL and DFAD only, students inside the fit
    assert main(["reproduce", "dfkd-mnist", "--recipe", "public", "--methods", "skd"]) == 2
    assert "--methods: comma-separated names among dafl, dfad (--recipe public); got 'skd'" in capsys.readouterr().err
    assert main(["reproduce", "dfkd-mnist", "--recipe", "public", "--kd-samples", "fresh"]) == 2
    assert "--kd-samples is for --recipe ours" in capsys.readouterr().err
    assert main(["reproduce", "zskd-mnist", "--recipe", "public"]) == 2
    assert "--recipe is for dfkd-mnist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="recipe must be one of ours, public; got 'paper'"):
        reproduce_dfkd(recipe="paper", results=None)
    with pytest.raises(ValueError, match="recipe 'public' runs a non-empty subset of dafl, dfad"):
        reproduce_dfkd(recipe="public", methods=("data-impressions",), results=None)
    with pytest.raises(ValueError, match="kd_samples is for recipe 'ours'"):
        reproduce_dfkd(recipe="public", kd_samples="fresh", results=None)


@needs_mnist
def test_dfkd_public_recipe_trains_each_methods_own_student_and_resumes(tmp_path, capsys):
    args = ["reproduce", "dfkd-mnist", "--budget", "smoke", "--recipe", "public", "--out", str(tmp_path / "w"),
            "--results", str(tmp_path / "res"), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "res" / "dfkd_mnist_smoke_public.json").read_text())
    assert rec["recipe"] == "public" and [r["method"] for r in rec["rows"]] == ["dafl", "dfad"]
    for m in ("dafl", "dfad"):  # each scored step's accuracy in the log as the fit runs, as the public code prints
        assert f"dfkd-mnist: {m} (public recipe): step 1: student validation " in out
    assert rec["networks"] == {"teacher": "lenet5_dafl", "student": "lenet5_half_dafl",
                               "params": {"teacher": 61706, "student": 15738}}
    assert rec["control"] is None  # each row has its own
    by = {r["method"]: r for r in rec["rows"]}
    assert (by["dafl"]["generator_arch"], by["dfad"]["generator_arch"]) == ("dafl", "dfad")
    assert "kd" in by["dafl"]["fit_history_last"] and "imitate" in by["dfad"]["fit_history_last"]
    for r in rec["rows"]:
        assert (r["fit_iterations"], r["fit_batch_size"]) == (2, 32) and r["synthesis_s"] == r["fit_s"] > 0
        assert all(0 <= r[k][s] <= 100 for k in ("student",) for s in ("validation", "test"))
        assert r["control"]["n"] == 1500 and all(0 <= v <= 100 for v in r["control"]["student"].values())
    assert (by["dafl"]["control"]["steps"], by["dfad"]["control"]["steps"]) == (2, 10)  # DFAD: 5 student steps each
    # the student scored on validation every "epoch" (1 step at the smoke budget) and the best one kept, as the
    # public code keeps its best test epoch; the final student is one of those scored
    for r in rec["rows"]:
        b = r["student_best"]
        assert b["step"] in (1, 2) and (b["first"], b["every"]) == (1, 1)
        assert b["validation"] >= r["student"]["validation"] and 0 <= b["test"] <= 100
        if b["step"] == 2:
            assert (b["validation"], b["test"]) == (r["student"]["validation"], r["student"]["test"])
        folder = tmp_path / "w" / "smoke" / "public" / f"teacher-{r['method']}-code"
        tag = "_features7" if r["method"] == "dafl" else ""  # DAFL's files name the layer its features come from
        kept = torch.load(folder / f"{r['method']}_best_seed0_b32{tag}.pt", weights_only=True)
        assert (kept["step"], kept["first"], kept["every"]) == (b["step"], 1, 1)
        # the curve: each scored step's validation accuracy, the final step's the final student's
        assert [c[0] for c in b["curve"]] == [1, 2] and kept["curve"] == b["curve"]
        assert b["curve"][-1][1] == r["student"]["validation"]
    # each method with the teacher its own public code trains (DAFL: Adam; DFAD: SGD), kept in a folder of its own
    assert rec["teacher_acc"] is None
    for r in rec["rows"]:
        folder = tmp_path / "w" / "smoke" / "public" / f"teacher-{r['method']}-code"
        meta = torch.load(folder / "teacher_lenet5_dafl_seed0_ep1.pt", weights_only=False)["metadata"]
        assert (meta["optimizer"], meta["batch_size"], meta["pad_crop"]) == (
            {"dafl": "adam", "dfad": "sgd"}[r["method"]], 256, 0)
        assert r["teacher_acc"]["epochs"] == 1 and 0 <= r["teacher_acc"]["test"] <= 100
        assert len(r["teacher"]) == 64  # the teacher's fingerprint: a rerun with another teacher trains again
    # the methods are compared by their best-validation students, the ones the public code would report
    best = max(rec["rows"], key=lambda r: r["student_best"]["validation"])
    assert rec["selected"] == best["method"] and rec["selected_by"] == "best"
    md = (tmp_path / "res" / "dfkd_mnist_smoke_public.md").read_text()
    assert "The selection between the methods reads each method's best-validation student." in md
    from exml_fast.experiments.dfkd import _markdown_public  # a record made before: it selected the final ones
    old = {k: v for k, v in rec.items() if k != "selected_by"}
    assert "The selection between the methods reads the final students." in _markdown_public(old)
    assert f"| {best['method']} **(selected)** | 2 × 32 |" in md and "61706 parameters" in md
    assert "Adam lr 0.2" in md and "not the paper budget" in md
    assert "best-validation student: step | its validation (%) | its test (%)" in md
    assert "- dafl's teacher (DAFL's teacher-train.py): Adam lr 0.001, weight decay 0, batch 256, 1 epochs" in md
    assert "- dfad's teacher (DFAD's train_teacher.py in run_mnist.sh): SGD lr 0.01, momentum 0.9" in md
    assert "every 1 steps (dafl, from step 1), 1 steps (dfad, from step 1)" in md
    for r in rec["rows"]:
        c = r["student_best"]["curve"]
        assert f"- {r['method']}: 1: {c[0][1]:.2f}, 2: {c[1][1]:.2f}" in md
    # DAFL's activation term on lenet.py's 120 activations after conv5, as DAFL_train.py reads them
    assert (by["dafl"]["feature_layer"], by["dafl"]["feature_dim"]) == ("features.7", 120)
    assert "feature_layer" not in by["dfad"]
    assert "activation 0.1 (on the teacher's `features.7`: its 120 activations after conv5, as DAFL's code" in md
    assert "the 84 features before the last layer" not in md
    assert main(args) == 0  # read back
    assert json.loads((tmp_path / "res" / "dfkd_mnist_smoke_public.json").read_text())["rows"] == rec["rows"]
    # a row kept for another teacher is trained again, not reported beside this one
    done = tmp_path / "w" / "smoke" / "public" / "teacher-dfad-code" / "dfad_seed0_it2_b32.json"
    stale = json.loads(done.read_text())
    stale["teacher"] = "0" * 64
    done.write_text(json.dumps(stale))
    assert main(args) == 0
    assert "was distilled from teacher 000000000000, not this one" in capsys.readouterr().out
    assert json.loads(done.read_text())["teacher"] == by["dfad"]["teacher"]


def test_best_student_keeps_the_best_validation_and_drops_what_a_resumed_fit_cannot_vouch_for(tmp_path):
    from exml_fast.experiments.dfkd import _BestStudent, _public_student

    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 32, 32), torch.randint(0, 10, (40,))
    ck, path = tmp_path / "fit.pt", tmp_path / "best.pt"
    lines = []
    keeper = _BestStudent(path, ck, (x, y), "T", 5, log=lines.append)
    assert keeper.best is None and keeper.scored({"validation": (x, y)}) is None
    students = [_public_student(s, "cpu") for s in range(3)]
    scores = [100 * evaluate(s, x, y) for s in students]
    for step, s in zip((5, 10, 15), students):
        keeper(step, s)
    top = max(range(3), key=lambda i: (scores[i], -i))  # the first of equals is kept
    # every scored step is logged with the best so far, as the public code prints its epochs
    best_so_far = [max(range(i + 1), key=lambda j: (scores[j], -j)) for i in range(3)]
    assert lines == [f"step {step}: student validation {scores[i]:.2f} % (best {scores[b]:.2f} % at step "
                     f"{(5, 10, 15)[b]})" for i, (step, b) in enumerate(zip((5, 10, 15), best_so_far))]
    assert keeper.best["step"] == (5, 10, 15)[top] and keeper.best["first"] == 5
    got = keeper.scored({"validation": (x, y), "test": (x[:10], y[:10])})
    assert got["validation"] == scores[top] and got["step"] == keeper.best["step"] and got["every"] == 5
    assert got["test"] == 100 * evaluate(students[top], x[:10], y[:10])
    # every scored step's validation accuracy is kept, for the record's curve
    curve = [[step, scores[i]] for i, step in enumerate((5, 10, 15))]
    assert keeper.curve == curve and got["curve"] == curve
    # read back beside a fit checkpoint that has reached its step; not beside none, an earlier one, or another
    # teacher's or epoch's
    torch.save({"done": 15}, ck)
    back = _BestStudent(path, ck, (x, y), "T", 5)
    assert back.best["step"] == keeper.best["step"] and back.curve == curve and "curve" not in back.best
    assert _BestStudent(path, ck, (x, y), "other", 5).best is None
    assert _BestStudent(path, ck, (x, y), "other", 5).curve == []
    assert _BestStudent(path, ck, (x, y), "T", 7).best is None
    torch.save({"done": keeper.best["step"] - 1}, ck)
    back = _BestStudent(path, ck, (x, y), "T", 5)
    # the steps after the checkpoint's are scored again by the resumed fit: neither kept nor in the curve; the
    # best of the steps before is taken back in its place
    before = [i for i in range(3) if (5, 10, 15)[i] < keeper.best["step"]]
    assert back.curve == [c for c in curve if c[0] < keeper.best["step"]]
    if before:
        assert back.best["step"] == (5, 10, 15)[max(before, key=lambda j: (scores[j], -j))]
    else:
        assert back.best is None
    assert _BestStudent(path, tmp_path / "none.pt", (x, y), "T", 5).best is None
    # a file written before the curve was kept resumes without one, its best student kept
    torch.save(keeper.best, path)
    torch.save({"done": 15}, ck)
    back = _BestStudent(path, ck, (x, y), "T", 5)
    assert back.best["step"] == keeper.best["step"] and back.curve == []
    back(20, students[0])
    assert back.curve == [[20, scores[0]]]


def test_best_student_dropped_by_a_resume_gives_way_to_the_best_before_it(tmp_path, monkeypatch):
    """The newest best, scored after the fit's last checkpoint, is dropped on a resume; the best of the steps the
    checkpoint vouches for is taken back (not lost), with the first step scored and the curve up to there."""
    from exml_fast.experiments import dfkd
    from exml_fast.experiments.dfkd import _BestStudent, _public_student

    scores = iter([0.5, 0.7, 0.6, 0.9, 0.65, 0.8])
    monkeypatch.setattr(dfkd, "evaluate", lambda *a: next(scores))
    ck, path = tmp_path / "fit.pt", tmp_path / "best.pt"
    keeper = _BestStudent(path, ck, (None, None), "T", 5)
    students = [_public_student(s, "cpu") for s in range(4)]
    for step, s in zip((5, 10, 15, 20), students):
        keeper(step, s)
    assert keeper.best["step"] == 20 and keeper.previous["step"] == 10
    torch.save({"done": 15}, ck)  # killed after step 20 was scored, before its checkpoint
    back = _BestStudent(path, ck, (None, None), "T", 5)
    assert back.best["step"] == 10 and back.best["first"] == 5 and back.best["validation"] == 70
    assert back.curve == [[5, 50], [10, 70], [15, 60]]
    kept = back.best["state_dict"]
    assert all(torch.equal(kept[k], v) for k, v in students[1].state_dict().items())
    back(20, students[0])  # the resumed fit scores step 20 again (65 % here): the step-10 student stays best
    assert back.best["step"] == 10 and back.curve[-1] == [20, 65]
    back(25, students[2])  # a new best keeps the one it replaces beside it
    assert back.best["step"] == 25 and back.previous["step"] == 10
    # nothing the checkpoint vouches for: the first step scored is the resumed fit's
    torch.save({"done": 4}, ck)
    again = _BestStudent(path, ck, (None, None), "T", 5)
    assert again.best is None and again.curve == []
    monkeypatch.setattr(dfkd, "evaluate", lambda *a: 0.1)
    again(5, students[3])
    assert again.best["first"] == 5 and again.best["step"] == 5


@needs_mnist
def test_dfkd_fresh_samples_train_each_generators_student_on_new_draws(tmp_path):
    """--kd-samples fresh: a generator's student learns from a new delegator draw at every KD step, as many steps
    as the fixed draw's KD; the fit is shared with the fixed rows, the draws are counted as synthesis time, and
    the record and each row are kept apart from the fixed ones."""
    base = ["reproduce", "dfkd-mnist", "--budget", "smoke", "--out", str(tmp_path / "w"), "--results",
            str(tmp_path / "res"), "--device", "cpu", "--methods", "data-impressions,dafl"]
    assert main(base) == 0
    fixed = {r["method"]: r for r in json.loads((tmp_path / "res" /
                                                 "dfkd_mnist_smoke_data-impressions_dafl.json").read_text())["rows"]}
    assert main([*base, "--kd-samples", "fresh"]) == 0
    rec = json.loads((tmp_path / "res" / "dfkd_mnist_smoke_fresh_data-impressions_dafl.json").read_text())
    by = {r["method"]: r for r in rec["rows"]}
    assert rec["kd_samples"] == "fresh" and rec["selected"] == "dafl"
    assert by["data-impressions"] == fixed["data-impressions"]  # its fixed set either way: read back
    spec = rec["budget_detail"]
    steps = spec["kd_epochs"] * len(minibatch_bounds(spec["n"], 64))
    dafl = by["dafl"]
    assert dafl["kd_samples"] == "fresh" and dafl["inputs_drawn"] == steps * 64 and not dafl["balanced"]
    assert dafl["fit_s"] == fixed["dafl"]["fit_s"]  # the same fit, read back from its checkpoint
    assert dafl["synthesis_s"] == dafl["fit_s"] + dafl["draw_s"] and dafl["draw_s"] > 0
    assert sum(dafl["class_counts"]) == spec["n"] and "balance_error" not in dafl
    assert (tmp_path / "w" / "smoke" / "dafl_fresh_seed0_n64.json").exists()
    md = (tmp_path / "res" / "dfkd_mnist_smoke_fresh_data-impressions_dafl.md").read_text()
    assert "| dafl **(selected)** |" in md and "fresh every step" in md and f"({steps * 64} in all)" in md


@needs_mnist
def test_dfkd_times_resumed_work_as_the_calls_that_did_it(tmp_path):
    """Synthesis shards and a fit checkpoint left by an earlier call are read back with the time they took, so a
    resumed row reports the whole work's time; files that did not record it (written before the time was kept)
    make the row's time a lower bound, which the table prints with "≥"."""
    args = ["reproduce", "dfkd-mnist", "--budget", "smoke", "--out", str(tmp_path / "w"), "--results",
            str(tmp_path / "res"), "--device", "cpu", "--methods", "data-impressions,dafl"]
    record = tmp_path / "res" / "dfkd_mnist_smoke_data-impressions_dafl.json"
    work = tmp_path / "w" / "smoke"

    def rerun_from_the_files():
        for m in ("data-impressions", "dafl"):  # forget the finished rows, keep their shards and checkpoint
            (work / f"{m}_seed0_n64.json").unlink()
        assert main(args) == 0
        return {r["method"]: r for r in json.loads(record.read_text())["rows"]}

    assert main(args) == 0
    first = {r["method"]: r for r in json.loads(record.read_text())["rows"]}
    by = rerun_from_the_files()
    assert by["data-impressions"]["synthesis_s"] == first["data-impressions"]["synthesis_s"]
    assert by["dafl"]["fit_s"] == first["dafl"]["fit_s"] and by["dafl"]["draw_s"] == first["dafl"]["draw_s"]
    assert not any(r.get(k) for r in by.values() for k in ("synthesis_s_incomplete", "fit_s_incomplete"))
    md = (tmp_path / "res" / "dfkd_mnist_smoke_data-impressions_dafl.md").read_text().splitlines()
    assert not [line for line in md if line.startswith(("| data-impressions", "| dafl")) and "≥" in line]

    for f in [*work.glob("*/shard_*.pt"), work / "dafl_fit_seed0.pt"]:  # as written before the time was kept
        legacy = torch.load(f, weights_only=False)
        del legacy["seconds"]
        torch.save(legacy, f)
    by = rerun_from_the_files()
    assert by["data-impressions"]["synthesis_s_incomplete"] and by["dafl"]["synthesis_s_incomplete"]
    assert by["dafl"]["fit_s_incomplete"]
    md = (tmp_path / "res" / "dfkd_mnist_smoke_data-impressions_dafl.md").read_text()
    assert f"| data-impressions | ≥ {by['data-impressions']['synthesis_s']:.0f} |" in md
    assert f"| ≥ {by['dafl']['fit_s']:.0f} |" in md

    # The smoke delegator never makes every class: its failed balanced draw is kept, for this delegator only.
    failure_file = work / "dafl_balance_failure_seed0_n64.json"
    failure = json.loads(failure_file.read_text())
    assert not by["dafl"]["balanced"] and by["dafl"]["balance_error"] == failure["error"]
    failure_file.write_text(json.dumps({**failure, "of": {**failure["of"], "delegator": "another"}}))
    rerun_from_the_files()  # a stale failure is not trusted: the balanced draw is tried again, and fails again
    assert json.loads(failure_file.read_text())["of"] == failure["of"]


def test_seconds_or_lower_bound():
    """A resumed job's recorded time is taken as it is; without one, this call's time stands in, flagged."""
    assert seconds_or_lower_bound(12.5, time.perf_counter()) == (12.5, False)
    t0 = time.perf_counter() - 3.0
    seconds, lower_bound = seconds_or_lower_bound(None, t0)
    assert lower_bound and 3.0 <= seconds < 60.0


def test_zskd_teacher_takes_another_codes_optimiser_with_or_without_pad_crop(tmp_path):
    from exml_fast.experiments.zskd import zskd_teacher
    from exml_fast.models import build_model
    from exml_fast.training import distill

    x, y = torch.randn(16, 1, 32, 32), torch.arange(16) % 10
    kw = dict(arch="lenet5_dafl", seed=0, epochs=1, dataset="mnist", mean=0.1307, std=0.3081, device="cpu",
              log=lambda line: None)

    def by_hand(**options):  # the pad-crop teacher's distill call, as the recipe makes it
        torch.manual_seed(0)
        model = build_model("lenet5_dafl", num_classes=10, in_channels=1)
        distill(model, x, labels=y, epochs=1, lr=0.01, schedule="constant", augment=True, pad_crop=2, max_shift=0,
                flip=False, fill=-0.1307 / 0.3081, generator=0, **options)
        return model.state_dict()

    # with pad-crop: the defaults are the recipe the records were made with (SGD, batch 64, weight decay 5e-4),
    # and another optimiser, batch and weight decay reach the training
    ours = zskd_teacher(tmp_path / "pc.pt", x, y, pad_crop=2, **kw).state_dict()
    want = by_hand(batch_size=64, optimizer="sgd", weight_decay=5e-4)
    assert all(torch.equal(ours[k], want[k]) for k in want)
    adam = zskd_teacher(tmp_path / "pc_adam.pt", x, y, pad_crop=2, optimizer="adam", lr=0.01, batch_size=8,
                        weight_decay=0.0, **kw).state_dict()
    want = by_hand(batch_size=8, optimizer="adam", weight_decay=0.0)
    assert all(torch.equal(adam[k], want[k]) for k in want) and not torch.equal(adam["features.0.weight"],
                                                                                ours["features.0.weight"])
    meta = torch.load(tmp_path / "pc_adam.pt", weights_only=False)["metadata"]
    assert (meta["optimizer"], meta["batch_size"], meta["weight_decay"], meta["pad_crop"]) == ("adam", 8, 0.0, 2)
    teacher = zskd_teacher(tmp_path / "t.pt", x, y, optimizer="adam", lr=1e-3, batch_size=8, weight_decay=0.0, **kw)
    meta = torch.load(tmp_path / "t.pt", weights_only=False)["metadata"]
    assert (meta["optimizer"], meta["batch_size"], meta["weight_decay"], meta["pad_crop"]) == ("adam", 8, 0.0, 0)
    assert not teacher.training
