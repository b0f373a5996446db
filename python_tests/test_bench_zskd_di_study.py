"""benches/zskd_di_study.py: a quick run of two variants writes its record and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from _util import bench_module

from exml_fast.data import find_data_root
from exml_fast.models import LeNet5HalfZSKD, LeNet5ZSKD

pytestmark = pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found")


@pytest.fixture
def study():
    """benches/zskd_di_study.py, imported afresh for each test."""
    with bench_module("zskd_di_study") as mod:
        yield mod


def test_study_writes_the_variants_and_skips_them_on_a_rerun(study, tmp_path):
    args = ["--variants", "real,dataset_lr0.01", "--n", "16", "--kd-epochs", "1", "--teacher-epochs", "1",
            "--max-train", "6000", "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    assert study.main(args) == 0
    # another number of DIs than the default 2400 is another study: its own record, the default one's untouched
    assert not (tmp_path / "zskd_di_study_cpu.json").exists()
    rec = json.loads((tmp_path / "zskd_di_study_cpu_n16.json").read_text())
    assert [r["variant"] for r in rec["rows"]] == ["real", "dataset_lr0.01"]
    assert rec["train_images"] == 1000 and rec["n"] == 16
    di = rec["rows"][1]
    assert di["settings"]["space"] == "dataset" and 0 <= di["saturated"] <= 1 and di["target_kl"] >= 0
    assert all(0 <= r[k] <= 100 for r in rec["rows"] for k in ("validation", "test", "fit"))
    # four quarters of the validation images: their mean is the validation error
    for r in rec["rows"]:
        for key in ("errors_by_reach", "errors_by_real_reach") if r is di else ("errors_by_reach",):
            assert len(r[key]) == 4
            assert sum(r[key]) / 4 == pytest.approx(100 - r["validation"], abs=1e-6)
    assert "errors_by_real_reach" not in rec["rows"][0]  # a real row's inputs are real images
    md = (tmp_path / "zskd_di_study_cpu_n16.md").read_text()
    assert "| dataset_lr0.01 |" in md and "averaged over its KD seeds (`dataset_lr0.01` " in md
    # a recipe's rows of other KD seeds are averaged: the choice is the recipe's mean, not its luckiest seed
    seeded = {**di, "variant": "dataset_lr0.01_kdseed1", "settings": {**di["settings"], "kd_seed": 1},
              "validation": di["validation"] + 10.0, "test": di["test"] + 10.0}
    other = {**di, "variant": "dataset_lr0.0025", "settings": {**di["settings"], "lr": 0.0025},
             "validation": di["validation"] + 4.0, "test": di["test"]}
    md2 = study.markdown({**rec, "rows": [*rec["rows"], seeded, other]})
    assert (f"(`dataset_lr0.01` {di['validation']:.2f}, `dataset_lr0.01_kdseed1` {di['validation'] + 10:.2f}): "
            f"{di['validation'] + 5:.2f} %") in md2
    # the KD's mixup and epoch factor are part of a recipe: a row with them is not averaged with one without
    mixed = {**di, "variant": "dataset_lr0.01_mixup1_2xep", "validation": di["validation"] + 20.0,
             "settings": {**di["settings"], "kd_mixup": 1.0, "kd_epochs_factor": 2}}
    assert di["settings"]["kd_mixup"] == 0.0 and di["settings"]["kd_epochs_factor"] == 1
    md3 = study.markdown({**rec, "rows": [*rec["rows"], seeded, mixed]})
    assert f"(`dataset_lr0.01_mixup1_2xep` {di['validation'] + 20:.2f}): {di['validation'] + 20:.2f} %" in md3
    assert study.main(args) == 0  # both done: read back, nothing rerun
    assert json.loads((tmp_path / "zskd_di_study_cpu_n16.json").read_text())["rows"] == rec["rows"]
    # --geometry: a row without the DI geometry (one from before it) gains it from its DIs on disk, the same
    # figures as a run measures; the real row and the header are left alone, and nothing is trained
    assert di["gap"] > 0 and 0 <= di["balance"] <= 1
    old = {**rec, "rows": [rec["rows"][0], {k: v for k, v in di.items() if k not in ("spread", "gap", "balance")}]}
    (tmp_path / "zskd_di_study_cpu_n16.json").write_text(json.dumps(old))
    assert "| dataset_lr0.01 |" in study.markdown(old)  # blank geometry cells for such rows
    assert study.main([*args, "--geometry"]) == 0
    assert json.loads((tmp_path / "zskd_di_study_cpu_n16.json").read_text()) == rec
    with pytest.raises(SystemExit):
        study.main(["--variants", "nope"])


@pytest.mark.skipif(find_data_root("fashion-mnist") is None, reason="Fashion-MNIST files not found")
def test_study_of_another_dataset_keeps_its_own_record(study, tmp_path, monkeypatch):
    args = ["--dataset", "fashion-mnist", "--variants", "dataset_lr0.01_1500it_tau3_warmup", "--n", "16",
            "--kd-epochs", "1", "--teacher-epochs", "1", "--max-train", "6000", "--threads", "1",
            "--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    monkeypatch.setitem(study.VARIANTS, "dataset_lr0.01_1500it_tau3_warmup",
                        (study.VARIANTS["dataset_lr0.01_1500it_tau3_warmup"][0],
                         {**study.VARIANTS["dataset_lr0.01_1500it_tau3_warmup"][1], "iters": 2}))  # seconds
    assert study.main(args) == 0
    assert not (tmp_path / "zskd_di_study_cpu_n16.json").exists()  # MNIST's record is left alone
    rec = json.loads((tmp_path / "zskd_di_study_fmnist_cpu_n16.json").read_text())
    assert rec["dataset"] == "fashion-mnist" and rec["rows"][0]["settings"]["tau"] == 3.0
    assert "Data Impressions on the papers' networks, Fashion-MNIST" in (
        tmp_path / "zskd_di_study_fmnist_cpu_n16.md").read_text()


def test_di_side_variants_reach_the_synthesis_and_a_named_record(study, tmp_path, monkeypatch):
    """The τ 5 DI-side variants (jitter, synthesis lr schedule) reach DataImpressions and key DIs of their own;
    --record names the record (a study on another machine's teacher is not mixed into the default one)."""
    seen = []

    class Recorded(study.DataImpressions):
        def __init__(self, *a, **kw):
            seen.append({k: kw[k] for k in ("jitter", "schedule", "temperature")})
            super().__init__(*a, **kw)

    monkeypatch.setattr(study, "DataImpressions", Recorded)
    names = ["dataset_lr0.01_1500it_tau5_warmup", "dataset_lr0.01_1500it_tau5_jitter4_warmup",
             "dataset_lr0.01_1500it_tau5_cosine_warmup"]
    for name in names:  # seconds: two synthesis steps each
        monkeypatch.setitem(study.VARIANTS, name, (study.VARIANTS[name][0], {**study.VARIANTS[name][1], "iters": 2}))
    assert study.VARIANTS["dataset_lr0.01_3000it_tau5_warmup"][1]["iters"] == 3000
    args = ["--variants", ",".join(names), "--n", "16", "--kd-epochs", "1", "--teacher-epochs", "1",
            "--max-train", "6000", "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path),
            "--record", "di_side"]
    assert study.main(args) == 0
    assert seen == [{"jitter": 2, "schedule": "constant", "temperature": 5.0},
                    {"jitter": 4, "schedule": "constant", "temperature": 5.0},
                    {"jitter": 2, "schedule": "cosine", "temperature": 5.0}]
    assert not (tmp_path / "zskd_di_study_cpu_n16.json").exists()
    rec = json.loads((tmp_path / "di_side.json").read_text())
    assert [r["variant"] for r in rec["rows"]] == names
    assert len(list((tmp_path / "w").glob("dis_*"))) == 3  # each variant's DIs in a folder of its own
    md = (tmp_path / "di_side.md").read_text()
    assert md.count("| dataset_lr0.01_1500it_tau5_") == 3 and "averaged over its KD seeds (`" in md
    # a row recorded before the options existed ran at jitter 2, constant lr: the τ 5 recipe, not another one
    base = rec["rows"][0]
    old = {**base, "variant": "old_kdseed1", "validation": base["validation"] + 50.0,
           "settings": {k: v for k, v in {**base["settings"], "kd_seed": 1}.items() if k not in ("jitter", "schedule")}}
    md2 = study.markdown({**rec, "rows": [*rec["rows"], old]})
    assert f"(`{names[0]}` {base['validation']:.2f}, `old_kdseed1` {base['validation'] + 50:.2f}): " in md2
    seed1, seed4 = (study.VARIANTS[f"{names[0]}_kdseed{k}"][1] for k in (1, 4))
    assert seed4 == {**seed1, "kd_seed": 4}  # the τ 5 recipe's five KD seeds: one recipe


def test_processes_side_by_side_keep_each_others_rows_and_the_notes(study, tmp_path, monkeypatch):
    """Two invocations running other variants of one record at once: each re-reads the record under its lock
    before writing, so neither the other's rows nor notes added by hand meanwhile are lost."""
    out = tmp_path / "zskd_di_study_cpu_n16.json"

    def fake_row(name, cfg, **kw):
        return {"variant": name, "what": study.VARIANTS[name][0], "settings": cfg, "validation": 50.0,
                "test": 50.0, "synthesis_s": 0.0, "kd_s": 0.0}

    def meanwhile(name, cfg, **kw):  # the other process finishes its row, and a note is written, during this run
        other = json.loads(out.read_text())
        seed1 = "dataset_lr0.01_kdseed1"
        other["rows"].append(fake_row(seed1, {**study.BASE, **study.VARIANTS[seed1][1]}))
        other["notes"] = ["(1) a note"]
        out.write_text(json.dumps(other))
        return fake_row(name, cfg)

    args = ["--n", "16", "--kd-epochs", "1", "--teacher-epochs", "1", "--max-train", "6000", "--threads", "1",
            "--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    monkeypatch.setattr(study, "run_variant", fake_row)
    assert study.main([*args, "--variants", "real"]) == 0
    monkeypatch.setattr(study, "run_variant", meanwhile)
    assert study.main([*args, "--variants", "dataset_lr0.01"]) == 0
    rec = json.loads(out.read_text())
    assert [r["variant"] for r in rec["rows"]] == ["real", "dataset_lr0.01_kdseed1", "dataset_lr0.01"]
    assert rec["notes"] == ["(1) a note"] and "(1) a note" in (tmp_path / "zskd_di_study_cpu_n16.md").read_text()
    assert "--variants dataset_lr0.01" in rec["rows"][2]["command"]  # each row names the invocation that ran it
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_record_of_another_setting_is_refused_not_overwritten(study, tmp_path, capsys):
    """Rows of another KD length (or number of DIs, ...) are not comparable: the study names the difference and
    stops before it trains anything, and the record keeps its rows."""
    out = tmp_path / "zskd_di_study_cpu_n16.json"
    old = {"n": 16, "kd_epochs": 1, "teacher_epochs": 1, "train_images": 1000, "rows": [{"variant": "real"}]}
    out.write_text(json.dumps(old))
    args = ["--variants", "dataset_lr0.01", "--n", "16", "--kd-epochs", "2", "--teacher-epochs", "1",
            "--max-train", "6000", "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        study.main(args)
    assert "is a study of another setting (kd_epochs 1 (here 2)); name a record of its own with --record" in (
        capsys.readouterr().err)
    assert json.loads(out.read_text()) == old and not (tmp_path / "w").exists()


def test_di_geometry_reads_where_the_dis_lie(study):
    torch.manual_seed(0)
    teacher = _FeatureTeacher()
    x, y = torch.rand(400, 1, 32, 32), torch.arange(400) % 10
    train, evaluation = (x, y), {"validation": (torch.rand(50, 1, 32, 32), torch.arange(50) % 10)}
    # the very real images the measure compares with, as DIs: as near to the validation images as they are
    pick = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:200]
    same = study.di_geometry(teacher, x[pick], train, evaluation)
    counts = torch.bincount(teacher.classifier(teacher.features(x[pick])).argmax(1), minlength=10)
    assert same["gap"] == pytest.approx(1.0) and same["spread"] > 0
    assert same["balance"] == pytest.approx(float(counts.min()) * 10 / 200)
    # one DI repeated: no variety within its class, every other class missing, farther from real images
    collapsed = study.di_geometry(teacher, x[:1].expand(200, -1, -1, -1), train, evaluation)
    assert collapsed["spread"] == pytest.approx(0.0, abs=1e-6) and collapsed["balance"] == 0.0
    assert collapsed["gap"] > 1
    # the student's errors, grouped from the images nearest the inputs to the farthest: a student that errs on
    # exactly the images far from its inputs shows it in the last quarter only
    xv = evaluation["validation"][0][:40]
    near = 1 - (torch.nn.functional.normalize(teacher.features(xv), dim=1)
                @ torch.nn.functional.normalize(teacher.features(x[pick]), dim=1).T).amax(1).detach()
    far = near.argsort()[30:]
    labels = teacher.classifier(teacher.features(xv)).argmax(1).detach()
    labels[far] = (labels[far] + 1) % 10  # the teacher, as a student, is wrong exactly there
    by_reach = study.errors_by_reach(teacher, teacher, x[pick], xv, labels)
    assert by_reach == pytest.approx([0.0, 0.0, 0.0, 100.0])


class _FeatureTeacher(torch.nn.Module):
    """A stand-in teacher with the ``features`` / ``classifier`` split of the study's LeNet-5."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 16), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_adaptive_variant_makes_its_second_half_against_the_first_half_student(study, tmp_path, monkeypatch):
    """The ``_adi`` variants: the first half of the budget is the plain variant's DIs, the second is synthesised
    with the student of the first half as the competitor (one student for every weight, kept on disk)."""
    seen = []

    class Recorded(study.DataImpressions):
        def __init__(self, *a, **kw):
            seen.append((kw.get("competition_weight", 0.0), kw.get("competitor")))
            super().__init__(*a, **kw)

    monkeypatch.setattr(study, "DataImpressions", Recorded)
    plain, name = "dataset_lr0.01_1500it_tau5_warmup_2xep", "dataset_lr0.01_1500it_tau5_warmup_2xep_adi1"
    for v in (plain, name):  # seconds: two synthesis steps each
        monkeypatch.setitem(study.VARIANTS, v, (study.VARIANTS[v][0], {**study.VARIANTS[v][1], "iters": 2}))
    work = tmp_path / "w"
    args = ["--variants", f"{plain},{name}", "--n", "16", "--kd-epochs", "1", "--teacher-epochs", "1",
            "--max-train", "6000", "--threads", "1", "--work", str(work), "--out", str(tmp_path)]
    assert study.main(args) == 0
    # the plain row's synthesizer, the adaptive row's for its first half (which finds them all on disk, made by
    # the first), and its competitor's
    assert [w for w, _ in seen] == [0.0, 0.0, 1.0] and seen[1][1] is None and seen[2][1] is not None
    assert len(list(work.glob("dis_*_competitor8_*.pt"))) == 1
    rec = json.loads((tmp_path / "zskd_di_study_cpu_n16.json").read_text())
    assert rec["rows"][1]["settings"]["adi"] == {"plain": 0.5, "weight": 1.0}
    assert rec["rows"][0]["settings"]["adi"] is None
    cfg = {**study.BASE, **study.VARIANTS[name][1]}
    teacher = _FeatureTeacher()  # read back only: the teacher is not consulted
    with pytest.raises(ValueError, match="kd_epochs"):  # the second round is keyed by its competitor's KD
        study.variant_dis(cfg, teacher=teacher, n=16, work=work, read_only=True)
    both, soft = study.variant_dis(cfg, teacher=teacher, n=16, work=work, read_only=True, kd_epochs=1)
    first, first_soft = study.variant_dis({**cfg, "adi": None}, teacher=teacher, n=16, work=work, read_only=True)
    assert both.shape == first.shape and torch.equal(both[:8], first[:8]) and torch.equal(soft[:8], first_soft[:8])
    assert not torch.equal(both[8:], first[8:])  # the second round: other draws, made against the student
    # the DI geometry reads the first DIs it is given: both rounds', shuffled, for a two-round variant
    assert study.geometry_order({**cfg, "adi": None}, both) is both
    mixed = study.geometry_order(cfg, both)
    assert not torch.equal(mixed[:8], both[:8])
    assert torch.equal(*(t.flatten(1).sum(1).sort().values for t in (mixed, both)))  # the same DIs
    # a row before the option existed is the plain recipe: averaged with the plain rows, not the adaptive one
    old = {**rec["rows"][0], "variant": "old_kdseed1",
           "settings": {k: v for k, v in {**rec["rows"][0]["settings"], "kd_seed": 1}.items() if k != "adi"}}
    assert f"(`{plain}` " in study.markdown({**rec, "rows": [rec["rows"][0], old]})
    with pytest.raises(ValueError, match="adi plain"):
        study.variant_dis({**cfg, "adi": {"plain": 1.0, "weight": 1.0}}, teacher=teacher, n=16, work=work,
                          kd_epochs=1)


def test_hint_variant_matches_the_penultimate_features_beside_the_logits(study, monkeypatch):
    """The ``_hint`` variants hand ``distill`` the student's and the teacher's ``features`` (84 units each) at their
    weight; the plain recipe hands none, and keeps the KD key its earlier competitors were saved under."""
    calls = []
    monkeypatch.setattr(study, "distill", lambda student, x, **kw: calls.append(kw))
    plain, name = "dataset_lr0.01_1500it_tau5_warmup_2xep", "dataset_lr0.01_1500it_tau5_warmup_2xep_hint0.1"
    teacher, student = LeNet5ZSKD(), LeNet5HalfZSKD()
    x, soft = torch.rand(4, 1, 32, 32), torch.full((4, 10), 0.1)
    for v in (plain, name):
        study.distil_student(student, {**study.BASE, **study.VARIANTS[v][1]}, x, soft, teacher=teacher, kd_epochs=1)
    assert "features" not in calls[0]
    (s_layer, t_layer, channels), = calls[1]["features"]
    assert s_layer is student.features and t_layer is teacher.features and channels is None
    assert calls[1]["feature_weight"] == 0.1 and calls[1]["epochs"] == 2 and calls[1]["teacher"] is teacher
    assert s_layer(x).shape == t_layer(x).shape == (4, 84)
    recipe = {v: study._kd_recipe({**study.BASE, **study.VARIANTS[v][1]}, 100) for v in (plain, name)}
    assert "kd_hint" not in recipe[plain] and recipe[name]["kd_hint"] == 0.1
    # a row before the option existed is the plain recipe; a hint row is a recipe of its own
    row = {"variant": plain, "what": "", "validation": 98.0, "test": 98.0, "synthesis_s": 0, "kd_s": 0,
           "settings": {**study.BASE, **study.VARIANTS[plain][1]}}
    old = {**row, "variant": "old_kdseed1",
           "settings": {k: v for k, v in {**row["settings"], "kd_seed": 1}.items() if k != "kd_hint"}}
    hinted = {**row, "variant": name, "validation": 99.0, "settings": {**study.BASE, **study.VARIANTS[name][1]}}
    monkeypatch.setattr(study, "env_markdown", lambda env, title, command: [])  # no machine measured here
    rec = {"env": {}, "command": "", "n": 16, "kd_epochs": 1, "teacher": {"validation": 99.0, "test": 99.0}}
    assert f"(`{plain}` 98.00, `old_kdseed1` 98.00)" in study.markdown({**rec, "rows": [row, old]})
    assert f"(`{name}` 99.00): 99.00 %" in study.markdown({**rec, "rows": [row, old, hinted]})


def test_curves_score_every_epoch_and_are_added_to_recorded_rows(study, tmp_path):
    """--curves: a new row is scored after each KD epoch; a recorded row without a curve is trained again for
    it, keeping its figures (the same run: the curve ends on them); the markdown sums the curves up."""
    args = ["--variants", "dataset_lr0.01", "--n", "16", "--kd-epochs", "2", "--teacher-epochs", "1",
            "--max-train", "6000", "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    out = tmp_path / "zskd_di_study_cpu_n16.json"
    assert study.main(args) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert "curve" not in row and "Scores after every KD epoch" not in out.with_suffix(".md").read_text()
    assert study.main([*args, "--curves"]) == 0
    again = json.loads(out.read_text())["rows"]
    assert len(again) == 1 and {k: v for k, v in again[0].items() if k != "curve"} == row
    curve = again[0]["curve"]
    assert set(curve) == {"validation", "test"} and all(len(v) == 2 for v in curve.values())
    assert (curve["validation"][-1], curve["test"][-1]) == pytest.approx((row["validation"], row["test"]))
    md = out.with_suffix(".md").read_text()
    assert f"- `dataset_lr0.01`: last of 2 epochs {row['validation']:.2f} % validation, {row['test']:.2f} % test;" in md
    assert "trained again" not in md and f"best test epoch {curve['test'].index(max(curve['test'])) + 1}: " in md
    assert study.main([*args, "--curves"]) == 0  # a curve on record: nothing trained again
    assert json.loads(out.read_text())["rows"] == again
    # a curve that does not end on the row's figures (trained again elsewhere) says so
    moved = {**again[0], "validation": again[0]["validation"] - 1.0}
    assert "(trained again for the curve; the row's run: " in "\n".join(study.curve_lines([moved]))


def test_screen_measures_a_synthesis_setting_without_a_student(study, tmp_path, monkeypatch, capsys):
    """--screen: DIs of one variant at each value of a synthesis setting, measured before any KD, into the
    record's screens (no row, no student); a rerun skips what is on record; the markdown tables them."""
    args = ["--variants", "dataset_lr0.01", "--n", "16", "--kd-epochs", "1", "--teacher-epochs", "1",
            "--max-train", "6000", "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path),
            "--screen-n", "12"]
    out = tmp_path / "zskd_di_study_cpu_n16.json"
    distilled = []
    monkeypatch.setattr(study, "distil_student", lambda *a, **k: distilled.append(1))
    assert study.main([*args, "--screen", "tv_l2=0,0.001"]) == 0
    rec = json.loads(out.read_text())
    assert rec["rows"] == [] and not distilled
    screens = rec["screens"]
    assert [(e["variant"], e["key"], e["value"], e["n"]) for e in screens] == [
        ("dataset_lr0.01", "tv_l2", 0.0, 12), ("dataset_lr0.01", "tv_l2", 0.001, 12)]
    for e in screens:
        assert {"saturated", "target_kl", "teacher_max_abs_logit", "roughness", "validation_roughness", "spread",
                "gap", "balance", "synthesis_s", "command"} <= set(e)
    assert screens[0]["validation_roughness"] == screens[1]["validation_roughness"] > 0
    assert screens[1]["roughness"] < screens[0]["roughness"]  # the prior smooths the DIs
    # the DIs are kept apart from the variant's own (keyed by their number) and carry the setting
    folders = sorted(p.name for p in (tmp_path / "w").iterdir() if p.name.startswith("dis_"))
    cfg = {**study.BASE, **study.VARIANTS["dataset_lr0.01"][1]}
    assert folders == sorted(study.dis_folder({**cfg, "tv_l2": v}, 12) for v in (0.0, 0.001))
    md = out.with_suffix(".md").read_text()
    assert "Synthesis settings screened before any KD" in md and "| dataset_lr0.01 | tv_l2 0.001 | 12 |" in md
    # on record: skipped, nothing made again
    monkeypatch.setattr(study, "variant_dis", lambda *a, **k: pytest.fail("made DIs again"))
    assert study.main([*args, "--screen", "tv_l2=0.001"]) == 0
    assert json.loads(out.read_text())["screens"] == screens
    for bad, message in ((["--screen", "beta=1"], "KEY one of lr, iters, tau, tv_l2, jitter"),
                         (["--screen", "iters=1.5"], "the values of iters must be ints"),
                         (["--screen", "tv_l2="], "expected KEY=V1,V2,..."),
                         (["--screen", "tv_l2=0", "--variants", "dataset_lr0.01,real"], "exactly one variant"),
                         (["--screen", "tv_l2=0", "--screen-n", "0"], "--screen-n: must be >= 1"),
                         (["--screen", "tv_l2=0", "--variants", "real"], "real is not one round of plain DIs")):
        with pytest.raises(SystemExit):
            study.main([*args, *bad])
        assert message in capsys.readouterr().err
    assert not study.screenable("real") and study.screenable("dataset_lr0.01")
    assert not study.screenable(next(v for v, (_, cfg) in study.VARIANTS.items() if cfg.get("adi")))


def test_roughness_is_zero_for_flat_images_and_two_for_a_checkerboard(study):
    assert study.roughness(torch.full((2, 1, 4, 4), 0.7)) == 0.0
    board = (torch.arange(4).view(4, 1) + torch.arange(4)).remainder(2).float().view(1, 1, 4, 4)
    assert study.roughness(board) == pytest.approx(2.0)
